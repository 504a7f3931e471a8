"""The official Cityscapes evaluation scores ann's files as `ann eval` scores them, with no hand work.

A tree in the real layout (labelIds with void ids, instanceIds) is packed with `ann data pack cityscapes`,
trained a few steps, evaluated with `ann eval --save-pred --pred-format cityscapes` and segmented with
`ann predict --format cityscapes`; cityscapesscripts' evalPixelLevelSemanticLabeling then reads each results
folder as it would on a real Cityscapes tree, run by the command the README gives
(`python -m anncli.eval.cityscapes_official`) in this environment's numpy, with nothing patched by the test,
into a CITYSCAPES_EXPORT_DIR that does not exist yet. Needs `pip install 'anncli[cityscapes]'`; skipped
without it.
"""

import json
import math
import subprocess
import sys

import pytest
import yaml

from anncli.data.datasets import CITYSCAPES_CLASSES

from conftest import ROOT, ann_env, run_ann
from test_pred_formats import fake_cityscapes

pytest.importorskip("cityscapesscripts.evaluation.evalPixelLevelSemanticLabeling")
pytestmark = pytest.mark.slow

def official_scores(dataset, results, export) -> dict:
    """The README's command, as a user runs it: the environment variables and nothing else."""
    assert not export.exists()  # the command makes it
    env = ann_env(CITYSCAPES_DATASET=str(dataset), CITYSCAPES_RESULTS=str(results), CITYSCAPES_EXPORT_DIR=str(export))
    res = subprocess.run([sys.executable, "-m", "anncli.eval.cityscapes_official"], capture_output=True, text=True,
                         env=env, cwd=ROOT, timeout=600)
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    return json.loads((export / "resultPixelLevelSemanticLabeling.json").read_text())


def _recipe(path, data):
    tree = yaml.safe_load((ROOT / "recipes" / "demo.yaml").read_text())
    tree["name"] = "cityscapes-official"
    tree["model"].update(num_classes=19, norm="bn", key_channels=8, value_channels=16)
    tree["data"] = {"dataset": "cityscapes", "root": str(data), "train": "train", "val": "val", "num_workers": 0}
    tree["augment"]["crop"] = [32, 64]
    tree["train"].update(iters=40, batch_size=4, checkpoint_every=40, log_every=10, val_every=0)
    tree["optim"]["lr"] = 0.01
    path.write_text(yaml.safe_dump(tree))
    return path


def _same(ours, official) -> bool:
    if ours is None or math.isnan(ours):
        return math.isnan(official)
    return official == pytest.approx(ours, rel=1e-12, abs=1e-15)


def test_the_official_script_scores_our_files_as_ann_eval_does(tmp_path):
    cityscapes = tmp_path / "cityscapes"
    fake_cityscapes(cityscapes, "train", frames=8, seed=1)
    fake_cityscapes(cityscapes, "val", frames=4, seed=2)
    for split in ("train", "val"):
        packed = run_ann("data", "pack", "cityscapes", cityscapes, tmp_path / "data", "--split", split)
        assert packed.returncode == 0, packed.stderr[-3000:]
    recipe = _recipe(tmp_path / "recipe.yaml", tmp_path / "data")
    trained = run_ann("train", recipe, "--work-dir", tmp_path / "run")
    assert trained.returncode == 0, trained.stderr[-3000:]

    evaluated = run_ann("eval", recipe, "--work-dir", tmp_path / "run", "--json", tmp_path / "m.json",
                        "--save-pred", tmp_path / "results", "--pred-format", "cityscapes")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    ours = json.loads((tmp_path / "m.json").read_text())
    official = official_scores(cityscapes, tmp_path / "results", tmp_path / "export-eval")
    assert _same(ours["mIoU"], official["averageScoreClasses"]), (ours["mIoU"], official["averageScoreClasses"])
    for row in ours["per_class"]:
        assert _same(row["IoU"], official["classScores"][row["name"]]), row["name"]
    assert [row["name"] for row in ours["per_class"]] == CITYSCAPES_CLASSES
    assert sum(row["predicted"] > 0 for row in ours["per_class"]) >= 5  # a model that predicts many classes

    predicted = run_ann("predict", cityscapes / "leftImg8bit" / "val", "--checkpoint",
                        ours["checkpoint"], "--format", "cityscapes", "--out", tmp_path / "predicted",
                        "--colors", tmp_path / "colors", "--overlay", tmp_path / "overlay")
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    again = official_scores(cityscapes, tmp_path / "predicted", tmp_path / "export-predict")
    assert again["averageScoreClasses"] == official["averageScoreClasses"]
