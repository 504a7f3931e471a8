"""The command line: help is fast because it imports no torch; every verb has help."""

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import run_ann

ROOT = Path(__file__).resolve().parents[2]

PROBE = """
import sys
from anncli.cli.main import app
try:
    app({args!r})
except SystemExit:
    pass
heavy = sorted(m for m in ("torch", "deepspeed", "webdataset", "cv2", "numpy") if m in sys.modules)
print("HEAVY=" + ",".join(heavy))
"""


@pytest.mark.parametrize("args", [["--help"], ["train", "--help"], ["eval", "--help"], ["data", "pack", "--help"],
                                  ["recipe", "show", "recipes/demo.yaml"], ["plot", "--help"], ["export", "--help"],
                                  ["viz", "attention", "--help"]])
def test_help_and_recipe_commands_do_not_import_torch(args):
    res = subprocess.run([sys.executable, "-c", PROBE.format(args=args)], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    assert "HEAVY=\n" in res.stdout, res.stdout[-300:]


def test_every_command_has_help():
    for verb in ["train", "eval", "predict", "env", "recipe validate", "recipe show", "data pack", "data synth",
                 "data inspect", "model summary", "bench attention", "plot", "viz attention", "export"]:
        res = subprocess.run([sys.executable, "-m", "anncli", *verb.split(), "--help"], capture_output=True,
                             text=True, cwd=ROOT)
        assert res.returncode == 0 and "Usage" in res.stdout, (verb, res.stderr)


def test_unknown_option_exits_2():
    res = subprocess.run([sys.executable, "-m", "anncli", "train", "recipes/demo.yaml", "--bogus"],
                         capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 2


def test_bounds_are_enforced_though_the_help_does_not_show_them():
    for args, message in ((["train", "recipes/demo.yaml", "--nodes", "0"], "0 is below the minimum 1"),
                          (["data", "synth", "--train", "-1"], "-1 is below the minimum 0")):
        result = run_ann(*args)
        assert result.returncode == 2 and message in result.stderr, result.stderr
