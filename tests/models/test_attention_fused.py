"""Exact savings in APNB/AFNB: pool-then-project on the value path, the output conv (and the fuse conv's
columns that read it) folded before the attention, and scaled_dot_product_attention.

Both must give the literal formulation's result up to float rounding (1e-5 relative), in eval and in
train mode (gradients too), and the whole network must still reproduce the official code's outputs (within the bounds that hold across CPUs,
tests/README.md).
"""

from math import prod
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from anncli.models.ann import build_model
from anncli.models.anchors import AnchorSampler, pool_then_project
from anncli.models.attention import AFNB, APNB, APNBAttention, AttentionBranch, NonLocalBlock, attend, set_literal
from anncli.recipe import ModelConfig, Recipe, RecipeError, load_recipe
from conftest import assert_close_to_reference

torch.set_num_threads(1)
FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "official-ann-r50.pt"
SMALL = dict(backbone="small", num_classes=5, key_channels=32, value_channels=64)


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-5) -> bool:
    """Relative to the tensors' scale: max |a - b| <= rtol * max |b| (and b is not all zeros)."""
    scale = b.abs().max()
    return bool(scale > 1e-3 and (a - b).abs().max() <= rtol * scale)


def _branches(module: nn.Module) -> list[AttentionBranch]:
    return [m for m in module.modules() if isinstance(m, AttentionBranch)]


def _randomize_output_convs(module: nn.Module) -> None:
    for m in _branches(module):
        nn.init.normal_(m.W.weight, std=0.1)
        nn.init.normal_(m.W.bias, std=0.1)


def _set(module: nn.Module, pool_first: bool = True, fold_output: bool = True) -> nn.Module:
    """Each saving on or off alone; both off is `set_literal`."""
    set_literal(module, literal=False)
    for m in _branches(module):
        m.pool_first, m.fold_output = pool_first, fold_output
        if m.sampler is not None:
            m.sampler.separable = pool_first and m.sampler.mode == "avg"
    return module


def test_pool_then_project_equals_project_then_pool():
    torch.manual_seed(0)
    x = torch.randn(2, 48, 23, 37)  # sizes that do not divide: overlapping adaptive bins
    conv, sampler = nn.Conv2d(48, 20, 1), AnchorSampler((1, 3, 6, 8))
    adaptive = AnchorSampler((1, 3, 6, 8))
    adaptive.separable = False
    with torch.no_grad():
        assert _close(pool_then_project(x, conv, sampler), adaptive(conv(x)))
        assert _close(sampler(x), adaptive(x))  # separable matmul pooling = torch's adaptive pools
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = sampler(x.bfloat16())
        assert low.dtype == torch.bfloat16 and _close(low.float(), adaptive(x.bfloat16().float()), 1e-2)
    with pytest.raises(ValueError, match="1x1"):
        pool_then_project(x, nn.Conv2d(48, 20, 3, padding=1), sampler)


@pytest.mark.parametrize("savings", [(True, False), (False, True), (True, True)], ids=["pool", "fold", "both"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_exact_savings_match_the_literal_blocks(mode, savings):
    torch.manual_seed(0)
    low, high = torch.randn(2, 24, 13, 21), torch.randn(2, 32, 13, 21)
    for make, args in ((lambda: APNB(32, 32, 8, 12), (high,)), (lambda: AFNB(24, 40, 32, 8, 12), (low, torch.randn(2, 40, 13, 21))),
                       (lambda: APNBAttention(32, 48, 8, 12), (high,))):
        block, literal = _set(make(), *savings), set_literal(make())
        _randomize_output_convs(block)
        literal.load_state_dict(block.state_dict())
        block.train(mode == "train"), literal.train(mode == "train")
        torch.manual_seed(1)
        fused_out = block(*args)
        torch.manual_seed(1)  # the same dropout mask
        literal_out = literal(*args)
        assert _close(fused_out, literal_out)
        fused_out.square().sum().backward()
        literal_out.square().sum().backward()
        # Gradients within 1e-4 of each parameter's own scale; a gradient that is zero in exact arithmetic
        # (the value bias: softmax rows sum to 1 and train-mode BN removes the constant) is float noise,
        # bounded by 1e-5 of the largest gradient.
        largest = max(q.grad.abs().max() for q in literal.parameters())
        for (name, p), q in zip(block.named_parameters(), literal.parameters()):
            assert (p.grad - q.grad).abs().max() <= 1e-4 * q.grad.abs().max() + 1e-5 * largest, name


def test_folded_output_map_includes_the_callers_linear_map():
    torch.manual_seed(0)
    branch = AttentionBranch(16, 8, 12, 20, sizes=(1, 3)).eval()
    _randomize_output_convs(branch)
    x, after = torch.randn(2, 16, 9, 11), torch.randn(7, 20)
    with torch.no_grad():
        folded = _set(branch)(x, after=after)
        literal = set_literal(branch)(x, after=after)
        assert folded.shape == (2, 7, 9, 11) and _close(folded, literal)
        assert _close(literal, torch.einsum("oc,bchw->bohw", after, set_literal(branch)(x)))


def _forward_flops(block: nn.Module, *args: torch.Tensor) -> int:
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        block(*args)
    return counter.get_total_flops()


@pytest.mark.parametrize("value_channels", [16, 64])
@pytest.mark.parametrize("size", [(4, 8), (8, 16), (33, 33), (64, 128)])
def test_each_saving_is_taken_only_where_it_costs_less(size, value_channels):
    """By default a block takes the cheapest of the exact forms for its input: at a few positions (N < 110
    anchors) projecting the anchors costs more than the literal path, and mapping the anchors to the
    output pays only where W widens the values less than the attention would narrow them."""
    torch.manual_seed(0)
    high, low = torch.randn(1, 64, *size), torch.randn(1, 32, *size)
    cv = value_channels
    for make, args in ((lambda: APNB(64, 64, 16, cv), (high,)), (lambda: AFNB(32, 64, 64, 16, cv), (low, high)),
                       (lambda: APNBAttention(64, 64, 16, cv), (high,))):
        chosen = _forward_flops(make().eval(), *args)
        forms = []
        for pool_first in (False, True):
            for fold_output in (False, True):
                block = make().eval()
                for m in _branches(block):  # the same (separable) pooling as the default: only the order differs
                    m.pool_first, m.fold_output = pool_first, fold_output
                forms.append(_forward_flops(block, *args))
        assert chosen == min(forms)
        assert chosen < max(forms)


def test_non_local_block_never_folds():
    block = APNB(16, 16, 8, 8, sizes=None).eval()
    assert not block.attention.folds(36, 16) and not NonLocalBlock(16, 16).folds(36)
    x = torch.randn(1, 16, 6, 6)
    with torch.no_grad():
        assert torch.equal(block(x), set_literal(block)(x))


def test_max_pooled_anchors_keep_the_literal_order():
    torch.manual_seed(0)
    x = torch.randn(1, 16, 12, 12)
    branch = AttentionBranch(16, 8, 12, 16, mode="max").eval()
    _randomize_output_convs(branch)
    with torch.no_grad():
        pool_first = _set(branch, pool_first=True, fold_output=False)(x)
        literal = set_literal(branch)(x)
        assert torch.equal(pool_first, literal)  # max pooling never takes the pool-first path
        assert _close(_set(branch)(x), literal)  # the output fold holds for any anchors


def test_sdpa_matches_the_explicit_softmax():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 300, 16), torch.randn(2, 110, 16), torch.randn(2, 24, 110)  # value width differs
    assert _close(attend(q, k, v, "sdpa"), attend(q, k, v, "explicit"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attend(q.bfloat16(), k.bfloat16(), v.bfloat16(), "sdpa")
    assert out.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="attention"):
        attend(q, k, v, "flash")


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_sdpa_network_matches_the_explicit_network(mode):
    torch.manual_seed(0)
    explicit = build_model(ModelConfig(**SMALL))
    sdpa = build_model(ModelConfig(attention="sdpa", **SMALL))
    _randomize_output_convs(explicit)
    sdpa.load_state_dict(explicit.state_dict())
    assert {m.impl for m in _branches(sdpa)} == {"sdpa"}
    x = torch.randn(2, 3, 48, 64)
    explicit.train(mode == "train"), sdpa.train(mode == "train")
    torch.manual_seed(1)
    a = explicit(x)
    torch.manual_seed(1)
    b = sdpa(x)
    for u, w in zip(a if mode == "train" else (a,), b if mode == "train" else (b,)):
        assert _close(w, u)


def test_non_local_baseline_keeps_its_explicit_map():
    assert NonLocalBlock(16, 16).impl == "explicit"
    model = build_model(ModelConfig(name="nonlocal", attention="sdpa", **SMALL))
    assert {m.impl for m in _branches(model)} == {"explicit"}


def test_recipe_key_model_attention(tmp_path):
    assert Recipe(name="r").model.attention == "explicit"
    path = tmp_path / "r.yaml"
    path.write_text("model:\n  attention: sdpa\n")
    assert load_recipe(path).model.attention == "sdpa"
    with pytest.raises(RecipeError, match="model.attention"):
        load_recipe(path, ["model.attention=flash"])


def _official_weights(fixture: dict) -> dict:
    """The peer's state dict rebuilt by the fixture's rule (fixtures/README.md)."""
    built = {}
    for i, (name, shape) in enumerate(fixture["keys"]):
        g = torch.Generator().manual_seed(fixture["seed"] + i)
        if name in fixture["aliases"]:
            built[name] = built[fixture["aliases"][name]]
        elif name.endswith("num_batches_tracked"):
            built[name] = torch.tensor(0)
        elif name.endswith(("running_mean", "running_var")):
            built[name] = fixture["bn_stats"][name]
        elif len(shape) >= 2:
            built[name] = torch.randn(shape, generator=g) * (2 / prod(shape[1:])) ** 0.5
        else:
            built[name] = 0.1 * torch.randn(shape, generator=g) + (1.0 if name.endswith(".weight") else 0.0)
    return built


_RENAMES = [("fusion.stages.0.", "afnb.attention."), ("fusion.conv_bn_dropout.", "afnb.fuse."),
            ("context.2.stages.0.", "apnb.attention."), ("context.2.conv_bn_dropout.1.0.", "apnb.fuse.1."),
            ("context.2.conv_bn_dropout.", "apnb.fuse."), ("context.1.0.", "context.1."), ("cls.", "classifier."),
            ("dsn.0.", "aux_head.0.0."), ("dsn.1.0.", "aux_head.0.1."), ("dsn.3.", "aux_head.2.")]


def _to_ann(name: str) -> str:
    for old, new in _RENAMES:
        if name.startswith(old):
            name = new + name[len(old):]
            break
    return name.replace(".f_key.1.0.", ".f_key.1.").replace(".f_query.1.0.", ".f_query.1.")


def _official_forward(fixture: dict, state: dict, impl: str = "explicit", literal: bool = False):
    """(main, aux) of ANN-R50 holding `state` (ann's names) on the fixture's input."""
    model = build_model(ModelConfig(backbone="resnet50", num_classes=19, attention=impl))
    model.load_state_dict(state)
    set_literal(model, literal)
    model.eval()
    model.training = True  # eval-mode layers, but the top level returns (main, aux)
    with torch.no_grad():
        return model(fixture["input"])


def _official_state(fixture: dict) -> dict:
    official = _official_weights(fixture)
    return {_to_ann(k): v for k, v in official.items() if k not in fixture["aliases"]}


@pytest.mark.parametrize("impl,literal", [("explicit", False), ("sdpa", False), ("explicit", True)])
def test_official_outputs_are_reproduced(impl, literal):
    fixture = torch.load(FIXTURE, weights_only=True)
    main, aux = _official_forward(fixture, _official_state(fixture), impl, literal)
    assert_close_to_reference(main, fixture["outputs"]["main"], what="main")
    assert_close_to_reference(aux, fixture["outputs"]["aux"], what="aux")


def _skip_one_bn(state: dict) -> dict:
    """A converter that forgot the running statistics of one BN (the APNB key projection's)."""
    return {**state, "apnb.attention.f_key.1.running_mean": torch.zeros(256),
            "apnb.attention.f_key.1.running_var": torch.ones(256)}


def _swap_fuse_halves(state: dict) -> dict:
    """A converter that concatenates [input, attention] where the peer has [attention, input]."""
    weight = state["apnb.fuse.0.weight"]
    return {**state, "apnb.fuse.0.weight": torch.cat(weight.chunk(2, dim=1)[::-1], dim=1)}


@pytest.mark.parametrize("mistake", [_skip_one_bn, _swap_fuse_halves], ids=["skipped-bn", "swapped-concat"])
def test_the_cross_cpu_bounds_still_catch_a_mapping_error(mistake):
    fixture = torch.load(FIXTURE, weights_only=True)
    main, _ = _official_forward(fixture, mistake(_official_state(fixture)))
    with pytest.raises(AssertionError, match="relative L2"):
        assert_close_to_reference(main, fixture["outputs"]["main"])
