"""Every verb's --help, run as users run it: words for values, RECIPE in usage lines, the defaults that
come from the recipe said so, examples that fit the command."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT


def _verbs() -> list[str]:
    """Every command of the app, nested groups included, so that a new verb is checked too."""
    import typer

    from anncli.cli.main import app

    def walk(group, prefix):
        for name, command in group.commands.items():
            if hasattr(command, "commands"):
                yield from walk(command, prefix + [name])
            else:
                yield " ".join(prefix + [name])

    return sorted(walk(typer.main.get_command(app), []))


VERBS = _verbs()


def _help(verb: str) -> str:
    env = {**os.environ, "COLUMNS": "150", "TERM": "dumb", "NO_COLOR": "1"}
    done = subprocess.run([sys.executable, "-m", "anncli", *verb.split(), "--help"], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=120)
    assert done.returncode == 0, (verb, done.stderr)
    return done.stdout


@pytest.fixture(scope="module")
def helps() -> dict[str, str]:
    return {verb: _help(verb) for verb in [""] + VERBS + ["data", "recipe", "model", "bench"]}


def test_the_verbs_users_know_are_all_there():
    for verb in ["train", "eval", "predict", "env", "recipe validate", "recipe show", "data pack", "data synth",
                 "data inspect", "model summary", "bench attention"]:
        assert verb in VERBS


PYTHON_TYPES = r"<(path|str|int|float|bool|file|datetime|uuid|text|list\[[^\]]*\]|(int|float) range)>"


def test_values_are_words_not_python_types(helps):
    for verb, text in helps.items():
        for bad in (PYTHON_TYPES, r"\[x>=\d\]", r"\[x<=\d\]"):
            assert not re.search(bad, text), (verb, bad, text)
        usage = next(line for line in text.splitlines() if "Usage:" in line)
        assert not re.search(r"\{\w+\}", usage), (verb, usage)


def test_usage_lines_write_arguments_in_capitals(helps):
    usage = {verb: next(line for line in text.splitlines() if "Usage:" in line) for verb, text in helps.items()}
    assert usage["train"].rstrip().endswith("train [OPTIONS] RECIPE")
    assert usage["eval"].rstrip().endswith("eval [OPTIONS] [RECIPE]")  # optional: the run's own recipe
    assert usage["predict"].rstrip().endswith("predict [OPTIONS] IMAGES...")
    assert usage["data pack"].rstrip().endswith("pack [OPTIONS] DATASET ROOT OUT")
    assert re.search(r"--nodes\s+N\s", helps["train"]) and re.search(r"--checkpoint\s+DIR\|URL\|NAME\s", helps["eval"])
    assert re.search(r"--set\s+KEY=VALUE\s", helps["eval"]) and re.search(r"--rdzv-endpoint\s+HOST:PORT", helps["eval"])


def _one_line(text: str) -> str:
    """The help text with the box drawing and line wrapping taken out."""
    return re.sub(r"\s+", " ", re.sub(r"[│╭╮╰╯─]", " ", text))


def test_set_examples_fit_the_command(helps):
    examples = {verb: re.findall(r"--set ([a-z_][\w.]*)=", _one_line(text)) for verb, text in helps.items()
                if "--set KEY=VALUE" in _one_line(text)}
    assert examples["train"] == ["train.iters"]
    assert examples["eval"] == ["data.root"] and examples["predict"] == ["eval.merge"]
    for verb, keys in examples.items():
        assert len(keys) == 1, (verb, keys)


def test_eval_options_say_which_defaults_come_from_the_recipe(helps):
    text = _one_line(helps["eval"])
    for option, key in (("--mode", "eval.mode"), ("--crop", "eval.crop"), ("--stride", "eval.stride"),
                        ("--merge", "eval.merge"), ("--scales", "eval.scales"), ("--flip", "eval.flip")):
        described = text.split(f" {option} ", 1)[1].split(" --", 1)[0]
        assert f"the recipe's {key}" in described, (option, described)


def test_defaults_shown_where_users_look_for_them(helps):
    pack = _one_line(helps["data pack"])
    assert "[default: 1000000000]" in pack and "1000000000.0" not in pack
    readme = (ROOT / "README.md").read_text()
    train = re.search(r"ann data synth \S+ --train (\d+)", readme).group(1)
    assert f"--train N Training samples (the demo recipe's count). [default: {train}]" in _one_line(helps["data synth"])
    assert "--input HxW Input size for FLOPs, e.g. 769x769 (default: none, parameters only)" in \
        _one_line(helps["model summary"])
    assert re.search(r"--multiscale\s+Use", helps["eval"])  # a flag shows no value


def test_dry_run_labels_its_plan_lines_and_says_per_process_batch_on_cpu():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, "-m", "anncli", "train", "recipes/demo.yaml", "--nproc-per-node", "2",
                           "--dry-run"], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    plan = done.stdout.split("\n---\n", 1)[1].splitlines()
    labels = [line.split(":", 1)[0] for line in plan]
    assert labels[-3:] == ["runs", "command", "environment"]
    assert "per-process batch" in labels and "per-GPU batch" not in labels
    assert plan[-2].split(None, 1)[1].split()[1:3] == ["-m", "anncli.cluster.torchrun"]
    assert plan[-1].split(None, 1)[1].startswith("PYTHONFAULTHANDLER=1")
