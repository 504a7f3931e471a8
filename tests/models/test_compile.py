"""torch.compile of the whole network with fullgraph=True: no graph break in either variant or attention
implementation, and the compiled outputs and gradients are the eager ones.

The CPU tests use the aot_eager backend: dynamo traces the network exactly as for inductor (a graph
break fails fullgraph=True either way) and AOTAutograd builds the joint forward/backward graph, but the
kernels stay eager, so the check runs in seconds; inductor's C++ build takes minutes on a small CPU.
"""

import pytest
import torch

from anncli.models import mmseg
from anncli.models.ann import build_model
from anncli.recipe import ModelConfig

torch.set_num_threads(1)
SMALL = dict(num_classes=5, key_channels=16, value_channels=32, norm="bn", dropout=0.0)


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-4) -> None:
    """max |a - b| <= rtol * max |b|: float rounding of a reordered graph, on any CPU."""
    scale = float(b.abs().max())
    assert scale > 0 and float((a - b).abs().max()) <= rtol * scale, (float((a - b).abs().max()), scale)


def _model(variant: str, attention: str, monkeypatch) -> torch.nn.Module:
    if variant == "mmseg":  # the mmseg variant has no small backbone: ResNetV1c-50 with one block per stage
        monkeypatch.setitem(mmseg.DEPTHS, "resnet50", [1, 1, 1, 1])
        cfg = ModelConfig(variant="mmseg", backbone="resnet50", attention=attention, **SMALL)
    else:
        cfg = ModelConfig(backbone="small", attention=attention, **SMALL)
    torch.manual_seed(0)
    model = build_model(cfg)
    for m in model.modules():  # non-zero output convs, so that the attention branches get gradients
        if hasattr(m, "W") and isinstance(m.W, torch.nn.Conv2d):
            torch.nn.init.normal_(m.W.weight, std=0.1)
    return model


def _step(forward, model, x: torch.Tensor) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    """Outputs and the gradients of `model`'s parameters after one backward through `forward`."""
    model.zero_grad(set_to_none=True)
    main, aux = forward(x)
    (main.square().mean() + 0.4 * aux.square().mean()).backward()
    return [main.detach(), aux.detach()], {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("attention", ["sdpa", "explicit"])
@pytest.mark.parametrize("variant", ["official", pytest.param("mmseg", marks=pytest.mark.slow)])  # ~30 s each
def test_fullgraph_compile_matches_eager_outputs_and_gradients(variant, attention, monkeypatch):
    torch._dynamo.reset()
    model = _model(variant, attention, monkeypatch).train()
    x = torch.randn(2, 3, 40, 56, generator=torch.Generator().manual_seed(1))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    eager_out, eager_grads = _step(model, model, x)
    eager_after = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(before)  # the same BN running statistics before the compiled step
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)  # a graph break raises here
    out, grads = _step(compiled, model, x)
    for a, b in zip(out, eager_out):
        _close(a, b)
    assert grads.keys() == eager_grads.keys()
    # A conv bias followed by BatchNorm has a zero gradient up to rounding (~1e-11 here): each tensor is
    # held to its own scale, plus a floor relative to the largest gradient of the network.
    floor = 1e-5 * max(float(g.abs().max()) for g in eager_grads.values())
    for name, grad in grads.items():
        reference = eager_grads[name]
        assert float((grad - reference).abs().max()) <= 1e-3 * float(reference.abs().max()) + floor, name
    for name, value in model.state_dict().items():  # BN running statistics updated as in eager
        if value.is_floating_point():
            torch.testing.assert_close(value, eager_after[name], rtol=1e-4, atol=1e-6)
    model.eval()
    with torch.no_grad():
        _close(compiled(x), model(x))
