"""`ann eval` without --split reads the recipe's data.val, a split name or a shard pattern, as validation in
training does; the data root has no `val` split at all, so reading one would fail."""

import json

import pytest
import torch
import yaml
from typer.testing import CliRunner

from anncli.cluster.distributed import DistInfo
from anncli.eval.evaluate import validate
from anncli.eval.inference import load_model
from anncli.recipe import load_recipe

from test_eval_run import _counts, _expected_names, write_checkpoint, write_recipe, write_split

SIZES = [2, 1, 2]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    torch.set_num_threads(1)
    base = tmp_path_factory.mktemp("split")
    write_split(base / "data", "holdout", SIZES)
    return base


@pytest.mark.parametrize("val", ["holdout", "synth-holdout-{000000..000002}.tar", "synth-holdout.json"])
def test_eval_without_split_reads_the_recipes_data_val(data, tmp_path, val):
    from anncli.cli.main import app

    recipe_path = write_recipe(tmp_path / "recipe.yaml", data / "data")
    tree = yaml.safe_load(recipe_path.read_text())
    tree["data"]["val"] = val
    recipe_path.write_text(yaml.safe_dump(tree))
    checkpoint = write_checkpoint(tmp_path / "run", recipe_path)
    assert not (data / "data" / "synth-val.json").exists()

    result = CliRunner().invoke(app, ["eval", str(recipe_path), "--checkpoint", str(checkpoint),
                                      "--json", str(tmp_path / "m.json")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "m.json").read_text())
    assert report["split"] == val and report["samples"] == sum(SIZES)
    assert [c["name"] for c in report["per_class"]] == _expected_names()

    recipe = load_recipe(recipe_path)  # validation in training reads the same samples
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    metrics = validate(load_model(recipe, checkpoint, info.device), recipe, info)
    assert metrics["samples"] == sum(SIZES) and _counts(metrics) == _counts(report)
