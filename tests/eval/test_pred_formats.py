"""Benchmark-server prediction files: `ann eval --save-pred --pred-format` and `ann predict --format`.

The Cityscapes checks re-implement the official evaluation's rule for finding predictions
(cityscapesscripts/evaluation/evalPixelLevelSemanticLabeling.py, getPrediction): for every ground truth
`gtFine/<split>/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png`, the files under the results folder, at any
depth, whose names match `<city>_<seq>_<frame>*.png` (fnmatch); none or more than one is an error. It reads
them as label ids (a 34x34 confusion over ids 0..33), so a prediction must be single-channel, the size of its
ground truth, and hold label ids.
"""

import fnmatch
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from typer.testing import CliRunner

from anncli.data.datasets import CITYSCAPES_TRAINID_TO_LABELID, pack_dataset
from anncli.eval.evaluate import EvalOptions, run_evaluation
from anncli.recipe import load_recipe

from conftest import run_ann
from test_eval_run import write_checkpoint

H, W = 32, 64
# label ids with instances in the official labels.py: person .. bicycle (caravan and trailer are void)
INSTANCE_IDS = {24, 25, 26, 27, 28, 29, 30, 31, 32, 33}


def _png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), array)


def fake_cityscapes(root: Path, split: str, frames: int, seed: int = 0) -> list[Path]:
    """A Cityscapes tree in the official layout: RGB images, labelIds with void ids (0..33) and instanceIds
    (labelId * 1000 + n for the classes with instances). Cells of 8x8 pixels carry one label id each, coloured
    with its class colour plus noise, so that a few training steps learn something. Returns the labelIds files."""
    colours = np.random.default_rng(34).integers(0, 256, size=(34, 3), dtype=np.uint8)  # the same in every split
    rng = np.random.default_rng(seed)
    ground_truths = []
    for i in range(frames):
        city = ("aachen", "bremen")[i % 2]
        stem = f"{city}_{i:06d}_000019"
        cells = rng.integers(0, 34, size=(H // 8, W // 8)).astype(np.uint8)
        cells[0, 0] = 7  # road in every frame
        label_ids = np.kron(cells, np.ones((8, 8), np.uint8))
        instances = label_ids.astype(np.uint16)
        for n, (y, x) in enumerate(zip(*np.nonzero(np.isin(cells, list(INSTANCE_IDS))))):
            instances[8 * y : 8 * y + 8, 8 * x : 8 * x + 8] = int(cells[y, x]) * 1000 + n
        image = np.clip(colours[label_ids].astype(int) + rng.integers(-20, 21, size=(H, W, 3)), 0, 255)
        _png(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png", image.astype(np.uint8)[..., ::-1])
        gt = root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png"
        _png(gt, label_ids)
        _png(root / "gtFine" / split / city / f"{stem}_gtFine_instanceIds.png", instances)
        ground_truths.append(gt)
    return ground_truths


def official_matches(ground_truth: Path, results: Path) -> list[Path]:
    """Our re-implementation of the official script's search: `<city>_<seq>_<frame>*.png`, recursively."""
    city, seq, frame = ground_truth.name.split("_")[:3]
    pattern = f"{city}_{seq}_{frame}*.png"
    return [Path(folder) / name for folder, _, names in os.walk(results) for name in fnmatch.filter(names, pattern)]


def official_prediction(ground_truth: Path, results: Path) -> np.ndarray:
    """The one prediction the official script would read for `ground_truth`, checked as it checks it."""
    matches = official_matches(ground_truth, results)
    assert len(matches) == 1, f"{ground_truth.name}: {len(matches)} predictions match: {matches}"
    with Image.open(matches[0]) as im:
        pred = np.array(im)
    assert pred.ndim == 2 and pred.shape == (H, W), pred.shape  # single channel, the ground truth's size
    return pred


def _recipe(path: Path, dataset: str, classes: int, root: Path, val: str = "val") -> Path:
    path.write_text(yaml.safe_dump({
        "name": f"formats-{dataset}",
        "model": {"name": "ann", "backbone": "small", "num_classes": classes, "norm": "bn", "aux": False,
                  "key_channels": 8, "value_channels": 8, "psp_sizes": [1, 2]},
        "data": {"dataset": dataset, "root": str(root), "train": val, "val": val, "num_workers": 0},
    }))
    return path


@pytest.fixture(scope="module")
def cityscapes(tmp_path_factory):
    torch.set_num_threads(1)
    base = tmp_path_factory.mktemp("cs")
    ground_truths = fake_cityscapes(base / "cityscapes", "val", frames=4)
    pack_dataset("cityscapes", base / "cityscapes", base / "data", split="val")
    recipe = _recipe(base / "cs.yaml", "cityscapes", 19, base / "data")
    return {"base": base, "gt": ground_truths, "recipe": recipe, "checkpoint": write_checkpoint(base / "run", recipe)}


def _evaluate(setup: dict, save_pred: Path, pred_format) -> dict:
    recipe = load_recipe(setup["recipe"])
    opts = EvalOptions.from_cli(recipe, recipe_path=str(setup["recipe"]), checkpoint=setup["checkpoint"],
                                multiscale=False, scales=None, flip=None, mode=None, crop=None, stride=None,
                                merge=None, split=None, json_out=None, save_pred=save_pred,
                                pred_format_name=pred_format)
    return run_evaluation(recipe, opts)


def test_cityscapes_eval_files_are_found_and_scored_like_the_official_script(cityscapes, tmp_path):
    report = _evaluate(cityscapes, tmp_path / "results", "cityscapes")
    label_ids = np.asarray(CITYSCAPES_TRAINID_TO_LABELID)
    intersection, union = np.zeros(19, np.int64), np.zeros(19, np.int64)
    for gt_file in cityscapes["gt"]:
        pred = official_prediction(gt_file, tmp_path / "results")
        assert set(np.unique(pred)) <= set(label_ids.tolist())  # label ids, none of them void, all within 0..33
        gt = cv2.imread(str(gt_file), cv2.IMREAD_UNCHANGED)
        scored = np.isin(gt, label_ids)  # the official script's false positives skip void ground truth too
        for t, lid in enumerate(label_ids):
            intersection[t] += np.count_nonzero((gt == lid) & (pred == lid))
            union[t] += np.count_nonzero(scored & ((gt == lid) | (pred == lid)))
    assert [c["intersection"] for c in report["per_class"]] == intersection.tolist()
    assert [c["pixels"] + c["predicted"] - c["intersection"] for c in report["per_class"]] == union.tolist()
    assert sum(c["predicted"] > 0 for c in report["per_class"]) >= 3  # a model that predicts several classes
    assert sorted(p.name for p in (tmp_path / "results").iterdir()) == sorted(
        g.name.replace("_gtFine_labelIds", "_labelIds") for g in cityscapes["gt"])


def test_train_ids_stay_the_default_and_are_what_the_official_script_cannot_read(cityscapes, tmp_path):
    _evaluate(cityscapes, tmp_path / "train-ids", None)
    _evaluate(cityscapes, tmp_path / "cs", "cityscapes")
    for gt_file in cityscapes["gt"]:
        train_ids = official_prediction(gt_file, tmp_path / "train-ids")  # <key>.png: found, but train ids
        assert train_ids.max() < 19
        label_ids = official_prediction(gt_file, tmp_path / "cs")
        assert np.array_equal(label_ids, np.asarray(CITYSCAPES_TRAINID_TO_LABELID, np.uint8)[train_ids])


def _cli(*args):
    from anncli.cli.main import app

    return CliRunner().invoke(app, [str(a) for a in args])


def test_predict_cityscapes_keeps_pictures_out_of_the_results_folder(cityscapes, tmp_path):
    images = cityscapes["base"] / "cityscapes" / "leftImg8bit" / "val"
    results = tmp_path / "results"
    ok = _cli("predict", images, "--checkpoint", cityscapes["checkpoint"], "--format", "cityscapes", "--out", results,
              "--colors", tmp_path / "colors", "--overlay", tmp_path / "overlay")
    assert ok.exit_code == 0, ok.output
    for gt_file in cityscapes["gt"]:
        assert set(np.unique(official_prediction(gt_file, results))) <= set(CITYSCAPES_TRAINID_TO_LABELID)
    assert len(list((tmp_path / "colors").glob("*_color.png"))) == len(list((tmp_path / "overlay").iterdir())) == 4
    # The pictures inside the results folder would be second matches for the official script: refused.
    bad = _cli("predict", images, "--checkpoint", cityscapes["checkpoint"], "--format", "cityscapes", "--out",
               tmp_path / "r2", "--colors", tmp_path / "r2" / "colors")
    assert bad.exit_code == 2 and "--colors" in bad.output and "inside --out" in bad.output, bad.output
    assert not (tmp_path / "r2" / "colors").exists()
    # train-ids keeps today's three files side by side.
    plain = _cli("predict", images, "--checkpoint", cityscapes["checkpoint"], "--out", tmp_path / "plain")
    assert plain.exit_code == 0, plain.output
    assert len(list((tmp_path / "plain").iterdir())) == 12


def test_bad_format_options_are_one_line_with_exit_2(cityscapes, tmp_path):
    synth = _recipe(tmp_path / "synth.yaml", "synth", 5, tmp_path / "none")
    checkpoint = write_checkpoint(tmp_path / "run", synth)
    cases = [
        ([synth, "--checkpoint", checkpoint, "--save-pred", tmp_path / "p", "--pred-format", "cityscapes"],
         "--pred-format cityscapes needs a 19-class cityscapes model (this one: synth, 5 classes)"),
        ([synth, "--checkpoint", checkpoint, "--save-pred", tmp_path / "p", "--pred-format", "labelids"],
         "--pred-format 'labelids': expected one of train-ids, cityscapes, ade20k"),
        ([cityscapes["recipe"], "--checkpoint", cityscapes["checkpoint"], "--pred-format", "cityscapes"],
         "--pred-format cityscapes: give --save-pred DIR too"),
    ]
    for args, message in cases:
        result = _cli("eval", *args)
        assert result.exit_code == 2, result.output
        assert result.output.strip().splitlines()[-1] == f"ann: error: {message}"


def fake_ade20k(root: Path, count: int) -> None:
    rng = np.random.default_rng(5)
    base = root / "ADEChallengeData2016"
    for i in range(count):
        key = f"ADE_val_{i + 1:08d}"
        _png(base / "images" / "validation" / f"{key}.jpg", rng.integers(0, 256, size=(H, W, 3), dtype=np.uint8))
        _png(base / "annotations" / "validation" / f"{key}.png", rng.integers(0, 151, size=(H, W), dtype=np.uint8))


def test_ade20k_files_hold_1_to_150_named_like_the_images(tmp_path):
    torch.set_num_threads(1)
    fake_ade20k(tmp_path / "ade", 2)
    pack_dataset("ade20k", tmp_path / "ade", tmp_path / "data", split="validation")
    recipe = _recipe(tmp_path / "ade.yaml", "ade20k", 150, tmp_path / "data")
    setup = {"recipe": recipe, "checkpoint": write_checkpoint(tmp_path / "run", recipe)}
    _evaluate(setup, tmp_path / "train-ids", None)
    _evaluate(setup, tmp_path / "server", "ade20k")
    names = sorted(p.name for p in (tmp_path / "server").iterdir())
    assert names == ["ADE_val_00000001.png", "ADE_val_00000002.png"]
    for name in names:
        server = np.array(Image.open(tmp_path / "server" / name))
        train_ids = np.array(Image.open(tmp_path / "train-ids" / name))
        assert server.min() >= 1 and server.max() <= 150 and np.array_equal(server, train_ids + 1)
    # ann predict names each file after its image, as the scene-parsing server wants.
    images = tmp_path / "ade" / "ADEChallengeData2016" / "images" / "validation"
    ok = _cli("predict", images, "--checkpoint", setup["checkpoint"], "--format", "ade20k", "--out", tmp_path / "p")
    assert ok.exit_code == 0, ok.output
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == names
    assert np.array_equal(np.array(Image.open(tmp_path / "p" / names[0])),
                          np.array(Image.open(tmp_path / "server" / names[0])))


def test_onnx_model_writes_cityscapes_label_ids_like_the_checkpoint(cityscapes, tmp_path):
    pytest.importorskip("onnxruntime")
    model = tmp_path / "cs.onnx"
    exported = run_ann("export", "--checkpoint", cityscapes["checkpoint"], "--out", model, "--size", f"{H}x{W}")
    assert exported.returncode == 0, exported.stderr[-3000:]
    images = cityscapes["base"] / "cityscapes" / "leftImg8bit" / "val"
    res = run_ann("predict", images, "--model", model, "--format", "cityscapes", "--out", tmp_path / "onnx",
                  "--colors", tmp_path / "colors")
    assert res.returncode == 0, res.stderr[-3000:]
    eager = _cli("predict", images, "--checkpoint", cityscapes["checkpoint"], "--format", "cityscapes",
                 "--out", tmp_path / "eager")
    assert eager.exit_code == 0, eager.output
    for gt_file in cityscapes["gt"]:
        via_onnx = official_prediction(gt_file, tmp_path / "onnx")
        assert (via_onnx == official_prediction(gt_file, tmp_path / "eager")).mean() >= 0.999
    assert len(list((tmp_path / "colors").iterdir())) == 4


def test_an_onnx_file_without_a_dataset_name_is_known_by_its_classes():
    from anncli.data.datasets import class_names
    from anncli.eval.onnx_predict import model_dataset

    assert model_dataset({"classes": class_names("cityscapes")}) == "cityscapes"
    assert model_dataset({"classes": class_names("ade20k")}) == "ade20k"
    assert model_dataset({"classes": ["a", "b"]}) == "unknown"
    assert model_dataset({"dataset": "cityscapes", "classes": []}) == "cityscapes"
