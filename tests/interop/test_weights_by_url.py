"""The commands that read weights take URLs and names: `model.pretrained`, `--init-from`, `ann weights import`,
`ann eval --checkpoint`, and the `--dry-run` plan says what it will fetch. Files come from a real HTTP
server on 127.0.0.1 (weights_server.py); zoo names are served from a cache filled beforehand, offline.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
import yaml

from conftest import tiny_overrides
from test_fetch import ann, cache_path, hashed_name, one_line
from test_weights import FINETUNE, peer_file, write_set
from weights_server import WeightsServer

ROW = "mmseg://ann_r50-d8_512x1024_40k_cityscapes"  # the zoo row a cache filled beforehand holds
ROW_URL = ("https://download.openmmlab.com/mmsegmentation/v0.5/ann/ann_r50-d8_512x1024_40k_cityscapes/"
           "ann_r50-d8_512x1024_40k_cityscapes_20200605_095211-049fc292.pth")


def small_backbone_file() -> bytes:
    """The demo recipe's backbone (`small`) as an ImageNet-style state dict, random but seeded."""
    from anncli.models.ann import build_model
    from anncli.recipe import load_recipe

    backbone = build_model(load_recipe("recipes/demo.yaml").model).backbone
    g = torch.Generator().manual_seed(7)
    state = {k: torch.randn(v.shape, generator=g) if v.is_floating_point() else v
             for k, v in backbone.state_dict().items()}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def train_args(synth_root: Path, work_dir: Path, url: str, *extra: str) -> list[str]:
    sets = tiny_overrides(synth_root, **{"train.iters": 1, "train.checkpoint_every": 1, "optim.lr": 1e-12,
                                         "optim.weight_decay": 0.0, "model.pretrained": url})
    return ["train", "recipes/demo.yaml", *sets, "--work-dir", str(work_dir), *extra]


def test_training_takes_model_pretrained_from_a_url_then_from_the_cache(synth_root, tmp_path, monkeypatch):
    server = WeightsServer()
    data = small_backbone_file()
    url = server.add(hashed_name("small", data), data)
    cache = tmp_path / "cache"
    final = cache_path(cache, url, monkeypatch)
    try:
        plan = ann(*train_args(synth_root, tmp_path / "plan", url, "--dry-run"), cache=cache)
        assert plan.returncode == 0, plan.stderr
        assert f"model.pretrained {url}: not cached; fetch {url} into {final}" in plan.stdout
        assert server.gets == []  # a plan fetches nothing
        first = ann(*train_args(synth_root, tmp_path / "a", url), cache=cache, timeout=600)
        assert first.returncode == 0, first.stderr
    finally:
        server.stop()
    trained = torch.load(tmp_path / "a" / "checkpoints" / "step-000001" / "model.pt", weights_only=True)
    source = torch.load(io.BytesIO(data), weights_only=True)
    params = [k for k in source if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    for key in params:  # lr 1e-12: the backbone's weights are the file's
        assert torch.allclose(trained["backbone." + key], source[key], atol=1e-6), key
    assert len(server.gets) == 1
    plan = ann(*train_args(synth_root, tmp_path / "plan", url, "--dry-run"), cache=cache)
    assert f"model.pretrained {url}: cached, {final}" in plan.stdout
    second = ann(*train_args(synth_root, tmp_path / "b", url), cache=cache, timeout=600)  # the server is gone
    assert second.returncode == 0, second.stderr
    assert f"model.pretrained {url}: {final}" in second.stderr and "downloaded" not in second.stderr


@pytest.fixture
def peer_server(tmp_path):
    """An mmseg ANN-R50 checkpoint (the fixture's weights, saved as mmseg saves them) at a URL."""
    server = WeightsServer()
    data = peer_file("mmseg", tmp_path / "peer.pth").read_bytes()
    server.add(hashed_name("ann_r50-mmseg", data), data)
    yield server, server.url(hashed_name("ann_r50-mmseg", data))
    server.stop()


def test_a_checkpoint_url_is_imported_once_for_weights_import_and_eval(peer_server, tmp_path):
    server, url = peer_server
    cache = tmp_path / "cache"
    imported = ann("weights", "import", "mmseg", url, "--out", tmp_path / "imported", cache=cache, timeout=600)
    assert imported.returncode == 0, imported.stderr
    state = json.loads((tmp_path / "imported" / "state.json").read_text())
    assert state["imported_from"]["source"] == url

    write_set(tmp_path / "data")
    recipe = yaml.safe_load((tmp_path / "imported" / "recipe.yaml").read_text())
    recipe["data"].update(dataset="synth", root=str(tmp_path / "data"), val="synth-val-000000.tar", num_workers=0)
    recipe["eval"] = {"scales": [1.0], "flip": False, "mode": "whole"}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    for attempt in range(2):
        result = ann("eval", tmp_path / "r.yaml", "--checkpoint", url, "--json", tmp_path / "m.json", cache=cache,
                     timeout=600)
        assert result.returncode == 0, result.stderr
        assert json.loads((tmp_path / "m.json").read_text())["samples"] == 3
        assert ("[ann] imported mmseg resnet50" in result.stderr) == (attempt == 0)  # once per recipe
    assert len(server.gets) == 1  # one download served the import and both evaluations


@pytest.mark.slow
def test_init_from_a_checkpoint_url_fine_tunes_from_its_weights(peer_server, synth_root, tmp_path):
    server, url = peer_server
    cache = tmp_path / "cache"
    sets = tiny_overrides(synth_root, **FINETUNE)
    tuned = ann("train", "recipes/demo.yaml", *sets, "--work-dir", tmp_path / "run", "--init-from", url,
                "--init-skip", "classifier", cache=cache, timeout=600)
    assert tuned.returncode == 0, tuned.stderr
    assert f"--init-from {url}: {cache}" in tuned.stderr and "skipped the classifiers" in tuned.stdout
    source = torch.load(next((cache / "checkpoints").glob("*/model.pt")), weights_only=True)
    trained = torch.load(tmp_path / "run" / "checkpoints" / "step-000001" / "model.pt", weights_only=True)
    key = "backbone.layer4.2.conv3.weight"  # lr 1e-12: still the file's
    assert torch.allclose(trained[key], source[key], atol=1e-6)
    assert len(server.gets) == 1


def test_zoo_names_resolve_to_their_rows_and_a_cache_filled_beforehand_offline(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    missing = ann("weights", "fetch", ROW, cache=cache, ANN_OFFLINE="1")
    one_line(missing, "ANN_OFFLINE", ROW_URL, str(cache_path(cache, ROW_URL, monkeypatch)), f"ann weights fetch {ROW}")
    final = cache_path(cache, ROW_URL, monkeypatch)  # as `ann weights fetch` leaves it on a login node
    final.parent.mkdir(parents=True)
    peer_file("mmseg", final)
    fetched = ann("weights", "fetch", ROW, cache=cache, ANN_OFFLINE="1")
    assert fetched.returncode == 0 and fetched.stdout.strip() == str(final), fetched.stderr
    listed = ann("weights", "fetch", "--list", cache=cache)
    row = next(line for line in listed.stdout.splitlines() if line.startswith(ROW + " "))
    assert row.split()[1:] == ["ann_r50-d8_4xb2-40k_cityscapes-512x1024", "77.40", "78.57", str(final)]

    out = tmp_path / "imported"
    imported = ann("weights", "import", "mmseg", ROW, "--out", out, cache=cache, ANN_OFFLINE="1", timeout=600)
    assert imported.returncode == 0, imported.stderr
    assert yaml.safe_load((out / "recipe.yaml").read_text())["name"] == "ann_r50-d8_4xb2-40k_cityscapes-512x1024"
    wrong = ann("eval", "recipes/cityscapes.yaml", "--checkpoint", ROW, cache=cache, ANN_OFFLINE="1", timeout=600)
    one_line(wrong, "model.variant official", "was trained with the recipe ann_r50-d8_4xb2-40k_cityscapes-512x1024")


def test_model_pretrained_with_another_scheme_is_refused_at_load(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: r\nmodel:\n  pretrained: ftp://example.org/r50.pth\n")
    one_line(ann("recipe", "validate", recipe, cache=tmp_path), "model.pretrained", "open-mmlab://NAME")


@pytest.mark.slow
def test_two_ranks_load_weights_their_launcher_fetched_once(synth_root, tmp_path):
    server = WeightsServer()
    try:
        data = small_backbone_file()
        url = server.add(hashed_name("small", data), data)
        result = ann(*train_args(synth_root, tmp_path / "run", url, "--nproc-per-node", "2"), cache=tmp_path / "cache",
                     timeout=600)
        assert result.returncode == 0, result.stderr
        # the node's launcher downloaded before starting the ranks; both ranks then read the cached file
        assert len(server.gets) == 1 and result.stderr.count("[ann] downloaded") == 1, result.stderr
    finally:
        server.stop()
