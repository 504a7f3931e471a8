"""Every command the README shows in a code block runs, shrunk to seconds, so that README and CLI cannot drift.

Each `ann …`, `make …` and `sbatch …` line of a code block must match one rule of RULES (first match wins):
run it as written, run it with --dry-run (full-size recipes: the plan is parsed and built, nothing trains),
run it on the tiny demo run (evaluation and prediction), or skip it with the reason written next to it.
A command no rule knows fails the coverage test: add a rule when you add a command to the README.
The fast tests parse every `ann` line with the real command line (skipped ones too); the slow one runs them.

The commands run in a scratch project directory (recipes/ linked in, data/ and runs/ written there), with
substitutions that shrink them: small synthetic sets, the demo recipe shrunk by --set overrides, official
dataset roots replaced by tiny trees in their layouts. Only the final step of a run is mapped to the tiny
run's, so a README checkpoint path that no run of that recipe writes fails.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from conftest import ROOT, ann_cmd, ann_env, tiny_overrides

README = ROOT / "README.md"
TINY_STEPS = 6  # train.iters of tiny_overrides: the tiny demo run's last checkpoint is step-000006
TINY = tiny_overrides(Path("data/synth-tiny"))  # relative to the scratch project


@dataclass(frozen=True)
class Rule:
    pattern: str  # a regex matched at the start of the command
    action: str  # "run", "dry-run", "tiny" (the demo recipe shrunk by TINY) or "skip"
    why: str
    subs: tuple[tuple[str, str], ...] = field(default=())  # plain-text substitutions, in order


# Full-size recipes of datasets that are not here: their commands run on the tiny demo run instead.
_ON_DEMO = (("recipes/cityscapes.yaml", "recipes/demo.yaml"),
            ("runs/…/checkpoints/step-060000", f"runs/demo/checkpoints/step-{TINY_STEPS:06d}"),
            ("runs/exp1", "runs/demo"), ("864x864", "32x32"), ("576x576", "16x16"))

RULES = [
    Rule(r"make demo\b", "skip", "its `ann` lines run shrunk before the README's (the scratch project's runs); "
         "tests/test_demo.py checks the full demo"),
    Rule(r"make test\b", "skip", "runs this test suite itself"),
    Rule(r"sbatch ", "skip", "needs a SLURM cluster; tests/cluster/test_slurm.py submits the templates to a real one"),
    Rule(r"ann weights ", "skip", "needs the published checkpoints (downloads of hundreds of MB); "
         "tests/interop/test_weights.py imports the committed fixtures of both formats"),
    Rule(r"ann (eval|predict) .*--(pred-)?format cityscapes", "skip",
         "needs a 19-class Cityscapes model; tests/eval/test_pred_formats.py and test_cityscapes_official.py "
         "write these files from one and score them with the official script"),
    Rule(r"ann eval recipes/ann_r\d+-d8\S* --checkpoint ckpt/", "skip",
         "evaluates weights that `ann weights import` (skipped) wrote, on Cityscapes"),
    Rule(r"ann train recipes/(?!demo)", "dry-run",
         "a full-size recipe (GPUs, the dataset); multi-node commands need their peers: --dry-run parses the "
         "command and the recipe and prints the exact launch plan"),
    Rule(r"ann train recipes/demo\S* .*--nproc-per-node", "dry-run",
         "several ranks would resume the one-rank tiny run (another world size): --dry-run plans them"),
    Rule(r"ann train recipes/demo", "tiny", "the demo recipe shrunk to 6 steps on 32x64 images"),
    Rule(r"ann train demo --dry-run", "dry-run", "the built-in demo by name: --dry-run plans it"),
    Rule(r"ann recipes ", "run", "as written: lists, shows or copies built-in recipes into the scratch project"),
    Rule(r"ann (eval|predict) .*--checkpoint (mmseg|https?)://", "skip",
         "fetches a released model (hundreds of MB); tests/interop/test_weights_by_url.py evaluates a checkpoint URL "
         "served on 127.0.0.1"),
    Rule(r"ann eval ", "tiny", "on the tiny demo run; dataset recipes are replaced by the demo's", _ON_DEMO),
    Rule(r"ann predict ", "run", "on the tiny demo run and two images",
         ((f"runs/demo/checkpoints/step-{400:06d}", f"runs/demo/checkpoints/step-{TINY_STEPS:06d}"),)),
    Rule(r"ann data pack ", "run", "on tiny trees in the official layouts", (("/data/", "official/"),)),
    Rule(r"ann data synth ", "run", "a few small samples",
         (("--train 4096", "--train 8"), ("--val 256", "--val 4"), ("--size 64x128", "--size 32x64"))),
    Rule(r"ann data inspect ", "run", "the shards packed by the README's `ann data pack` lines"),
    Rule(r"ann model summary ", "run", "as written (the network is built on the meta device)"),
    Rule(r"ann plot ", "run", "on the tiny demo runs and their --json metrics"),
    Rule(r"ann viz attention ", "run", "on the tiny demo run",
         ((f"runs/demo/checkpoints/step-{400:06d}", f"runs/demo/checkpoints/step-{TINY_STEPS:06d}"),)),
    Rule(r"ann export ", "run", "the tiny demo run, checked against onnxruntime / TorchScript as written",
         ((f"runs/demo/checkpoints/step-{400:06d}", f"runs/demo/checkpoints/step-{TINY_STEPS:06d}"),)),
]


def readme_commands(text: str) -> list[str]:
    """`ann`/`make`/`sbatch` lines of the README's code blocks (indented or fenced), comments dropped."""
    commands, fenced, previous_blank = [], False, True
    in_block = False
    for line in re.sub(r"\\\n\s*", " ", text).splitlines():  # continuation lines joined
        if line.strip().startswith("```"):
            fenced = not fenced
            continue
        indented = line.startswith("    ") and (in_block or previous_blank)
        in_block = bool(line.strip()) and (indented or (in_block and line.startswith("    ")))
        previous_blank = not line.strip()
        if (fenced or in_block) and line.split(maxsplit=1)[0] in ("ann", "make", "sbatch"):
            commands.append(shlex.join(shlex.split(line, comments=True)))
    return commands


def rule_for(command: str) -> Rule | None:
    return next((r for r in RULES if re.match(r.pattern, command)), None)


def adapted(command: str, rule: Rule) -> list[str]:
    """The command as it runs here: substituted, shrunk, with --dry-run where the rule says so."""
    for old, new in rule.subs:
        command = command.replace(old, new)
    words = shlex.split(command)
    if rule.action == "dry-run" and "--dry-run" not in words:
        words.append("--dry-run")
    if rule.action == "tiny" or (rule.action == "dry-run" and "recipes/demo" in command):
        words += TINY
    return words[1:]  # without the leading `ann`


def test_every_readme_command_has_a_rule():
    commands = readme_commands(README.read_text())
    assert any(c.startswith("ann eval") for c in commands) and any(c.startswith("make") for c in commands)
    unknown = [c for c in commands if rule_for(c) is None]
    assert not unknown, f"README commands no rule of tests/test_readme.py covers (add one): {unknown}"


def parse_only(args: list[str]) -> dict:
    """Parse `ann ARGS` with the real command line, down to the verb, without running it (no torch): a
    UsageError names what does not parse. Returns the verb's parameters."""
    import typer

    from anncli.cli.main import app

    command = typer.main.get_command(app)
    ctx = command.make_context("ann", list(args))
    while hasattr(command, "commands"):
        name, command, rest = command.resolve_command(ctx, [*ctx._protected_args, *ctx.args])
        ctx = command.make_context(name, rest, parent=ctx)
    return ctx.params


def test_every_readme_ann_command_parses():
    """Fast, and for the skipped ones too: every option and argument of every README `ann` line exists."""
    for command in readme_commands(README.read_text()):
        if command.startswith("ann "):
            parse_only(shlex.split(command)[1:])


def test_parse_only_fails_on_what_the_cli_rejects():
    assert parse_only(["eval", "--multiscale", "--flip"])["multiscale"] is True
    assert parse_only(["data", "synth", "out", "--train", "8"])["train"] == 8
    for bad in (["eval", "--no-such-option"], ["data", "synth", "out", "--train", "-1"], ["no-such-verb"],
                ["train"]):
        try:
            parse_only(bad)
        except Exception as e:  # typer's usage errors: the command line would exit 2 with their message
            assert getattr(e, "exit_code", None) == 2, repr(e)
        else:
            raise AssertionError(f"ann {' '.join(bad)} parsed")


def test_readme_extraction_reads_indented_and_fenced_blocks():
    text = ("Intro `ann env` inline.\n\n    ann eval x.yaml   # comment\n    ls\n    ann weights import a \\\n"
            "        --out b\n\n```\nmake demo\n```\n  ann no\n")
    assert readme_commands(text) == ["ann eval x.yaml", "ann weights import a --out b", "make demo"]


def makefile_demo_commands() -> list[str]:
    """The `ann` lines of `make demo`, as `ann …` commands."""
    recipe = (ROOT / "Makefile").read_text().split("\ndemo:", 1)[1].split("\n\n", 1)[0]
    return ["ann " + line.strip()[len("$(ANN) "):] for line in recipe.splitlines() if line.strip().startswith("$(ANN) ")]


def _ann(project: Path, command: str) -> tuple[list[str], subprocess.CompletedProcess]:
    rule = rule_for(command)
    assert rule is not None and rule.action != "skip", command
    args = adapted(command, rule)
    done = subprocess.run(ann_cmd(*args), cwd=project, env=ann_env(), capture_output=True, text=True, timeout=600)
    return args, done


def _project(tmp: Path) -> Path:
    """A scratch project: recipes/ linked in, the tiny demo run, tiny official dataset trees, two images."""
    from PIL import Image

    from test_data_pack import make_ade, make_cityscapes, make_context
    from test_data_voc import make_voc

    for name in ("recipes", "docs"):
        (tmp / name).symlink_to(ROOT / name)
    demo = makefile_demo_commands()
    assert demo[:2] == ["ann train recipes/demo.yaml", "ann train recipes/demo-fcn.yaml"], demo
    for command in demo:  # `make demo`, shrunk: the runs and metrics the README's commands read
        args, done = _ann(tmp, command)
        assert done.returncode == 0, (args, done.stderr[-2000:])
    assert (tmp / "runs" / "demo" / "checkpoints" / f"step-{TINY_STEPS:06d}" / "COMPLETE").is_file()
    for split in ("train", "val"):
        make_cityscapes(tmp / "official" / "cityscapes", split=split, n=2)
    make_ade(tmp / "official", n=2)
    ade = tmp / "official" / "ADEChallengeData2016"
    for kind in ("images", "annotations"):
        shutil.copytree(ade / kind / "validation", ade / kind / "training")
    make_context(tmp / "official", palette_mode=True)
    sets = tmp / "official" / "VOCdevkit" / "VOC2010" / "ImageSets" / "SegmentationContext"
    shutil.copy(sets / "val.txt", sets / "train.txt")
    make_voc(tmp / "official")
    (tmp / "images").mkdir()
    for i in range(2):
        Image.new("RGB", (64, 32), (40 * i, 90, 200)).save(tmp / "images" / f"street{i}.png")
    return tmp


@pytest.mark.slow  # about 2 minutes on 2 cores (make demo shrunk, then some 35 commands); the fast tests above parse them
def test_readme_commands_run(tmp_path):
    project = _project(tmp_path)
    failures, ran = [], []
    for command in readme_commands(README.read_text()):
        rule = rule_for(command)
        if rule is None or rule.action == "skip":
            continue  # the coverage test above fails on the unknown ones
        start = time.perf_counter()
        args, done = _ann(project, command)
        ran.append(f"{time.perf_counter() - start:5.1f} s  {command}")
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
            failures.append(f"{command}\n    ran: ann {shlex.join(args)}\n    exit {done.returncode}: "
                            + "\n    ".join(tail))
    print("\n".join(ran))
    assert not failures, "README commands that fail:\n" + "\n".join(failures)
