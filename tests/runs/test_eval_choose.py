"""`ann eval` and `ann predict` without a recipe: the checkpoint's own recipe, or the newest run under runs/;
the eval table names its checkpoint and step, the JSON its units; predict's summary, directories and
unreadable images."""

import json
import os
import re

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from test_eval_run import SHARD_SIZES, write_checkpoint, write_recipe, write_split


def _cli(*args):
    from anncli.cli.main import app

    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A project directory with two runs under runs/: `older` (step 10) and `newer` (step 20)."""
    torch.set_num_threads(1)
    base = tmp_path_factory.mktemp("choose")
    write_split(base / "data", "val", SHARD_SIZES)
    recipe = write_recipe(base / "recipe.yaml", base / "data")
    older = write_checkpoint(base / "runs" / "older", recipe, step=10)
    newer = write_checkpoint(base / "runs" / "newer", recipe, step=20)
    os.utime(older / "COMPLETE", ns=(1_000_000_000, 1_000_000_000))
    os.utime(newer / "COMPLETE", ns=(2_000_000_000, 2_000_000_000))
    (base / "runs" / "empty" / "checkpoints").mkdir(parents=True)  # a run without a complete checkpoint
    return {"base": base, "recipe": recipe, "older": older, "newer": newer}


@pytest.fixture
def in_project(project, monkeypatch):
    monkeypatch.chdir(project["base"])
    monkeypatch.setenv("COLUMNS", "200")
    return project


def test_eval_without_a_recipe_takes_the_newest_run_and_says_so(in_project, tmp_path):
    result = _cli("eval", "--multiscale", "--flip", "--json", tmp_path / "m.json")
    assert result.exit_code == 0, result.output
    newer = in_project["newer"].relative_to(in_project["base"])
    assert f"[ann] checkpoint {newer} (the newest complete checkpoint under runs/), recipe {newer}/recipe.yaml" \
        in result.output
    report = json.loads((tmp_path / "m.json").read_text())
    assert report["checkpoint"] == str(newer) and report["step"] == 20
    assert report["protocol"]["flip"] is True and report["samples"] == sum(SHARD_SIZES)


def test_eval_table_names_checkpoint_and_step_and_json_its_units(in_project, tmp_path):
    older = in_project["older"]
    result = _cli("eval", "--checkpoint", older, "--json", tmp_path / "m.json")
    assert result.exit_code == 0, result.output
    assert f"checkpoint {older} (step 10)" in result.output
    assert f"recipe {older}/recipe.yaml" in result.output  # the recipe saved with the checkpoint
    report = json.loads((tmp_path / "m.json").read_text())
    assert report["units"]["mIoU"] == "fraction" and report["units"]["per_class.IoU"] == "fraction"
    assert 0 <= report["mIoU"] <= 1 and report["step"] == 10
    mean_row = next(line for line in result.output.splitlines() if re.search(r"\bmean\b", line))
    cells = [c.strip() for c in re.split(r"[│┃|]", mean_row) if c.strip()]
    assert cells[0] == "mean" and len(cells) == 3, mean_row  # IoU and Acc; no pixel count for a mean
    assert f"{report['pixels']:,} labelled pixels" in result.output


def test_eval_with_a_recipe_names_the_checkpoint_it_picked(in_project):
    result = _cli("eval", in_project["recipe"], "--work-dir", "runs/older")
    assert result.exit_code == 0, result.output
    assert "[ann] checkpoint runs/older/checkpoints/step-000010 (the newest complete one of runs/older)" \
        in result.output


def test_no_run_or_tied_runs_are_one_line_exit_2(project, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = _cli("eval")
    assert result.exit_code == 2 and result.output.strip().splitlines()[-1] == (
        "ann: error: no recipe given and no run directory under runs/ holds a complete checkpoint; "
        "pass a recipe or --checkpoint DIR"), result.output
    for name in ("a", "b"):
        done = write_checkpoint(tmp_path / "runs" / name, project["recipe"], step=5)
        os.utime(done / "COMPLETE", ns=(3_000_000_000, 3_000_000_000))
    for verb in (["eval"], ["predict", "x.png", "--out", "o"]):
        result = _cli(*verb)
        lines = result.output.strip().splitlines()
        assert result.exit_code == 2 and len(lines) == 1 and "tie" in lines[0] and "runs/a" in lines[0], result.output


def _image(path, seed):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (24, 32, 3), dtype=np.uint8)).save(path)


def test_predict_a_directory_skips_an_unreadable_image_and_exits_1(in_project, tmp_path):
    _image(tmp_path / "in" / "a.png", 0)
    _image(tmp_path / "in" / "deeper" / "b.jpg", 1)
    (tmp_path / "in" / "c.png").write_bytes(b"not a png")
    result = _cli("predict", tmp_path / "in", "--out", tmp_path / "out")
    assert result.exit_code == 1, result.output
    newer = in_project["newer"].relative_to(in_project["base"])
    assert f"[ann] checkpoint {newer} (the newest complete checkpoint under runs/)" in result.output
    assert "c.png: cannot read the image" in result.output
    assert re.search(rf"predicted 2 of 3 image\(s\) into {re.escape(str(tmp_path / 'out'))} in [0-9.]+ s; "
                     r"1 could not be read", result.output), result.output
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "a_color.png", "a_overlay.png", "a_pred.png", "b_color.png", "b_overlay.png", "b_pred.png"]


def test_predict_with_every_image_readable_exits_0(in_project, tmp_path):
    _image(tmp_path / "a.png", 2)
    result = _cli("predict", tmp_path / "a.png", "--checkpoint", in_project["older"], "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert "predicted 1 of 1 image(s)" in result.output and "could not be read" not in result.output
