"""Every parameter's gradient comes back in the parameter's own strides (torch's gradient layout contract),
channels_last included: DDP lays out its gradient buckets like the parameters, and warns ("Grad strides do
not match bucket view strides") and copies every step for a gradient of other strides."""

from __future__ import annotations

import pytest
import torch

from anncli.models.ann import build_model
from anncli.recipe import load_recipe
from conftest import ROOT


@pytest.mark.parametrize("variant", ["official", "mmseg"])
def test_gradients_keep_the_strides_of_channels_last_parameters(variant):
    torch.manual_seed(0)
    cfg = load_recipe(ROOT / "recipes" / "demo.yaml", []).model
    if variant == "mmseg":
        cfg = cfg.model_copy(update={"variant": "mmseg", "backbone": "resnet50"})
        size = (97, 129)
    else:
        size = (128, 256)  # the demo's crop: the attention savings (matrix-applied 1x1 weights) are taken
    model = build_model(cfg).to(memory_format=torch.channels_last).train()
    x = torch.randn(2, 3, *size).to(memory_format=torch.channels_last)
    main, aux = model(x)
    (main.float().square().mean() + (0 if aux is None else aux.float().square().mean())).backward()
    other = {n: (p.stride(), p.grad.stride()) for n, p in model.named_parameters()
             if p.grad is not None and p.grad.stride() != p.stride()}
    assert other == {}
