"""The named tables (anncli/interop/zoo.py) are well formed and the README shows them as they are; no network."""

import re
from urllib.parse import urlsplit

import yaml

from anncli.interop import zoo
from anncli.interop.cache import file_for, hash_prefix
from conftest import ROOT

ENTRIES = [*zoo.BACKBONES, *zoo.ZOO]


def test_every_entry_is_an_https_file_of_openmmlab_whose_name_carries_its_hash():
    assert [e.name for e in zoo.BACKBONES] == ["open-mmlab://resnet50_v1c", "open-mmlab://resnet101_v1c"]
    assert len(zoo.ZOO) == 16 and len({e.name for e in ENTRIES}) == len(ENTRIES)
    for entry in ENTRIES:
        parts = urlsplit(entry.url)
        assert parts.scheme == "https" and parts.netloc == "download.openmmlab.com" and not parts.query, entry
        prefix = hash_prefix(entry.url)
        assert prefix is not None and re.fullmatch(r"[0-9a-f]{8}", prefix), entry
        assert entry.sha256 is None or (re.fullmatch(r"[0-9a-f]{64}", entry.sha256) and entry.sha256.startswith(prefix))
        assert file_for(entry.url).name == parts.path.rsplit("/", 1)[1]
        assert entry.name.startswith(zoo.SCHEMES) and zoo.named(entry.name) == entry


def test_every_zoo_row_names_a_recipe_of_its_own_config():
    for entry in zoo.ZOO:
        config = entry.name[len(zoo.MMSEG):]
        assert f"/{config}/{config}_20" in entry.url, entry
        recipe = yaml.safe_load((ROOT / "recipes" / f"{entry.recipe}.yaml").read_text())
        depth, crop, iters, data = re.fullmatch(r"ann_r(\d+)-d8_(\d+x\d+)_(\d+)k_(\w+)", config).groups()
        assert recipe["name"] == entry.recipe and recipe["model"]["variant"] == "mmseg"
        assert recipe["model"]["backbone"] == f"resnet{depth}" and recipe["data"]["dataset"] == data
        assert recipe["train"]["iters"] == int(iters) * 1000
        assert "x".join(map(str, recipe["augment"]["crop"])) == crop
        assert 30 < entry.miou < entry.miou_ms_flip < 90
        assert zoo.named(zoo.MMSEG + entry.recipe) == entry  # the recipe's name finds the row too


def test_the_readme_table_is_the_code_table():
    rows = [line for line in (ROOT / "README.md").read_text().splitlines()
            if re.match(r"\| `(open-mmlab|mmseg)://[a-z0-9_.-]+` \|", line)]
    shown = [[cell.strip().strip("`") for cell in line.strip("|").split("|")] for line in rows]
    expected = [[e.name, e.recipe or "backbone of the `ann_r*-d8_4xb*` recipes",
                 "-" if e.miou is None else f"{e.miou:.2f}", "-" if e.miou_ms_flip is None else f"{e.miou_ms_flip:.2f}",
                 e.url, hash_prefix(e.url)] for e in ENTRIES]
    assert shown == expected
