"""Device settings: channels_last auto/true/false, cuDNN autotuning vs deterministic algorithms, and the
recipe keys that choose them (older recipes with a boolean channels_last still load)."""

import subprocess
import sys

import pytest
import torch

from anncli.recipe import load_recipe
from anncli.recipe_yaml import RecipeError
from anncli.models.tuning import memory_format, use_channels_last
from conftest import ROOT, ann_env

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def test_channels_last_auto_is_on_for_cuda_only_and_explicit_values_win():
    assert use_channels_last("auto", CUDA) and not use_channels_last("auto", CPU)
    assert use_channels_last(True, CPU) and not use_channels_last(False, CUDA)
    assert memory_format("auto", CUDA) == torch.channels_last and memory_format("auto", CPU) == torch.contiguous_format


def test_recipe_keys_and_their_defaults(tmp_path):
    recipe = load_recipe(ROOT / "recipes" / "cityscapes.yaml")
    assert recipe.model.channels_last == "auto" and recipe.model.compile is False
    assert recipe.train.deterministic is False and recipe.train.precision == "fp32"
    old = tmp_path / "old.yaml"  # a recipe.yaml saved before `auto` existed
    old.write_text("name: old\nmodel:\n  channels_last: false\n")
    assert load_recipe(old).model.channels_last is False
    with pytest.raises(RecipeError, match="model.channels_last"):
        load_recipe(old, ["model.channels_last=sometimes"])


def _settings_after(device: str, deterministic: bool, shapes_repeat: bool = True) -> list:
    """configure_algorithms in a fresh interpreter (the settings are process-wide), as torch reports them."""
    code = (
        "import os, torch\n"
        "from anncli.models.tuning import configure_algorithms\n"
        f"configure_algorithms(torch.device({device!r}), {deterministic}, {shapes_repeat})\n"
        "print([torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic,\n"
        "       torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),\n"
        "       os.environ.get('CUBLAS_WORKSPACE_CONFIG')])\n"
    )
    env = ann_env()
    env.pop("CUBLAS_WORKSPACE_CONFIG", None)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    return eval(done.stdout.strip().splitlines()[-1])


def test_deterministic_turns_autotuning_off_and_asks_for_deterministic_algorithms():
    assert _settings_after("cpu", True) == [False, True, True, True, ":4096:8"]
    assert _settings_after("cuda", True) == [False, True, True, True, ":4096:8"]  # settings only, no GPU used


def test_autotuning_on_cuda_where_shapes_repeat_and_nothing_on_cpu():
    assert _settings_after("cuda", False) == [True, False, False, False, None]
    assert _settings_after("cuda", False, shapes_repeat=False)[0] is False
    assert _settings_after("cpu", False) == [False, False, False, False, None]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_channels_last_training_step_on_cuda_keeps_the_contiguous_numbers():
    """The same step in both layouts (cuDNN autotuning on): outputs within float rounding of each other."""
    from anncli.models.ann import build_model
    from anncli.recipe import ModelConfig

    torch.manual_seed(0)
    cfg = ModelConfig(backbone="small", num_classes=5, key_channels=16, value_channels=32, norm="bn", dropout=0.0)
    plain = build_model(cfg).to(CUDA).eval()
    nhwc = build_model(cfg).to(CUDA).eval()
    nhwc.load_state_dict(plain.state_dict())
    nhwc = nhwc.to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 64, 128, device=CUDA)
    saved = torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    try:  # full fp32 on both sides: TF32 rounding would hide a real difference
        torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = (
            True, False, False)
        with torch.no_grad():
            a, b = plain(x), nhwc(x.contiguous(memory_format=torch.channels_last))
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
