"""Anchor attention, APNB, AFNB and the plain non-local block they are compared with.

Shapes: B batch, N = H*W query positions, S anchors (110 for pyramid sizes 1, 3, 6, 8, or N without
sampling), Ck key channels, Cv value channels. The similarity and softmax run in float32 with
autocast off, whatever the input dtype, so that bf16/fp16 training stays stable.

Exact savings over the literal formulation (all equal to it up to float rounding), each taken when
the input's shape makes it cheaper:
- the value path pools first and projects only the S anchors (`anchors.pool_then_project`);
- the output conv W (and the fuse conv's columns that read W's output) is applied to the S anchor
  values before attending instead of to the N attended vectors (`AttentionBranch.fold_output`):
  softmax rows sum to 1, so P·(V·Wᵀ + b) = (P·V)·Wᵀ + b;
- `attention="sdpa"` computes softmax(q·kᵀ/√Ck)·v with torch's `scaled_dot_product_attention`,
  which never materialises the N×S map (the plain non-local block always keeps its explicit N×N map).
"""

from __future__ import annotations

import contextlib
import functools
from contextvars import ContextVar
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from anncli.models.anchors import AnchorSampler, pool_then_project
from anncli.models.precision import autocast_off

ATTENTION_IMPLS = ("explicit", "sdpa")

# Both peers run the shared key/query projection twice per forward (query, then key), so in training
# its BatchNorm running statistics take two momentum-0.1 steps on the same batch statistics:
# r <- 0.81 r + 0.19 b. Ours computes the projection once; one step at 0.19 is the same update.
SHARED_BN_MOMENTUM = 1 - (1 - 0.1) ** 2


_CAPTURED: ContextVar[list | None] = ContextVar("ann_captured_attention", default=None)


@contextlib.contextmanager
def capture_attention():
    """Inside the block, every `attend` call appends its softmax weights (B, N, S) to the yielded list."""
    maps: list[torch.Tensor] = []
    token = _CAPTURED.set(maps)
    try:
        yield maps
    finally:
        _CAPTURED.reset(token)


def attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, impl: str = "explicit") -> torch.Tensor:
    """softmax(q·kᵀ / sqrt(Ck)) · v in float32; query (B,N,Ck), key (B,S,Ck), value (B,Cv,S) -> (B,Cv,N).

    Values come and results go channels first, as the convolutions around read and write them. With
    few anchors the result is made contiguous by the product itself (v·simᵀ); with S = N (the plain
    non-local block) BLAS reads the N×N map transposed ~7% slower, so sim·vᵀ is computed and handed on
    as a transposed view, as is sdpa's result (a transpose copy costs more than the convs lose on it).
    `explicit` scales the S keys (not the N queries) before the product, so that only one N×S map is
    live besides its softmax; `sdpa` hands the same product to `F.scaled_dot_product_attention` (one
    head of width Ck, value width Cv may differ), whose kernels never hold the whole N×S map.
    """
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention must be one of {ATTENTION_IMPLS}, got {impl!r}")
    with autocast_off(query.device):
        q, k, v = query.float(), key.float(), value.float()
        # Capturing is an eager-only tool (ann viz attention); torch.compile cannot trace a ContextVar.
        captured = None if torch.compiler.is_compiling() else _CAPTURED.get()
        if impl == "sdpa" and captured is None:
            out = F.scaled_dot_product_attention(q.unsqueeze(1), k.unsqueeze(1), v.transpose(1, 2).unsqueeze(1))
            out = out.squeeze(1).transpose(1, 2)
        else:  # explicit, or sdpa while `capture_attention` needs the weights themselves
            sim = torch.softmax(torch.matmul(q, (k * k.shape[-1] ** -0.5).transpose(1, 2)), dim=-1)
            if captured is not None:
                captured.append(sim.detach())
            if sim.shape[-1] <= v.shape[1]:  # few anchors
                out = torch.matmul(v, sim.transpose(1, 2))
            else:
                out = torch.matmul(sim, v.transpose(1, 2)).transpose(1, 2)
    return out.to(value.dtype)


def conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class AttentionBranch(nn.Module):
    """Projections, (optionally sampled) attention and the zero-initialised output conv W.

    With `query_channels=None` query and key share one projection, computed once. With `sizes=None`
    every key position is an anchor: the plain non-local block, which always keeps the explicit N×N
    map (it is the paper's point of comparison).

    Two exact savings, each taken when it costs fewer multiply-adds for the input's N (None, the
    default), always (True: equivalence tests, benchmarks) or never (False: the literal formulation):
    `pool_first` projects the S pooled anchors instead of the N positions (average pooling only);
    `fold_output` moves the output conv W before the attention, so that it maps S anchor values instead
    of N attended vectors. A caller whose next step is a linear map of this branch's output passes its
    matrix as `after` (C, Cout), and it is folded in too. The plain non-local block (S = N) never folds.
    """

    def __init__(self, key_in: int, key_channels: int, value_channels: int, out_channels: int,
                 query_channels: int | None = None, sizes: Sequence[int] | None = (1, 3, 6, 8),
                 mode: str = "avg", attention: str = "explicit"):
        super().__init__()
        if attention not in ATTENTION_IMPLS:
            raise ValueError(f"attention must be one of {ATTENTION_IMPLS}, got {attention!r}")
        self.impl = "explicit" if sizes is None else attention
        self.pool_first: bool | None = None
        self.fold_output: bool | None = None
        self.f_key = conv_bn_relu(key_in, key_channels)
        self.f_query = None if query_channels is None else conv_bn_relu(query_channels, key_channels)
        if self.f_query is None:
            self.f_key[1].momentum = SHARED_BN_MOMENTUM
        self.f_value = nn.Conv2d(key_in, value_channels, 1)
        self.sampler = None if sizes is None else AnchorSampler(sizes, mode)
        self.W = nn.Conv2d(value_channels, out_channels, 1)
        nn.init.zeros_(self.W.weight)
        nn.init.zeros_(self.W.bias)

    def _anchors(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(2) if self.sampler is None else self.sampler(x)

    def pools_first(self, h: int, w: int) -> bool:
        """Whether the value conv runs on the S pooled anchors of an h×w map instead of every position."""
        if self.sampler is None or self.sampler.mode != "avg":
            return False  # max pooling does not commute with the projection
        if self.pool_first is not None:
            return self.pool_first
        cin, cv = self.f_value.in_channels, self.f_value.out_channels
        pool = self.sampler.macs_per_channel(h, w)  # pooling Cin channels instead of Cv
        return pool * cin + self.sampler.count * cin * cv < h * w * cin * cv + pool * cv

    def folds(self, n: int, after_rows: int | None = None) -> bool:
        """Whether W (and a following linear map of `after_rows` outputs) runs on the S anchor values."""
        if self.sampler is None:
            return False
        if self.fold_output is not None:
            return self.fold_output
        s, cv, cout = self.sampler.count, self.W.in_channels, self.W.out_channels
        c = cout if after_rows is None else after_rows
        extra_fold, extra_literal = (0, 0) if after_rows is None else (s * cout * c, n * cout * c)
        return s * cv * cout + extra_fold + n * s * c < n * s * cv + n * cv * cout + extra_literal

    def _values(self, key_feats: torch.Tensor) -> torch.Tensor:
        if self.pools_first(*key_feats.shape[-2:]):
            return pool_then_project(key_feats, self.f_value, self.sampler)
        return self._anchors(self.f_value(key_feats))

    def forward(self, query_feats: torch.Tensor, key_feats: torch.Tensor | None = None,
                after: torch.Tensor | None = None) -> torch.Tensor:
        """W(attention) for queries from `query_feats` and keys/values from `key_feats` (default: the same),
        followed by the bias-free 1x1 map `after` (C, Cout) when given."""
        key_feats = query_feats if key_feats is None else key_feats
        b, _, h, w = query_feats.shape
        key_map = self.f_key(key_feats)
        query = key_map if self.f_query is None else self.f_query(query_feats)
        query, key = query.flatten(2).transpose(1, 2), self._anchors(key_map).transpose(1, 2)
        value = self._values(key_feats)  # (B, Cv, S)
        if self.folds(h * w, None if after is None else after.shape[0]):  # W on the anchors, then attend
            value = F.conv1d(value, self.W.weight.flatten(2), self.W.bias)
            if after is not None:
                value = torch.matmul(after, value)
            return attend(query, key, value, self.impl).view(b, -1, h, w)
        out = self.W(attend(query, key, value, self.impl).view(b, -1, h, w))
        return out if after is None else F.conv2d(out, after[:, :, None, None])


def grads_in_own_layout(*params: nn.Parameter) -> None:
    """Gradients of these 1x1 weights come back in the weight's own strides.

    The savings apply the value projection W and the fuse conv's columns as matrices; the gradient of a
    matrix product has contiguous strides, while a 1x1 weight in channels_last has others for its size-1
    dimensions (the same bytes in the same order). DDP lays out its gradient buckets like the parameters
    and warned "Grad strides do not match bucket view strides" (then copied) for such a gradient."""
    for param in params:
        param.register_hook(functools.partial(_like, param))


def _like(param: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    return grad if grad.stride() == param.stride() else torch.empty_like(param).copy_(grad)


def fuse_concat(conv: nn.Conv2d, branch: AttentionBranch, rest: torch.Tensor, *inputs: torch.Tensor) -> torch.Tensor:
    """`conv(cat[branch(*inputs), rest])` for a 1x1 conv, with the conv's columns that read the branch
    folded into the branch's output map when it folds (`AttentionBranch.folds`); the literal concat otherwise."""
    if not branch.folds(rest.shape[-2] * rest.shape[-1], conv.out_channels):
        return conv(torch.cat([branch(*inputs), rest], dim=1))
    split = branch.W.out_channels
    # split (not two slices): its backward writes the weight gradient once, with no zero-filled copies
    on_branch, on_rest = conv.weight.split([split, conv.in_channels - split], dim=1)
    # the contiguous conv output first: the sum takes its layout whatever the branch hands back
    return F.conv2d(rest, on_rest, conv.bias) + branch(*inputs, after=on_branch.flatten(1))


def set_literal(module: nn.Module, literal: bool = True) -> nn.Module:
    """Every attention branch in `module` computed literally (project every position, adaptive pools,
    attend, then W and the fuse concat), as the official code does, or with the exact savings where
    they pay (the default)."""
    for m in module.modules():
        if isinstance(m, AttentionBranch):
            m.pool_first = m.fold_output = False if literal else None
            if m.sampler is not None:
                m.sampler.separable = not literal and m.sampler.mode == "avg"
    return module


class NonLocalBlock(AttentionBranch):
    """The plain non-local block of the efficiency comparison: shared key/query, full N×N attention."""

    def __init__(self, in_channels: int, out_channels: int, key_channels: int = 256, value_channels: int = 256):
        super().__init__(in_channels, key_channels, value_channels, out_channels, sizes=None)


class APNBAttention(AttentionBranch):
    """The attention branch of APNB alone (no fuse conv), as the paper's efficiency table measures it."""

    def __init__(self, in_channels: int, out_channels: int, key_channels: int = 256, value_channels: int = 256,
                 sizes: Sequence[int] = (1, 3, 6, 8), mode: str = "avg", attention: str = "explicit"):
        super().__init__(in_channels, key_channels, value_channels, out_channels, sizes=sizes, mode=mode,
                         attention=attention)


class APNB(nn.Module):
    """Asymmetric Pyramid Non-local Block: fuse(cat[W(attention(x)), x]) with 1x1 conv + BN + ReLU + dropout.

    `sizes=None` gives the same block with full non-local attention.
    """

    def __init__(self, in_channels: int, out_channels: int, key_channels: int, value_channels: int,
                 dropout: float = 0.05, sizes: Sequence[int] | None = (1, 3, 6, 8), mode: str = "avg",
                 attention: str = "explicit"):
        super().__init__()
        self.attention = AttentionBranch(in_channels, key_channels, value_channels, out_channels,
                                         sizes=sizes, mode=mode, attention=attention)
        self.fuse = nn.Sequential(
            nn.Conv2d(out_channels + in_channels, out_channels, 1), nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True), nn.Dropout2d(dropout),
        )
        grads_in_own_layout(self.fuse[0].weight, self.attention.W.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fuse[1:](fuse_concat(self.fuse[0], self.attention, x, x))


class AFNB(nn.Module):
    """Asymmetric Fusion Non-local Block: queries from the high level, keys/values from the low level.

    fuse(cat[W(attention), high]) with 1x1 conv + BN (no ReLU, as the official code) + dropout.
    """

    def __init__(self, low_channels: int, high_channels: int, out_channels: int, key_channels: int,
                 value_channels: int, dropout: float = 0.05, sizes: Sequence[int] | None = (1, 3, 6, 8),
                 mode: str = "avg", attention: str = "explicit"):
        super().__init__()
        self.attention = AttentionBranch(low_channels, key_channels, value_channels, out_channels,
                                         query_channels=high_channels, sizes=sizes, mode=mode, attention=attention)
        self.fuse = nn.Sequential(
            nn.Conv2d(out_channels + high_channels, out_channels, 1), nn.BatchNorm2d(out_channels),
            nn.Dropout2d(dropout),
        )
        grads_in_own_layout(self.fuse[0].weight, self.attention.W.weight)

    def forward(self, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
        return self.fuse[1:](fuse_concat(self.fuse[0], self.attention, high, high, low))

