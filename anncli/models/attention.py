"""Pyramid anchor sampling, APNB, AFNB and the plain non-local block they are compared with.

Shapes: B batch, N = H*W query positions, S anchors (110 for pyramid sizes 1, 3, 6, 8, or N without
sampling), Ck key channels, Cv value channels. The similarity and softmax run in float32 with
autocast off, whatever the input dtype, so that bf16/fp16 training stays stable.

Exact savings over the literal formulation (all equal to it up to float rounding):
- the value path pools first and projects only the S anchors (`pool_then_project`);
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

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from anncli.precision import autocast_off

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
        captured = _CAPTURED.get()
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


def pool_then_project(x: torch.Tensor, conv: nn.Conv2d, sampler: nn.Module) -> torch.Tensor:
    """`sampler(conv(x))` computed as `conv(sampler(x))`: (B,Cin,H,W) -> (B,Cout,S).

    For a 1x1 convolution (a per-position affine map W·x + b) and anchors that are averages of
    positions, mean(W·x + b) = W·mean(x) + b: projecting the S pooled anchors instead of the N
    positions saves N·Cin·Cout multiply-adds, forward and backward. Any average-pooling sampler with
    the (B,C,H,W) -> (B,C,S) contract works (the ANN AnchorSampler, mmseg's PPMConcat).
    The key path cannot do this: its conv is followed by BN and ReLU, and ReLU does not commute with
    averaging (nor does train-mode BN, whose statistics are taken over all N positions).
    """
    if conv.kernel_size != (1, 1) or conv.groups != 1:
        raise ValueError("pool_then_project needs a plain 1x1 convolution")
    anchors = sampler(x)
    return F.conv1d(anchors, conv.weight.flatten(2), conv.bias)


@functools.lru_cache(maxsize=64)
def _bin_mean_table(length: int, sizes: tuple[int, ...]) -> np.ndarray:
    """(length, sum(sizes)) float64: column j averages adaptive-pooling bin j (floor/ceil edges, as torch's).

    Cached as numpy, never as a tensor: a tensor made while torch.export traces is a fake one, and a
    cached fake tensor would break every later eager call.
    """
    cols = np.zeros((length, sum(sizes)))
    j = 0
    for s in sizes:
        for i in range(s):
            start, end = (i * length) // s, -(-(i + 1) * length // s)
            cols[start:end, j] = 1.0 / (end - start)
            j += 1
    return cols


def _bin_means(length: int, sizes: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return torch.from_numpy(_bin_mean_table(int(length), sizes)).to(device=device, dtype=dtype)


class AnchorSampler(nn.Module):
    """Pools a map (B,C,H,W) to the concatenated pyramid of `sizes`x`sizes` grids: (B,C,S).

    Average pooling is separable: every level's bins are the product of row bins and column bins, so
    one matmul with the (W, Σs) column-bin means and one small one per level with the row-bin means
    give every level's anchors (torch's adaptive pooling reads the whole map once per level, and on
    CPU is slower than the 1x1 projection it replaces). `separable=False` runs torch's adaptive pools.
    """

    def __init__(self, sizes: Sequence[int] = (1, 3, 6, 8), mode: str = "avg"):
        super().__init__()
        if mode not in ("avg", "max"):
            raise ValueError(f"pooling mode must be avg or max, got {mode!r}")
        self.sizes = tuple(int(s) for s in sizes)
        self.mode = mode
        pool = nn.AdaptiveAvgPool2d if mode == "avg" else nn.AdaptiveMaxPool2d
        self.pools = nn.ModuleList(pool(s) for s in self.sizes)
        self.separable = mode == "avg"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.separable and self.mode == "avg"):
            return torch.cat([p(x).flatten(2) for p in self.pools], dim=2)
        h, w = x.shape[-2:]
        with autocast_off(x.device):  # averages in the input's precision, at least float32
            xf = x if x.dtype in (torch.float32, torch.float64) else x.float()
            rows = _bin_means(h, self.sizes, x.device, xf.dtype)
            cols = torch.matmul(xf, _bin_means(w, self.sizes, x.device, xf.dtype))  # (B,C,H,Σs)
            out, j = [], 0
            for s in self.sizes:
                grid = torch.matmul(rows[:, j:j + s].t(), cols[..., j:j + s])  # (B,C,s,s)
                out.append(grid.flatten(2))
                j += s
        return torch.cat(out, dim=2).to(x.dtype)


def conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class AttentionBranch(nn.Module):
    """Projections, (optionally sampled) attention and the zero-initialised output conv W.

    With `query_channels=None` query and key share one projection, computed once. With `sizes=None`
    every key position is an anchor: the plain non-local block, which always keeps the explicit N×N
    map (it is the paper's point of comparison). `pool_first=False` runs the literal value path
    (project every position, then pool), kept for equivalence tests and before/after benchmarks.

    `fold_output` (with anchors only) moves the output conv W before the attention: the S anchor values
    are mapped to the output width and the attention averages those, N·S·Cout multiply-adds instead of
    N·S·Cv + N·Cv·Cout. A caller whose next step is a linear map of this branch's output passes its
    matrix as `after` (C, Cout), and it is folded in too. The plain non-local block (S = N) never folds:
    there it would cost more, and its explicit N×N map is the point of comparison.
    """

    def __init__(self, key_in: int, key_channels: int, value_channels: int, out_channels: int,
                 query_channels: int | None = None, sizes: Sequence[int] | None = (1, 3, 6, 8),
                 mode: str = "avg", attention: str = "explicit"):
        super().__init__()
        if attention not in ATTENTION_IMPLS:
            raise ValueError(f"attention must be one of {ATTENTION_IMPLS}, got {attention!r}")
        self.impl = "explicit" if sizes is None else attention
        self.pool_first = True
        self.fold_output = True
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

    def _values(self, key_feats: torch.Tensor) -> torch.Tensor:
        if self.pool_first and self.sampler is not None and self.sampler.mode == "avg":
            return pool_then_project(key_feats, self.f_value, self.sampler)
        return self._anchors(self.f_value(key_feats))  # max pooling does not commute with the projection

    @property
    def folds_output(self) -> bool:
        return self.fold_output and self.sampler is not None

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
        if self.folds_output:  # map the S anchor values to the output, then attend
            value = F.conv1d(value, self.W.weight.flatten(2), self.W.bias)
            if after is not None:
                value = torch.matmul(after, value)
            return attend(query, key, value, self.impl).view(b, -1, h, w)
        out = self.W(attend(query, key, value, self.impl).view(b, -1, h, w))
        return out if after is None else F.conv2d(out, after[:, :, None, None])


def fuse_concat(conv: nn.Conv2d, branch: AttentionBranch, rest: torch.Tensor, *inputs: torch.Tensor) -> torch.Tensor:
    """`conv(cat[branch(*inputs), rest])` for a 1x1 conv, with the conv's columns that read the branch
    folded into the branch's output map (`AttentionBranch.fold_output`); the literal concat otherwise."""
    if not branch.folds_output:
        return conv(torch.cat([branch(*inputs), rest], dim=1))
    split = branch.W.out_channels
    # split (not two slices): its backward writes the weight gradient once, with no zero-filled copies
    on_branch, on_rest = conv.weight.split([split, conv.in_channels - split], dim=1)
    # the contiguous conv output first: the sum takes its layout whatever the branch hands back
    return F.conv2d(rest, on_rest, conv.bias) + branch(*inputs, after=on_branch.flatten(1))


def set_literal(module: nn.Module, literal: bool = True) -> nn.Module:
    """Every attention branch in `module` computed literally (project every position, adaptive pools,
    attend, then W and the fuse concat), as the official code does, or with the exact savings (default)."""
    for m in module.modules():
        if isinstance(m, AttentionBranch):
            m.pool_first = m.fold_output = not literal
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

    def forward(self, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
        return self.fuse[1:](fuse_concat(self.fuse[0], self.attention, high, high, low))

