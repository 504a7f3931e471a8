"""The recipe schema: every shipped recipe validates; bad input is one line with the dotted key."""

import subprocess
import sys
from pathlib import Path

import pytest

from anncli.recipe import load_recipe, recipe_to_yaml
from anncli.recipe_yaml import RecipeError

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_shipped_recipe_validates(path):
    recipe = load_recipe(path)
    assert recipe.name
    # The resolved recipe round-trips through YAML unchanged.
    again = path.parent / "__roundtrip__.yaml"
    try:
        again.write_text(recipe_to_yaml(recipe))
        assert load_recipe(again) == recipe
    finally:
        again.unlink()


def test_official_cityscapes_values():
    r = load_recipe(ROOT / "recipes/cityscapes.yaml")
    assert (r.train.iters, r.train.batch_size * r.train.world_size, r.augment.crop) == (60000, 8, (769, 769))
    assert (r.optim.name, r.optim.lr, r.optim.weight_decay, r.optim.poly_power) == ("sgd", 0.01, 5e-4, 0.9)
    assert (r.loss.ohem_thresh, r.loss.ohem_min_kept, r.loss.aux_weight) == (0.7, 100000, 0.4)
    assert len(r.loss.class_weights) == 19 and r.model.norm == "syncbn"
    ade = load_recipe(ROOT / "recipes/ade20k.yaml")
    assert (ade.augment.crop, ade.effective_batch, ade.optim.lr, ade.optim.weight_decay, ade.train.iters) == (
        (520, 520), 16, 0.02, 1e-4, 150000)
    ctx = load_recipe(ROOT / "recipes/pascal_context.yaml")
    assert (ctx.augment.crop, ctx.effective_batch, ctx.optim.lr, ctx.train.iters, ctx.model.num_classes) == (
        (480, 480), 16, 0.01, 28000, 59)


def _write(tmp_path, text):
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return p


def test_unknown_key_names_file_and_dotted_key(tmp_path):
    p = _write(tmp_path, "name: x\ntrain:\n  iterz: 5\n")
    with pytest.raises(RecipeError, match=r"r\.yaml: train\.iterz: unknown key"):
        load_recipe(p)


def test_wrong_type_and_bad_value(tmp_path):
    with pytest.raises(RecipeError, match=r"train\.iters: .*'many'"):
        load_recipe(_write(tmp_path, "name: x\ntrain:\n  iters: many\n"))
    with pytest.raises(RecipeError, match=r"engine: "):
        load_recipe(_write(tmp_path, "name: x\nengine: horovod\n"))
    with pytest.raises(RecipeError, match=r"class_weights: 2 weights for model.num_classes=19"):
        load_recipe(_write(tmp_path, "name: x\nloss:\n  class_weights: [1, 2]\n"))


def test_overrides_are_yaml_typed(tmp_path):
    p = _write(tmp_path, "name: x\n")
    r = load_recipe(p, ["train.iters=100", "model.aux=false", "augment.crop=[32, 64]", "engine=deepspeed"])
    assert (r.train.iters, r.model.aux, r.augment.crop, r.engine) == (100, False, (32, 64), "deepspeed")
    with pytest.raises(RecipeError, match="expected KEY=VALUE"):
        load_recipe(p, ["train.iters"])
    with pytest.raises(RecipeError, match=r"train\.nope: unknown key"):
        load_recipe(p, ["train.nope=1"])


def test_invalid_yaml_and_missing_file(tmp_path):
    with pytest.raises(RecipeError, match="not valid YAML at line"):
        load_recipe(_write(tmp_path, "name: x\ntrain: [\n"))
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe(tmp_path / "missing.yaml")


def _ann(*args):
    return subprocess.run([sys.executable, "-m", "anncli", *args], capture_output=True, text=True, cwd=ROOT)


def test_cli_reports_one_line_and_exit_2(tmp_path):
    p = _write(tmp_path, "name: x\nmodel:\n  num_classes: -3\n")
    res = _ann("recipe", "validate", str(p))
    assert res.returncode == 2
    assert res.stderr.strip().count("\n") == 0 and "model.num_classes" in res.stderr
    assert "Traceback" not in res.stderr
    shown = _ann("recipe", "show", "recipes/demo.yaml", "--set", "train.iters=7")
    assert shown.returncode == 0 and "iters: 7" in shown.stdout


@pytest.mark.parametrize("content, message", [
    (b"name: x\ntrain:\n  iters: 10 # caf\xe9\n", "not UTF-8 text"),
    (b"", "the recipe is empty"),
    (b"# only a comment\n", "the recipe is empty"),
    (b"name: x\ntrain:\n  iters: 10\n  iters: 20\n", "key 'iters' given twice (line 4)"),
    (b"name: x\ntrain:\n  iters: 10\ntrain:\n  seed: 1\n", "key 'train' given twice (line 4)"),
])
def test_unreadable_empty_or_ambiguous_recipes_are_one_line_and_exit_2(tmp_path, content, message):
    p = tmp_path / "bad.yaml"
    p.write_bytes(content)
    res = _ann("train", str(p), "--dry-run")
    assert res.returncode == 2, res.stdout[-2000:]
    assert res.stderr.strip().count("\n") == 0 and "Traceback" not in res.stderr
    assert str(p) in res.stderr and message in res.stderr
