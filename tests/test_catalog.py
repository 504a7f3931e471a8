"""The built-in recipes and templates (anncli/catalog.py): the repo's files, found by name, listed, copied out."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from anncli import catalog
from anncli.errors import UserError
from anncli.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]


def test_the_package_reads_the_repos_recipes_and_templates_not_a_copy():
    for ours, source in ((catalog.RECIPES, ROOT / "recipes"), (catalog.TEMPLATES, ROOT / "slurm")):
        assert ours.resolve() == source.resolve()
    assert catalog.builtin_names() == sorted(p.stem for p in (ROOT / "recipes").glob("*.yaml"))
    assert {"demo", "demo-fcn", "cityscapes", "ade20k", "pascal_context"} <= set(catalog.builtin_names())
    assert catalog.SLURM not in catalog.builtin_names()  # `ann recipes copy slurm` means the templates


def test_a_builtin_recipe_is_found_by_name_with_or_without_its_suffix():
    assert catalog.builtin_recipe("demo") == catalog.RECIPES / "demo.yaml"
    assert catalog.builtin_recipe("demo.yaml") == catalog.RECIPES / "demo.yaml"
    for bad in ("nope", "recipes/demo", "../recipes/demo"):
        with pytest.raises(UserError, match=r"no built-in recipe .*built-in recipes: .*\bdemo\b"):
            catalog.builtin_recipe(bad)


def test_a_bare_name_is_the_builtin_recipe_unless_a_file_of_that_name_exists(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path, note = catalog.resolve_recipe(Path("demo"))
    assert path == catalog.RECIPES / "demo.yaml" and "built-in" in note and "\n" not in note
    (tmp_path / "cityscapes").mkdir()  # a dataset folder of that name is no recipe file
    assert catalog.resolve_recipe("cityscapes")[0] == catalog.RECIPES / "cityscapes.yaml"
    (tmp_path / "demo.yaml").write_text("name: mine\n")
    path, note = catalog.resolve_recipe("demo")
    assert path == catalog.RECIPES / "demo.yaml" and "./demo.yaml is not read" in note
    path, note = catalog.resolve_recipe("demo.yaml")  # the file wins, and the line says so
    assert path == Path("demo.yaml") and "the file ./demo.yaml" in note
    (tmp_path / "demo").write_text("name: mine\n")
    assert catalog.resolve_recipe("demo") == (Path("demo"), "recipe demo: the file ./demo, not the built-in recipe demo")


def test_paths_are_files_and_unknown_names_list_the_known_ones(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine.yaml").write_text("name: mine\n")
    assert catalog.resolve_recipe("mine.yaml") == (Path("mine.yaml"), None)  # no built-in involved: nothing said
    assert catalog.resolve_recipe("sub/demo.yaml") == (Path("sub/demo.yaml"), None)  # load_recipe says not found
    with pytest.raises(UserError) as err:
        catalog.resolve_recipe("cityscape")
    assert "\n" not in str(err.value) and "no built-in recipe" in str(err.value)
    assert all(name in str(err.value) for name in catalog.builtin_names())


def test_every_builtin_recipe_validates_and_the_table_says_what_it_trains():
    rows = {row[0]: row for row in catalog.recipe_rows()}
    assert set(rows) == set(catalog.builtin_names())
    assert rows["demo"][:6] == ("demo", "synth", "ann small", "64x128", "400", "1 x 16")
    assert rows["cityscapes"][:6] == ("cityscapes", "cityscapes", "ann r101-d8", "769x769", "60000", "8 x 1")
    assert rows["ann_r50-d8_4xb2-40k_cityscapes-512x1024"][2] == "ann r50-d8 (mmseg)"
    for name in catalog.builtin_names():
        load_recipe(catalog.RECIPES / f"{name}.yaml")
    table = catalog.recipe_table().splitlines()
    assert table[0].split() == ["NAME", "DATASET", "MODEL", "CROP", "ITERATIONS", "GPUS", "x", "BATCH"]
    assert "cityscapes = ann_r101-d8_8xb1-60k_cityscapes-769x769" in table[-1]


def test_copy_writes_the_recipe_and_never_overwrites_without_force(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    source = (ROOT / "recipes" / "cityscapes.yaml").read_bytes()
    assert catalog.copy_recipe("cityscapes") == [Path("cityscapes.yaml")]
    assert (tmp_path / "cityscapes.yaml").read_bytes() == source and not (tmp_path / "cityscapes.yaml").is_symlink()
    with pytest.raises(UserError, match="exists; pass --force"):
        catalog.copy_recipe("cityscapes")
    (tmp_path / "cityscapes.yaml").write_text("edited")
    catalog.copy_recipe("cityscapes", force=True)
    assert (tmp_path / "cityscapes.yaml").read_bytes() == source
    (tmp_path / "mine").mkdir()
    assert catalog.copy_recipe("demo", Path("mine")) == [Path("mine/demo.yaml")]
    with pytest.raises(UserError, match="does not exist; create it first"):  # like --json and --out: no folder made
        catalog.copy_recipe("demo", Path("new/dir/my-demo.yaml"))
    with pytest.raises(UserError, match="no built-in recipe 'nope'"):
        catalog.copy_recipe("nope")


def test_copy_slurm_writes_the_templates_executable(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    written = catalog.copy_recipe("slurm")
    assert sorted(p.name for p in written) == ["eval.sh", "train.sh"]
    for path in written:
        assert path.parent == Path("slurm") and os.access(path, os.X_OK)
        assert path.read_bytes() == (ROOT / "slurm" / path.name).read_bytes()
    assert [p.parent for p in catalog.copy_recipe("slurm", tmp_path / "jobs")] == [tmp_path / "jobs"] * 2
