"""`ann predict`: three files per image, the dataset palette, Cityscapes labelIds, inputs and errors."""

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from typer.testing import CliRunner

from anncli.errors import UserError
from anncli.eval.predict import run_predict

from test_eval_run import write_checkpoint

SYNTH_PALETTE = [(0, 0, 0), (230, 60, 60), (60, 200, 60), (60, 90, 230), (255, 255, 255)]
# trainId -> labelId of the Cityscapes test server, and a few colours of its palette (trainId: RGB)
CS_LABEL_IDS = [7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33]
CS_COLOURS = {0: (128, 64, 128), 2: (70, 70, 70), 10: (70, 130, 180), 13: (0, 0, 142), 18: (119, 11, 32)}


def _recipe(path, dataset: str, classes: int):
    path.write_text(yaml.safe_dump({
        "name": f"predict-{dataset}",
        "model": {"name": "ann", "backbone": "small", "num_classes": classes, "norm": "bn", "aux": False,
                  "key_channels": 8, "value_channels": 8, "psp_sizes": [1, 2]},
        "data": {"dataset": dataset, "root": str(path.parent / "nodata")},
        "eval": {"scales": [0.5, 1.0], "flip": True},
    }))
    return path


def _images(folder, count: int, seed: int = 0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        p = folder / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, size=(20 + 4 * i, 28, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    return paths


@pytest.fixture(scope="module")
def synth_ckpt(tmp_path_factory):
    torch.set_num_threads(1)
    base = tmp_path_factory.mktemp("predict")
    return write_checkpoint(base / "run", _recipe(base / "recipe.yaml", "synth", 5))


def test_three_files_per_image_with_the_palette(synth_ckpt, tmp_path):
    inputs = _images(tmp_path / "in" / "sub", 2) + _images(tmp_path / "other", 1, seed=1)
    (tmp_path / "other" / "img0.png").rename(tmp_path / "other" / "third.png")
    summary = run_predict([str(tmp_path / "in"), str(tmp_path / "other" / "*.png")], synth_ckpt, tmp_path / "out",
                          multiscale=True)
    assert len(summary.written) == 9 and summary.images == 3 and not summary.failed
    for stem, source in (("img0", inputs[0]), ("img1", inputs[1]), ("third", tmp_path / "other" / "third.png")):
        ids = np.array(Image.open(tmp_path / "out" / f"{stem}_pred.png"))
        colour = np.array(Image.open(tmp_path / "out" / f"{stem}_color.png"))
        overlay = np.array(Image.open(tmp_path / "out" / f"{stem}_overlay.png"))
        image = np.array(Image.open(source))
        assert ids.ndim == 2 and ids.dtype == np.uint8 and ids.shape == image.shape[:2] and ids.max() < 5
        assert np.array_equal(colour, np.asarray(SYNTH_PALETTE, dtype=np.uint8)[ids])
        expected = (image.astype(np.float32) + colour.astype(np.float32)) / 2
        assert np.abs(overlay.astype(np.float32) - expected).max() <= 0.5


def test_cityscapes_format_writes_label_ids_and_cityscapes_colours(tmp_path):
    torch.set_num_threads(1)
    ckpt = write_checkpoint(tmp_path / "run", _recipe(tmp_path / "cs.yaml", "cityscapes", 19))
    [source] = _images(tmp_path / "in", 1)
    run_predict([str(source)], ckpt, tmp_path / "out", fmt="cityscapes",  # recipe read from the checkpoint
                colors=tmp_path / "colors", overlay=tmp_path / "overlay")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["img0_labelIds.png"]  # nothing else beside them
    assert (tmp_path / "overlay" / "img0_overlay.png").is_file()
    label_ids = np.array(Image.open(tmp_path / "out" / "img0_labelIds.png"))
    colour = np.array(Image.open(tmp_path / "colors" / "img0_color.png"))
    train_ids = {tuple(c): t for t, c in enumerate(np.asarray(_cs_palette(), dtype=np.uint8).tolist())}
    for y in range(label_ids.shape[0]):
        for x in range(label_ids.shape[1]):
            assert label_ids[y, x] == CS_LABEL_IDS[train_ids[tuple(colour[y, x].tolist())]]


def _cs_palette():
    from anncli.data.datasets import palette

    pal = palette("cityscapes")
    for t, rgb in CS_COLOURS.items():
        assert tuple(pal[t]) == rgb
    return pal


def test_bad_inputs_are_user_errors(synth_ckpt, tmp_path):
    [source] = _images(tmp_path / "in", 1)
    with pytest.raises(UserError, match="no image matches"):
        run_predict([str(tmp_path / "missing*.png")], synth_ckpt, tmp_path / "out")
    with pytest.raises(UserError, match="--format"):
        run_predict([str(source)], synth_ckpt, tmp_path / "out", fmt="png")
    with pytest.raises(UserError, match="19-class cityscapes"):
        run_predict([str(source)], synth_ckpt, tmp_path / "out", fmt="cityscapes")
    with pytest.raises(UserError, match="150-class ade20k"):
        run_predict([str(source)], synth_ckpt, tmp_path / "out", fmt="ade20k")
    (tmp_path / "in" / "broken.png").write_bytes(b"no image")  # reported and skipped, the others segmented
    summary = run_predict([str(tmp_path / "in")], synth_ckpt, tmp_path / "out")
    [(path, why)] = summary.failed
    assert path.name == "broken.png" and "broken.png: cannot read" in why
    assert summary.images == 2 and {p.name for p in summary.written} == {"img0_pred.png", "img0_color.png",
                                                                          "img0_overlay.png"}


def test_cli_predict_exit_codes(synth_ckpt, tmp_path):
    from anncli.cli.main import app

    [source] = _images(tmp_path / "in", 1)
    ok = CliRunner().invoke(app, ["predict", str(source), "--checkpoint", str(synth_ckpt), "--out", str(tmp_path / "o")])
    assert ok.exit_code == 0, ok.output
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["img0_color.png", "img0_overlay.png", "img0_pred.png"]
    bad = CliRunner().invoke(app, ["predict", str(tmp_path / "nothing.png"), "--checkpoint", str(synth_ckpt),
                                   "--out", str(tmp_path / "o")])
    assert bad.exit_code == 2 and "ann: error:" in bad.output
