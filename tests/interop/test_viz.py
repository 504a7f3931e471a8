"""`ann viz attention`: anchor weights mapped back onto the image, and where a trained demo model looks."""

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from anncli.data.synth import KEY_CLASS, make_sample
from anncli.errors import UserError
from anncli.eval.inference import Protocol
from anncli.models.ann import build_model
from anncli.models.attention import capture_attention
from anncli.recipe import load_recipe
from anncli.interop.viz import _bins, anchor_density, attention_maps, region_ratio
from conftest import run_ann, tiny_overrides

SIZES = (1, 3, 6, 8)


def test_bins_are_the_cells_torch_pools():
    for length in (8, 10, 13, 16, 97):
        for size in SIZES:
            for i, (start, end) in enumerate(_bins(length, size)):
                x = torch.zeros(1, 1, length, 1)
                x[0, 0, start:end] = 1.0
                pooled = torch.nn.functional.adaptive_avg_pool2d(x, (size, 1))[0, 0, :, 0]
                assert pooled[i] == 1.0, (length, size, i)


def test_anchor_density_spreads_each_weight_over_its_cells():
    weights = torch.zeros(110)
    weights[1 + 4] = 0.6  # the middle cell of the 3x3 grid
    weights[0] = 0.4  # the global anchor
    density = anchor_density(weights, SIZES, (9, 17))
    assert density.shape == (4, 9, 17)
    assert float(density[0].sum()) == pytest.approx(0.4) and float(density[1].sum()) == pytest.approx(0.6)
    rows, cols = _bins(9, 3)[1], _bins(17, 3)[1]
    middle = density[1, rows[0]:rows[1], cols[0]:cols[1]]
    assert torch.allclose(middle, torch.full_like(middle, 0.6 / middle.numel()))
    assert float(density[1].sum() - middle.sum()) == pytest.approx(0.0) and float(density[2:].abs().sum()) == 0.0


def _demo_model(name="ann"):
    recipe = load_recipe("recipes/demo.yaml", [f"model.name={name}"])
    torch.manual_seed(0)
    return recipe, build_model(recipe.model).eval()


def test_capture_records_one_softmax_per_block():
    _, model = _demo_model()
    with torch.no_grad(), capture_attention() as maps:
        model(torch.randn(1, 3, 64, 128))
    # The small backbone maps 64x128 to 9x17 positions, each attending to 110 anchors.
    assert [tuple(m.shape) for m in maps] == [(1, 153, 110), (1, 153, 110)]
    for m in maps:
        assert torch.allclose(m.sum(-1), torch.ones(1, 153))
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 128))
    assert len(maps) == 2  # nothing is recorded outside the block


def test_maps_cover_the_image_and_hold_the_attention():
    recipe, model = _demo_model()
    image, _, _ = make_sample(np.random.default_rng(0), 64, 128)
    maps = attention_maps(model, image, (10, 100), Protocol.from_recipe(recipe), torch.device("cpu"))
    assert set(maps.density) == {"apnb", "afnb"} and maps.prediction.shape == (64, 128)
    for density in maps.density.values():
        assert density.shape == (4, 64, 128)
        # Border cells are centred on the image edge: part of their pitch lies outside the image.
        assert 0.75 < density.sum() <= 1.0 + 1e-6


def test_a_model_without_anchors_is_refused():
    recipe, model = _demo_model("fcn")
    image, _, _ = make_sample(np.random.default_rng(0), 64, 128)
    with pytest.raises(UserError, match="no APNB or AFNB"):
        attention_maps(model, image, (10, 100), Protocol.from_recipe(recipe), torch.device("cpu"))


def test_cli_draws_the_picture_and_refuses_a_pixel_outside(tmp_path, synth_root):
    res = run_ann("train", "recipes/demo.yaml", "--work-dir", tmp_path / "run", *tiny_overrides(synth_root))
    assert res.returncode == 0, res.stderr[-3000:]
    image, _, _ = make_sample(np.random.default_rng(0), 32, 64)
    Image.fromarray(image).save(tmp_path / "img.png")
    ck = tmp_path / "run" / "checkpoints" / "step-000006"
    res = run_ann("viz", "attention", tmp_path / "img.png", "--checkpoint", ck, "--pixel", "10,50",
                  "--out", tmp_path / "attn.png")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "APNB: densest at" in res.stdout and "AFNB: densest at" in res.stdout
    assert Image.open(tmp_path / "attn.png").size[0] > 1000
    for pixel in ("40,10", "a,b"):
        res = run_ann("viz", "attention", tmp_path / "img.png", "--checkpoint", ck, "--pixel", pixel)
        assert res.returncode == 2 and "--pixel" in res.stderr and "Traceback" not in res.stderr


@pytest.mark.slow
def test_a_trained_demo_square_pixel_attends_to_the_key(tmp_path):
    """A shortened demo (batch 8, 200 iterations, about 2 minutes on 2 quiet cores), then 12 fresh images:
    from the middle of a grey square, attention per unit area is higher on the key than elsewhere.

    Which block looks at the key depends on the training: the full demo's AFNB does on every image (README);
    this shorter run has AFNB look at keys on the right and APNB at keys on the left. So the test asks it
    of at least one block per image, and of AFNB on most images."""
    sets = tiny_overrides(tmp_path / "synth", **{"data.synth.train": 1024, "data.synth.val": 16,
                                                  "data.synth.size": "[64, 128]", "augment.crop": "[64, 128]",
                                                  "train.batch_size": 8, "train.iters": 200,
                                                  "train.checkpoint_every": 200, "train.log_every": 50})
    res = run_ann("train", "recipes/demo.yaml", "--work-dir", tmp_path / "run", *sets, timeout=1800)
    assert res.returncode == 0, res.stderr[-3000:]
    from anncli.runs.checkpoint import checkpoint_recipe
    from anncli.eval.inference import load_model

    ck = tmp_path / "run" / "checkpoints" / "step-000200"
    recipe = load_recipe(checkpoint_recipe(ck))
    model = load_model(recipe, ck, torch.device("cpu"))
    ratios = {"afnb": [], "apnb": []}
    for i in range(12):
        image, label, _ = make_sample(np.random.default_rng([11, i]), 64, 128)
        squares = ((label >= 1) & (label < KEY_CLASS)).astype(np.uint8)
        inside = np.argwhere(cv2.erode(squares, np.ones((5, 5), np.uint8)) > 0)  # away from the rims
        pixel = tuple(int(v) for v in inside[len(inside) // 2])
        maps = attention_maps(model, image, pixel, Protocol.from_recipe(recipe), torch.device("cpu"))
        for name in ratios:
            ratios[name].append(region_ratio(maps.density[name], label == KEY_CLASS))
    print("key / rest attention per unit area:", {k: [round(r, 2) for r in v] for k, v in ratios.items()})
    assert all(max(a, b) > 2 for a, b in zip(ratios["afnb"], ratios["apnb"])), ratios
    assert sum(r > 2 for r in ratios["afnb"]) >= 6, ratios
