"""The synthetic set is the one the recipe asks for, evaluating a checkpoint without a recipe never writes
data where the checkpoint's recipe says, and labels outside model.num_classes are named in training and
counted in evaluation."""

import json
import re

import numpy as np
import pytest
import yaml

from anncli.data.manifest import read_manifest, resolve_urls
from anncli.data.shards import eval_samples
from anncli.data.synth import ensure_synth, write_synth
from anncli.recipe import SynthConfig
from conftest import run_ann, tiny_overrides
from test_eval_choose import _cli
from test_eval_run import write_checkpoint, write_recipe, write_split


def test_a_set_made_from_other_parameters_is_replaced_and_says_so(tmp_path, capsys):
    root = tmp_path / "synth"
    write_synth(root, train=6, val=3, size="32x64", seed=0, max_samples=4, verbose=False)  # a small trial's set
    cfg = SynthConfig(train=10, val=3, size=(32, 64), seed=0, max_samples=4)
    assert ensure_synth(str(root), cfg) is True
    line = capsys.readouterr().out.strip()
    assert line.startswith("replacing a synthetic set made from 6 train, 3 val, 32x64, seed 0") and "10 train" in line
    manifest = read_manifest(root, "synth", "train")
    assert manifest["total"] == 10 and manifest["made_from"]["train"] == 10
    assert ensure_synth(str(root), cfg) is False  # the same parameters: kept, nothing printed
    assert capsys.readouterr().out == ""
    other_seed = cfg.model_copy(update={"seed": 1})
    assert ensure_synth(str(root), other_seed) is True
    assert read_manifest(root, "synth", "val")["made_from"]["seed"] == 1


def test_eval_without_a_recipe_never_writes_where_the_checkpoint_says(tmp_path):
    elsewhere = tmp_path / "chosen-by-the-checkpoint"
    recipe = write_recipe(tmp_path / "recipe.yaml", elsewhere)
    tree = yaml.safe_load(recipe.read_text())
    tree["data"]["synth"] = {"train": 4, "val": 3, "size": [32, 64], "max_samples": 4}
    tree["model"]["num_classes"] = 5
    recipe.write_text(yaml.safe_dump(tree))
    checkpoint = write_checkpoint(tmp_path / "run", recipe)
    res = _cli("eval", "--checkpoint", checkpoint)
    assert res.exit_code == 2, res.output[-2000:]
    assert "data.root of the checkpoint's recipe" in res.output and str(elsewhere) in res.output
    assert "evaluating without a recipe never writes data" in res.output
    assert not elsewhere.exists()
    res = _cli("eval", recipe, "--checkpoint", checkpoint)  # the user names the recipe: its set is made
    assert res.exit_code == 0, res.output[-2000:]
    assert read_manifest(elsewhere, "synth", "val")["total"] == 3


def test_data_synth_never_replaces_a_set_without_force_nor_writes_an_empty_one(tmp_path):
    out = tmp_path / "s"
    assert _cli("data", "synth", out, "--train", 3, "--val", 2, "--size", "32x64").exit_code == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    res = _cli("data", "synth", out, "--train", 5, "--val", 2, "--size", "32x64")
    assert res.exit_code == 2, res.output
    assert (f"{out} holds a synthetic set already (synth-train-000000.tar, synth-train.json, synth-val-000000.tar "
            "and 1 more); pass --force to replace it") in res.output
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    res = _cli("data", "synth", out, "--train", 5, "--val", 2, "--size", "32x64", "--force")
    assert res.exit_code == 0, res.output
    assert read_manifest(out, "synth", "train")["total"] == 5
    res = _cli("data", "synth", tmp_path / "empty", "--train", 0, "--val", 0)
    assert res.exit_code == 2 and "would hold no sample" in res.output, res.output
    assert not (tmp_path / "empty").exists()


def test_making_the_recipes_set_never_overwrites_files_it_did_not_write(tmp_path):
    """The user put a shard and a manifest of their own (no made_from record) where data.synth points:
    `ann eval RECIPE` refuses to make the set over them, in one line, and leaves them as they were."""
    root = tmp_path / "synth"
    write_split(root, "val", [2])
    theirs = {p.name: p.read_bytes() for p in root.iterdir()}
    recipe = write_recipe(tmp_path / "recipe.yaml", root)
    tree = yaml.safe_load(recipe.read_text())
    tree["data"]["synth"] = {"train": 4, "val": 3, "size": [32, 64], "max_samples": 4}
    recipe.write_text(yaml.safe_dump(tree))
    res = _cli("eval", recipe, "--checkpoint", write_checkpoint(tmp_path / "run", recipe))
    assert res.exit_code == 2, res.output[-2000:]
    assert f"{root} holds synth-val-000000.tar, synth-val.json, which no synthetic set of `ann` lists" in res.output
    assert {p.name: p.read_bytes() for p in root.iterdir()} == theirs


# ---------------------------------------------------------------- labels outside model.num_classes


@pytest.mark.slow  # two real gloo ranks: about a minute on a loaded 2-core machine
def test_training_on_labels_outside_the_classes_stops_in_one_line(synth_root, tmp_path):
    """The 5-class synthetic set trained as 3 classes on 2 real gloo ranks."""
    res = run_ann("train", "recipes/demo.yaml", "--work-dir", tmp_path / "run", "--nproc-per-node", 2,
                  *tiny_overrides(synth_root, **{"model.num_classes": 3, "data.num_workers": 0}))
    assert res.returncode == 2, res.stderr[-3000:]
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    lines = [line for line in res.stderr.splitlines() if "is outside model.num_classes=3" in line]
    assert lines and re.search(r"synth-train-\d{6}\.tar: sample synth_train_\d{6}: label value [34] ", lines[0]), lines


def test_eval_counts_and_reports_labels_outside_the_classes(tmp_path):
    write_split(tmp_path / "data", "val", [3])  # labels 0..4
    recipe = write_recipe(tmp_path / "recipe.yaml", tmp_path / "data", num_classes=3)
    checkpoint = write_checkpoint(tmp_path / "run", recipe)
    res = _cli("eval", recipe, "--checkpoint", checkpoint, "--json", tmp_path / "m.json")
    assert res.exit_code == 0, res.output[-2000:]
    report = json.loads((tmp_path / "m.json").read_text())
    labels = np.concatenate([s["label"].ravel() for s in eval_samples(
        resolve_urls(str(tmp_path / "data"), "synth", "val"), rank=0, world_size=1)])
    expected = int(((labels >= 3) & (labels != 255)).sum())
    assert expected > 0 and report["pixels_outside_classes"] == expected
    assert f"{expected:,} labelled pixels have values outside model.num_classes=3" in res.output
