"""Weights from the peers: official MendelXu/ANN and mmsegmentation checkpoints through `ann weights import`.

tests/fixtures/{official,mmseg}-ann-r50.pt hold the peers' own forward passes (see their README in the
project's shared fixtures): a key list, a rule that rebuilds the weights, an input and the outputs.
"""

import json
import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import webdataset as wds
import yaml

from anncli import load_model
from anncli.models.ann import build_model
from anncli.models.segmentor import upsample_to
from anncli.models.attention import set_literal
from anncli.recipe import ModelConfig
from conftest import assert_close_to_reference, run_ann, tiny_overrides

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
BN_STATS = ("running_mean", "running_var", "num_batches_tracked")


def fixture(fmt: str) -> dict:
    return torch.load(FIXTURES / f"{fmt}-ann-r50.pt", weights_only=True)


def rebuild(fx: dict) -> dict:
    """The peer's state dict, rebuilt from the fixture's key list with its rule."""
    values = {}
    for i, (name, shape) in enumerate(fx["keys"]):
        g = torch.Generator().manual_seed(fx["seed"] + i)
        if name in fx["aliases"]:
            value = values[fx["aliases"][name]]
        elif name.endswith("num_batches_tracked"):
            value = torch.tensor(0)
        elif name.endswith(("running_mean", "running_var")):
            value = fx["bn_stats"][name]
        elif len(shape) >= 2:
            value = torch.randn(tuple(shape), generator=g) * (2 / math.prod(shape[1:])) ** 0.5
        else:
            value = 0.1 * torch.randn(tuple(shape), generator=g) + (1.0 if name.endswith(".weight") else 0.0)
        values[name] = value
    return values


def peer_file(fmt: str, path: Path, state: dict | None = None) -> Path:
    """The checkpoint wrapped exactly as the peer saves it."""
    state = rebuild(fixture(fmt)) if state is None else state
    if fmt == "official":  # torchcv, trained under DataParallel
        obj = {"state_dict": {"module." + k: v for k, v in state.items()}, "config_dict": {"epoch": 1}}
    else:
        obj = {"meta": {"mmseg_version": "1.2.2", "iter": 40000}, "state_dict": state,
               "optimizer": {"state": {}, "param_groups": []}}
    torch.save(obj, path)
    return path


@pytest.fixture(scope="module")
def imported(tmp_path_factory) -> dict:
    """Both fixtures imported once with the real CLI: {fmt: checkpoint directory}."""
    root = tmp_path_factory.mktemp("imported")
    out = {}
    for fmt in ("official", "mmseg"):
        src = peer_file(fmt, root / f"{fmt}.pth")
        result = run_ann("weights", "import", fmt, src, "--out", root / fmt)
        assert result.returncode == 0, result.stderr
        assert "resnet50, 19 classes" in result.stdout
        out[fmt] = root / fmt
    return out


def count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def meta_model(**cfg):
    with torch.device("meta"):
        return build_model(ModelConfig(**cfg))


def test_parameter_counts_match_mmseg_and_the_fixture_key_lists():
    assert count(meta_model(variant="mmseg", backbone="resnet101")) == 65_220_742
    assert count(meta_model(variant="mmseg", backbone="resnet50")) == 46_228_614
    for fmt in ("official", "mmseg"):
        fx = fixture(fmt)
        peer = sum(math.prod(s) for n, s in fx["keys"] if not n.endswith(BN_STATS) and n not in fx["aliases"])
        assert count(meta_model(variant=fmt, backbone="resnet50")) == peer
        # every tensor of the peer, BN statistics included, has a place of the same size in ours
        buffers = sum(math.prod(s) for n, s in fx["keys"] if n.endswith(BN_STATS) and n not in fx["aliases"])
        ours = meta_model(variant=fmt, backbone="resnet50")
        assert sum(b.numel() for b in ours.buffers()) == buffers


@pytest.mark.parametrize("fmt", ["official", "mmseg"])
def test_model_summary_counts_each_variant_as_its_peer_does(fmt):
    fx = fixture(fmt)
    peer = sum(math.prod(s) for n, s in fx["keys"] if not n.endswith(BN_STATS) and n not in fx["aliases"])
    result = run_ann("model", "summary", "--variant", fmt, "--backbone", "resnet50", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["variant"] == fmt and report["params"] == peer


def test_model_summary_refuses_a_variant_it_cannot_build():
    result = run_ann("model", "summary", "--variant", "mmseg", "--backbone", "small")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "--variant mmseg" in result.stderr and "resnet50" in result.stderr


@pytest.mark.parametrize("fmt", ["official", "mmseg"])
def test_imported_weights_reproduce_the_peer_outputs(imported, fmt):
    fx = fixture(fmt)
    model = load_model(imported[fmt])
    assert not model.training
    low = []  # the classifier's output at 1/8, before the resize
    handle = model.classifier.register_forward_hook(lambda module, args, out: low.append(out))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the fixtures were computed on one thread
    try:
        with torch.no_grad():
            main = model(fx["input"])
            c3 = model.backbone(fx["input"])[2]
            aux = model.aux_head(c3)
    finally:
        torch.set_num_threads(threads)
        handle.remove()
    assert_close_to_reference(main, fx["outputs"]["main"], what="main")
    if fmt == "official":
        # Computed literally (project, then pool; W, then the fuse concat), as the official code does; the
        # default exact savings differ from it by float rounding only (tests/models/test_attention_fused.py).
        set_literal(model)
        torch.set_num_threads(1)
        try:
            with torch.no_grad():
                assert_close_to_reference(model(fx["input"]), fx["outputs"]["main"], what="literal main")
        finally:
            torch.set_num_threads(threads)
        aux_full = upsample_to(aux, fx["input"].shape[-2:], align_corners=True)
        assert_close_to_reference(aux_full, fx["outputs"]["aux"], what="aux")
    else:
        assert_close_to_reference(aux, fx["outputs"]["aux_low"], what="aux_low")
        assert_close_to_reference(low[0], fx["outputs"]["main_low"], what="main_low")


def test_imported_directory_is_a_normal_checkpoint(imported):
    for fmt, path in imported.items():
        assert sorted(p.name for p in path.iterdir() if p.name != ".readers") == ["COMPLETE", "model.pt", "recipe.yaml", "state.json"]
        state = json.loads((path / "state.json").read_text())
        assert state["model"]["variant"] == fmt and state["model"]["num_classes"] == 19
        assert state["imported_from"]["format"] == fmt
        recipe = yaml.safe_load((path / "recipe.yaml").read_text())
        assert recipe["augment"]["bgr"] is (fmt == "official")


@pytest.mark.parametrize("fmt", ["official", "mmseg"])
def test_inspect_names_format_network_classes_and_parameters(tmp_path, fmt):
    result = run_ann("weights", "inspect", peer_file(fmt, tmp_path / "w.pth"))
    assert result.returncode == 0, result.stderr
    params = count(meta_model(variant=fmt, backbone="resnet50"))
    assert f"format:   {fmt}" in result.stdout
    assert "resnet50" in result.stdout and "classes:  19" in result.stdout
    assert f"params:   {params:,}" in result.stdout


def test_inspect_knows_imagenet_backbones(tmp_path):
    backbone = meta_model(variant="mmseg", backbone="resnet50").backbone
    state = {k: torch.zeros(v.shape, dtype=v.dtype) for k, v in backbone.state_dict().items()}
    state.update({"fc.weight": torch.zeros(1000, 2048), "fc.bias": torch.zeros(1000)})
    torch.save({"meta": {}, "state_dict": state}, tmp_path / "resnet50_v1c.pth")
    result = run_ann("weights", "inspect", tmp_path / "resnet50_v1c.pth")
    assert result.returncode == 0, result.stderr
    assert "mmseg-backbone" in result.stdout and "resnet50" in result.stdout
    assert f"params:   {count(backbone):,}" in result.stdout


def test_mmseg_variant_trains_from_resnet_v1c_imagenet_weights(tmp_path):
    """model.pretrained takes open-mmlab resnet*_v1c files (keys stem.*, layer*.*, fc.*)."""
    source = meta_model(variant="mmseg", backbone="resnet50").backbone
    g = torch.Generator().manual_seed(0)
    state = {k: torch.randn(v.shape, generator=g) if v.is_floating_point() else torch.zeros(v.shape, dtype=v.dtype)
             for k, v in source.state_dict().items()}
    state["fc.weight"] = torch.zeros(1000, 2048)
    torch.save({"meta": {}, "state_dict": state}, tmp_path / "resnet50_v1c.pth")
    model = build_model(ModelConfig(variant="mmseg", backbone="resnet50", pretrained=str(tmp_path / "resnet50_v1c.pth")))
    assert torch.equal(model.backbone.stem[0].weight, state["stem.0.weight"])
    assert torch.equal(model.backbone.layer4[2].conv3.weight, state["layer4.2.conv3.weight"])


def _one_line_error(result) -> str:
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_bad_checkpoints_are_one_line_errors(tmp_path):
    good = rebuild(fixture("mmseg"))
    cases = {
        "unmapped": ({**good, "decode_head.extra.weight": torch.zeros(3)}, "unmapped keys: decode_head.extra.weight"),
        "missing": ({k: v for k, v in good.items() if not k.startswith("decode_head.fusion.bottleneck.conv")},
                    "missing keys: afnb.fuse.0.weight"),
        "shape": ({**good, "decode_head.bottleneck.bn.weight": torch.zeros(7)}, "shape mismatch: context.2.weight [7] vs [512]"),
        "alias": ({**good, "decode_head.context.stages.0.query_project.conv.weight": torch.zeros(256, 512, 1, 1)},
                  "should equal the shared projection"),
    }
    for name, (state, message) in cases.items():
        src = peer_file("mmseg", tmp_path / f"{name}.pth", state)
        line = _one_line_error(run_ann("weights", "import", "mmseg", src, "--out", tmp_path / name))
        assert message in line, line
        assert not (tmp_path / name).exists()
    src = peer_file("mmseg", tmp_path / "good.pth", good)
    assert "looks like a mmseg checkpoint, not official" in _one_line_error(
        run_ann("weights", "import", "official", src, "--out", tmp_path / "o"))
    assert "--classes 21" in _one_line_error(run_ann("weights", "import", "mmseg", src, "--out", tmp_path / "c", "--classes", "21"))
    assert "not found" in _one_line_error(run_ann("weights", "inspect", tmp_path / "nope.pth"))
    assert "model.variant is official, the file is a mmseg checkpoint" in _one_line_error(run_ann(
        "weights", "import", "mmseg", src, "--out", tmp_path / "v", "--recipe", "recipes/cityscapes.yaml"))


class PickledConfig:  # an arbitrary object: a file holding it loads only with weights_only=False
    pass


def test_files_that_need_pickle_are_refused(tmp_path):
    torch.save({"state_dict": {}, "cfg": PickledConfig()}, tmp_path / "pickled.pth")
    line = _one_line_error(run_ann("weights", "inspect", tmp_path / "pickled.pth"))
    assert "not a weights-only torch checkpoint" in line
    torch.save({"state_dict": {"a": 1}}, tmp_path / "notensors.pth")
    assert "no state dict of tensors" in _one_line_error(run_ann("weights", "inspect", tmp_path / "notensors.pth"))


# --- eval and train with imported checkpoints ---------------------------------------------------


def _png(array: np.ndarray) -> bytes:
    ok, data = cv2.imencode(".png", array)
    assert ok
    return data.tobytes()


def write_set(root: Path, classes: int = 19, count: int = 3) -> dict[str, np.ndarray]:
    """A small packed val split (one shard, manifest) with random RGB images; returns key -> image."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    images = {}
    with wds.TarWriter(str(root / "synth-val-000000.tar")) as sink:
        for i in range(count):
            image = rng.integers(0, 256, size=(40, 56, 3), dtype=np.uint8)
            label = rng.integers(0, classes, size=(40, 56), dtype=np.uint8)
            sink.write({"__key__": f"img{i}", "img.png": _png(image[..., ::-1]), "seg.png": _png(label)})
            images[f"img{i}"] = image
    manifest = {"dataset": "synth", "split": "val", "classes": [f"c{k}" for k in range(classes)],
                "ignore_index": 255, "palette": [[0, 0, 0]] * classes,
                "shards": [{"name": "synth-val-000000.tar", "count": count}], "total": count}
    (root / "synth-val.json").write_text(json.dumps(manifest))
    return images


@pytest.mark.parametrize("fmt", ["official", "mmseg"])
def test_eval_runs_end_to_end_on_an_imported_checkpoint(imported, tmp_path, fmt):
    from anncli.data.transforms import normalize

    images = write_set(tmp_path / "data")
    recipe = yaml.safe_load((imported[fmt] / "recipe.yaml").read_text())
    recipe["data"].update(dataset="synth", root=str(tmp_path / "data"), val="synth-val-000000.tar", num_workers=0)
    recipe["eval"] = {"scales": [1.0], "flip": False, "mode": "whole"}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    result = run_ann("eval", tmp_path / "r.yaml", "--checkpoint", imported[fmt], "--json", tmp_path / "m.json",
                     "--save-pred", tmp_path / "pred")
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "m.json").read_text())
    assert report["samples"] == 3
    model = load_model(imported[fmt])
    aug = recipe["augment"]
    for key, image in images.items():  # eval predicts what the network gives on the recipe's normalisation
        x = normalize(image, tuple(aug["mean"]), tuple(aug["std"]), aug["bgr"]).unsqueeze(0)
        with torch.no_grad():
            expected = model(x).argmax(dim=1)[0].numpy()
        saved = cv2.imread(str(tmp_path / "pred" / f"{key}.png"), cv2.IMREAD_UNCHANGED)
        assert (saved == expected).mean() > 0.999


FINETUNE = {"model.variant": "mmseg", "model.backbone": "resnet50", "model.key_channels": 256,
            "model.value_channels": 256, "model.dropout": 0.1, "model.channels_last": False, "model.norm": "bn",
            "optim.lr": 1e-12, "optim.weight_decay": 0.0, "train.iters": 1, "train.checkpoint_every": 1,
            "augment.crop": "[32, 32]", "data.synth.size": "[32, 32]"}


def test_train_init_from_an_imported_checkpoint_with_another_class_count(imported, synth_root, tmp_path):
    sets = tiny_overrides(synth_root, **FINETUNE)
    refused = run_ann("train", "recipes/demo.yaml", *sets, "--work-dir", tmp_path / "a", "--init-from", imported["mmseg"])
    assert "model.num_classes=19 (recipe: 5)" in _one_line_error(refused)
    bad = run_ann("train", "recipes/demo.yaml", *sets, "--work-dir", tmp_path / "b", "--init-from", imported["mmseg"],
                  "--init-skip", "backbone")
    assert "--init-skip backbone" in _one_line_error(bad)

    result = run_ann("train", "recipes/demo.yaml", *sets, "--work-dir", tmp_path / "run", "--init-from",
                     imported["mmseg"], "--init-skip", "classifier")
    assert result.returncode == 0, result.stderr
    assert "skipped the classifiers (classifier.1.weight [19, 512, 1, 1], classifier.1.bias [19]" in result.stdout
    assert "aux_head.2.weight [19, 256, 1, 1]" in result.stdout
    source = torch.load(imported["mmseg"] / "model.pt", weights_only=True)
    trained = torch.load(tmp_path / "run" / "checkpoints" / "step-000001" / "model.pt", weights_only=True)
    assert trained["classifier.1.weight"].shape == (5, 512, 1, 1)
    assert trained["aux_head.2.weight"].shape == (5, 256, 1, 1)
    heads = ("classifier.1.", "aux_head.2.")
    loaded = [k for k in source if not k.startswith(heads) and not k.endswith(BN_STATS)]
    assert len(loaded) == len(list(meta_model(variant="mmseg", backbone="resnet50").parameters())) - 4
    for key in loaded:  # lr 1e-12: every loaded parameter is still the imported one
        assert torch.allclose(trained[key], source[key], atol=1e-6), key
