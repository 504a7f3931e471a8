"""`ann recipes list|show|copy` and built-in recipe names for train/eval, run as users run them: from a directory
that is not the repo."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT, ann_cmd, ann_env
from test_cli import PROBE


def ann_in(cwd, *args, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(ann_cmd(*args), cwd=cwd, env=env or ann_env(), capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("args", [["recipes", "list"], ["recipes", "show", "demo"], ["recipes", "--help"]])
def test_recipes_commands_do_not_import_torch(args):
    res = subprocess.run([sys.executable, "-c", PROBE.format(args=args)], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    assert "HEAVY=\n" in res.stdout, res.stdout[-300:]


def test_list_show_and_copy_from_another_directory(tmp_path):
    listed = ann_in(tmp_path, "recipes", "list")
    assert listed.returncode == 0, listed.stderr
    rows = {line.split()[0]: line.split()[1:] for line in listed.stdout.splitlines()[1:] if line.strip()}
    assert rows["demo"] == ["synth", "ann", "small", "64x128", "400", "1", "x", "16"]
    assert rows["demo-fcn"][:3] == ["synth", "fcn", "small"] and rows["cityscapes"][-3:] == ["8", "x", "1"]
    shown = ann_in(tmp_path, "recipes", "show", "demo")
    assert shown.returncode == 0 and shown.stdout == (ROOT / "recipes" / "demo.yaml").read_text()
    copied = ann_in(tmp_path, "recipes", "copy", "demo")
    assert copied.returncode == 0 and copied.stdout == "wrote demo.yaml\n"
    assert (tmp_path / "demo.yaml").read_bytes() == (ROOT / "recipes" / "demo.yaml").read_bytes()
    again = ann_in(tmp_path, "recipes", "copy", "demo")
    assert again.returncode == 2 and again.stderr == "ann: error: demo.yaml: exists; pass --force to overwrite it\n"
    jobs = ann_in(tmp_path, "recipes", "copy", "slurm", "jobs")
    assert jobs.returncode == 0, jobs.stderr
    for name in ("train.sh", "eval.sh"):
        assert os.access(tmp_path / "jobs" / name, os.X_OK)
        assert (tmp_path / "jobs" / name).read_bytes() == (ROOT / "slurm" / name).read_bytes()


@pytest.mark.parametrize("args", [["recipes", "show", "nope"], ["recipes", "copy", "nope"], ["train", "nope"],
                                  ["eval", "nope"], ["recipe", "show", "nope"]])
def test_an_unknown_name_is_one_line_listing_the_known_ones(tmp_path, args):
    done = ann_in(tmp_path, *args)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "nope" in done.stderr and "demo, demo-fcn" in done.stderr and "Traceback" not in done.stderr


def test_train_takes_a_builtin_name_and_a_file_of_that_name_wins(tmp_path):
    done = ann_in(tmp_path, "train", "cityscapes", "--nproc-per-node", "8", "--dry-run")
    assert done.returncode == 0, done.stderr
    builtin = f"ann: recipe cityscapes: the built-in one, {ROOT / 'anncli' / 'recipes' / 'cityscapes.yaml'}\n"
    assert [line for line in done.stderr.splitlines(keepends=True) if line.startswith("ann:")] == [builtin]
    assert "ann_r101-d8_8xb1-60k_cityscapes-769x769" in done.stdout
    (tmp_path / "cityscapes").write_text((ROOT / "recipes" / "demo.yaml").read_text())
    done = ann_in(tmp_path, "train", "cityscapes", "--dry-run")
    assert done.returncode == 0, done.stderr
    said = [line for line in done.stderr.splitlines() if line.startswith("ann:")]
    assert said == ["ann: recipe cityscapes: the file ./cityscapes, not the built-in recipe cityscapes"]
    assert re.search(r"^work dir:\s+runs/demo$", done.stdout, re.M), done.stdout


def test_ranks_do_not_repeat_which_recipe_was_used(tmp_path):
    worker = ann_env(RANK="1", WORLD_SIZE="2", LOCAL_RANK="1")
    done = subprocess.run([sys.executable, "-c", "from anncli.cli.recipes import recipe_file; print(recipe_file('demo'))"],
                          cwd=tmp_path, env=worker, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert done.stdout.strip() == str(ROOT / "anncli" / "recipes" / "demo.yaml")
