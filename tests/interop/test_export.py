"""`ann export` (ONNX, TorchScript) checked against eager, and `ann predict --model` on onnxruntime."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from anncli.data.synth import make_sample
from anncli.interop.export import Exported, ShapeFreeAdaptiveAvgPool, check_parity
from conftest import ROOT, ann_env, run_ann, run_ann_limited, tiny_overrides
from test_faults import tmpfs  # noqa: F401  (a fixture: a real small file system)

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    base = tmp_path_factory.mktemp("export")
    res = run_ann("train", "recipes/demo.yaml", "--work-dir", base / "run", *tiny_overrides(base / "synth"))
    assert res.returncode == 0, res.stderr[-3000:]
    return base / "run" / "checkpoints" / "step-000006"


def _images(folder, sizes):
    folder.mkdir(parents=True, exist_ok=True)
    for i, (h, w) in enumerate(sizes):
        image, _, _ = make_sample(np.random.default_rng([5, i]), h, w)
        Image.fromarray(image).save(folder / f"img{i}.png")
    return folder


def _parity(stdout: str) -> float:
    match = re.search(r"parity: max \|.*\| = (\S+) on", stdout)
    assert match, stdout
    return float(match.group(1))


def test_onnx_matches_eager_and_predict_runs_it_like_the_checkpoint(checkpoint, tmp_path):
    model = tmp_path / "demo.onnx"
    res = run_ann("export", "--checkpoint", checkpoint, "--out", model)
    assert res.returncode == 0, res.stderr[-3000:]
    assert _parity(res.stdout) <= 1e-3
    proto = onnx.load(str(model))
    onnx.checker.check_model(proto)
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 17
    meta = json.loads({p.key: p.value for p in proto.metadata_props}["anncli"])
    assert meta["num_classes"] == 5 and len(meta["classes"]) == 5 and len(meta["palette"]) == 5

    images = _images(tmp_path / "in", [(32, 64), (48, 80)])
    res = run_ann("predict", images, "--model", model, "--out", tmp_path / "onnx")
    assert res.returncode == 0, res.stderr[-3000:]
    res = run_ann("predict", images / "img0.png", "--checkpoint", checkpoint, "--out", tmp_path / "eager")
    assert res.returncode == 0, res.stderr[-3000:]
    via_onnx = np.array(Image.open(tmp_path / "onnx" / "img0_pred.png"))
    via_torch = np.array(Image.open(tmp_path / "eager" / "img0_pred.png"))
    assert via_onnx.shape == (32, 64) and (via_onnx == via_torch).mean() >= 0.999
    # A fixed-size model resizes other images to its input and the result back to theirs.
    assert np.array(Image.open(tmp_path / "onnx" / "img1_pred.png")).shape == (48, 80)
    for suffix in ("color", "overlay"):
        assert Image.open(tmp_path / "onnx" / f"img1_{suffix}.png").size == (80, 48)


def test_predict_with_an_onnx_model_needs_no_torch(checkpoint, tmp_path):
    model = tmp_path / "demo.onnx"
    assert run_ann("export", "--checkpoint", checkpoint, "--out", model).returncode == 0
    images = _images(tmp_path / "in", [(32, 64)])
    code = ("import sys; sys.modules['torch'] = None; from anncli.cli.main import main; "
            f"sys.argv = ['ann', 'predict', {str(images)!r}, '--model', {str(model)!r}, '--out', "
            f"{str(tmp_path / 'out')!r}]; main()")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=ann_env())
    assert res.returncode == 0, res.stderr[-3000:]
    assert "1 image(s) segmented" in res.stdout
    assert (tmp_path / "out" / "img0_pred.png").is_file()


def test_torchscript_export_carries_the_metadata(checkpoint, tmp_path):
    out = tmp_path / "demo.pt"
    res = run_ann("export", "--checkpoint", checkpoint, "--format", "torchscript", "--out", out, "--size", "40x72")
    assert res.returncode == 0, res.stderr[-3000:]
    assert _parity(res.stdout) <= 1e-3
    extra = {"anncli.json": ""}
    loaded = torch.jit.load(str(out), _extra_files=extra)
    assert json.loads(extra["anncli.json"])["recipe"] == "demo"
    assert loaded(torch.rand(1, 3, 40, 72) * 255).shape == (1, 5, 40, 72)


def test_bad_options_are_one_line_with_exit_2(checkpoint, tmp_path):
    cases = [
        (["export", "--checkpoint", checkpoint, "--out", tmp_path / "m", "--format", "tflite"], "--format"),
        (["export", "--checkpoint", checkpoint, "--out", tmp_path / "m", "--format", "torchscript", "--dynamic"],
         "--dynamic"),
        (["export", "--checkpoint", checkpoint, "--out", tmp_path / "m.onnx", "--size", "big"], "--size"),
        (["export", "--checkpoint", tmp_path / "nope", "--out", tmp_path / "m.onnx"], "nope"),
        (["predict", tmp_path, "--model", tmp_path / "none.onnx", "--out", tmp_path / "o"], "none.onnx"),
        (["predict", tmp_path, "--model", tmp_path / "m.onnx", "--checkpoint", checkpoint, "--out", tmp_path / "o"],
         "--model"),
        (["predict", tmp_path, "--out", tmp_path / "o"], "--checkpoint"),
    ]
    for args, needle in cases:
        res = run_ann(*args)
        assert res.returncode == 2 and needle in res.stderr, (args, res.stderr)
        assert "Traceback" not in res.stderr


def _one_error_line(res, *needles):
    assert res.returncode == 2, res.stderr[-3000:]
    errors = [line for line in res.stderr.splitlines() if line.startswith("ann: error:")]
    assert len(errors) == 1 and "Traceback" not in res.stderr, res.stderr[-3000:]
    for needle in needles:
        assert needle in errors[0], errors[0]


@pytest.mark.parametrize("fmt, name", [("onnx", "old.onnx"), ("torchscript", "old.pt")])
def test_an_export_over_the_file_size_limit_keeps_the_old_file_whole(checkpoint, tmp_path, fmt, name):
    out = tmp_path / name
    before = os.urandom(1 << 20)  # what a file written before holds: bigger than the limit, not ours to cut
    out.write_bytes(before)
    res = run_ann_limited("export", "--checkpoint", checkpoint, "--format", fmt, "--out", out, limit=100 << 10)
    _one_error_line(res, f"{out}: file too large (over the file-size limit")
    assert out.read_bytes() == before and os.listdir(tmp_path) == [name]  # not truncated, no temporary file


def test_an_export_onto_a_full_disk_leaves_no_file(checkpoint, tmpfs):  # noqa: F811
    full = tmpfs("1m")
    res = run_ann("export", "--checkpoint", checkpoint, "--out", full / "model.onnx")
    _one_error_line(res, f"{full / 'model.onnx'}: no space left on tmpfs at {full}")
    assert os.listdir(full) == []  # no 0-byte model.onnx, no temporary file


def test_shape_free_pooling_equals_adaptive_average_pooling():
    for h, w in [(8, 16), (10, 20), (13, 7), (97, 97), (1, 2)]:
        x = torch.randn(2, 3, h, w)
        for size in (1, 3, 6, 8):
            assert torch.allclose(ShapeFreeAdaptiveAvgPool(size)(x), F.adaptive_avg_pool2d(x, size), atol=1e-5)


def test_parity_check_reports_the_largest_difference():
    module = Exported(torch.nn.Conv2d(3, 2, 1), (0.0, 0.0, 0.0), (255.0, 255.0, 255.0), bgr=False).eval()

    def off_by(x):
        with torch.no_grad():
            out = module(torch.from_numpy(x)).numpy()
        out[0, 0, 0, 0] += 0.01
        return out

    assert check_parity(module, off_by, [(1, 3, 8, 8)]) == pytest.approx(0.01, rel=1e-3)


@pytest.mark.slow
def test_dynamic_onnx_is_right_at_sizes_it_was_not_traced_at(checkpoint, tmp_path):
    model = tmp_path / "dyn.onnx"
    res = run_ann("export", "--checkpoint", checkpoint, "--out", model, "--dynamic")
    assert res.returncode == 0, res.stderr[-3000:]
    assert _parity(res.stdout) <= 1e-3
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    from anncli.runs.checkpoint import checkpoint_recipe
    from anncli.eval.inference import load_model
    from anncli.recipe import load_recipe

    recipe = load_recipe(checkpoint_recipe(checkpoint))
    eager = Exported(load_model(recipe, checkpoint, torch.device("cpu")), recipe.augment.mean, recipe.augment.std,
                     recipe.augment.bgr).eval()
    for shape in [(1, 3, 45, 70), (3, 3, 64, 128), (1, 3, 100, 60)]:
        x = np.random.default_rng(1).uniform(0, 255, size=shape).astype(np.float32)
        got = session.run(None, {"image": x})[0]
        with torch.no_grad():
            want = eager(torch.from_numpy(x)).numpy()
        assert np.abs(got - want).max() <= 1e-3, shape
