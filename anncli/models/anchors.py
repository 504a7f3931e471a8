"""Pyramid anchor pooling: a map (B,C,H,W) averaged (or max-pooled) to 1x1, 3x3, 6x6 and 8x8 grids,
110 anchors in all, and the value projection computed on those anchors instead of every position."""

from __future__ import annotations

import functools
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from anncli.models.precision import autocast_off


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


def _bin_means(length: int, sizes: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(length, sum(sizes)): column j averages adaptive-pooling bin j (floor/ceil edges, as torch's).

    Eager calls get a matrix built once per (length, sizes, device, dtype). While torch.compile, torch.export
    or a TorchScript trace runs, it is built from torch ops instead: traced without a graph break (folded
    into a constant for a fixed size), and no trace sees a tensor cached from another one.
    """
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return _build_bin_means(length, sizes, device, dtype)
    return _cached_bin_means(length, sizes, device, dtype)


@functools.lru_cache(maxsize=256)  # whole-image evaluation meets many sizes; each matrix is a few KB
def _cached_bin_means(length: int, sizes: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    with torch.inference_mode(False), torch.no_grad():  # usable by autograd even if first built for inference
        return _build_bin_means(length, sizes, device, dtype)


def _build_bin_means(length: int, sizes: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The weights are 1/count in float64, then cast to `dtype`."""
    positions = torch.arange(length, device=device).unsqueeze(1)  # (length, 1)
    columns = []
    for s in sizes:
        bins = torch.arange(s, device=device)
        start = torch.div(bins * length, s, rounding_mode="floor")
        end = -torch.div(-(bins + 1) * length, s, rounding_mode="floor")  # ceil
        inside = (positions >= start) & (positions < end)  # (length, s)
        columns.append(inside.to(torch.float64) / (end - start).to(torch.float64))
    return torch.cat(columns, dim=1).to(dtype)


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
        self.count = sum(s * s for s in self.sizes)  # S, the anchors per map
        self.mode = mode
        pool = nn.AdaptiveAvgPool2d if mode == "avg" else nn.AdaptiveMaxPool2d
        self.pools = nn.ModuleList(pool(s) for s in self.sizes)
        self.separable = mode == "avg"

    def macs_per_channel(self, h: int, w: int) -> int:
        """Multiply-adds of the separable pooling per channel: the column bins, then the rows per level."""
        return h * w * sum(self.sizes) + h * self.count

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
