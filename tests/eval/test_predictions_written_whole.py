"""Prediction PNGs (`ann predict`, `ann eval --save-pred`) are written whole: under a real file-size limit
(RLIMIT_FSIZE in the child) an old prediction is never truncated and no temporary file is left, and a
command refused before its work leaves no output folder behind."""

import numpy as np
import pytest
from PIL import Image

from conftest import run_ann, run_ann_limited
from test_eval_run import write_checkpoint, write_recipe, write_split


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("whole")
    write_split(base / "data", "val", [3])
    recipe = write_recipe(base / "recipe.yaml", base / "data")
    images = base / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, size=(24, 32, 3), dtype=np.uint8)).save(images / f"img{i}.png")
    return {"recipe": recipe, "checkpoint": write_checkpoint(base / "run", recipe), "images": images}


def _command(setup, command, out):
    if command == "predict":
        return ["predict", setup["images"], "--checkpoint", setup["checkpoint"], "--recipe", setup["recipe"],
                "--out", out]
    return ["eval", setup["recipe"], "--checkpoint", setup["checkpoint"], "--save-pred", out]


def _files(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("command", ["predict", "eval"])
def test_a_failed_write_keeps_every_old_prediction_whole_and_leaves_no_temp_file(setup, tmp_path, command):
    out = tmp_path / "out"
    res = run_ann(*_command(setup, command, out))
    assert res.returncode == 0, res.stderr[-3000:]
    before = _files(out)
    assert len(before) >= 3
    res = run_ann_limited(*_command(setup, command, out), limit=min(map(len, before.values())) - 1)
    assert res.returncode == 2, res.stderr[-3000:]
    errors = [line for line in res.stderr.splitlines() if line.startswith("ann: error:")]
    assert len(errors) == 1 and "file too large" in errors[0] and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert f"{out}/" in errors[0] and ".tmp-" not in errors[0]  # the user's file is named, not a temporary one
    assert _files(out) == before  # the same names, the same bytes: nothing truncated, nothing left over


@pytest.mark.parametrize("args", [["--format", "WRONG"], ["--format", "WRONG", "--model", "none.onnx"],
                                  ["--checkpoint", "no-such-checkpoint"]])
def test_a_refused_predict_leaves_no_output_folder(setup, tmp_path, args):
    out = tmp_path / "new" / "out"
    base = [] if "--model" in args or "--checkpoint" in args else ["--checkpoint", setup["checkpoint"]]
    res = run_ann("predict", setup["images"], "--out", out, *base, *args)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert not (tmp_path / "new").exists()
