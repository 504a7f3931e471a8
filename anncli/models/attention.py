"""Pyramid anchor sampling, APNB, AFNB and the plain non-local block they are compared with.

Shapes: B batch, N = H*W query positions, S anchors (110 for pyramid sizes 1, 3, 6, 8, or N without
sampling), Ck key channels, Cv value channels. The similarity and softmax run in float32 with
autocast off, whatever the input dtype, so that bf16/fp16 training stays stable.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from anncli.precision import autocast_off


def attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """softmax(q·kᵀ / sqrt(Ck)) · v in float32; query (B,N,Ck), key (B,S,Ck), value (B,S,Cv) -> (B,N,Cv).

    The query is scaled before the product so that only one N×S map is live besides its softmax.
    """
    with autocast_off(query.device):
        q = query.float() * query.shape[-1] ** -0.5
        sim = torch.softmax(torch.matmul(q, key.float().transpose(1, 2)), dim=-1)
        out = torch.matmul(sim, value.float())
    return out.to(value.dtype)


class AnchorSampler(nn.Module):
    """Pools a map (B,C,H,W) to the concatenated pyramid of `sizes`x`sizes` grids: (B,C,S)."""

    def __init__(self, sizes: Sequence[int] = (1, 3, 6, 8), mode: str = "avg"):
        super().__init__()
        if mode not in ("avg", "max"):
            raise ValueError(f"pooling mode must be avg or max, got {mode!r}")
        self.sizes = tuple(int(s) for s in sizes)
        pool = nn.AdaptiveAvgPool2d if mode == "avg" else nn.AdaptiveMaxPool2d
        self.pools = nn.ModuleList(pool(s) for s in self.sizes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([p(x).flatten(2) for p in self.pools], dim=2)


def conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class AttentionBranch(nn.Module):
    """Projections, (optionally sampled) attention and the zero-initialised output conv W.

    With `query_channels=None` query and key share one projection, computed once. With `sizes=None`
    every key position is an anchor: the plain non-local block.
    """

    def __init__(self, key_in: int, key_channels: int, value_channels: int, out_channels: int,
                 query_channels: int | None = None, sizes: Sequence[int] | None = (1, 3, 6, 8),
                 mode: str = "avg"):
        super().__init__()
        self.f_key = conv_bn_relu(key_in, key_channels)
        self.f_query = None if query_channels is None else conv_bn_relu(query_channels, key_channels)
        self.f_value = nn.Conv2d(key_in, value_channels, 1)
        self.sampler = None if sizes is None else AnchorSampler(sizes, mode)
        self.W = nn.Conv2d(value_channels, out_channels, 1)
        nn.init.zeros_(self.W.weight)
        nn.init.zeros_(self.W.bias)

    def _anchors(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(2) if self.sampler is None else self.sampler(x)

    def forward(self, query_feats: torch.Tensor, key_feats: torch.Tensor | None = None) -> torch.Tensor:
        key_feats = query_feats if key_feats is None else key_feats
        b, _, h, w = query_feats.shape
        key_map = self.f_key(key_feats)
        query = key_map if self.f_query is None else self.f_query(query_feats)
        key = self._anchors(key_map)
        value = self._anchors(self.f_value(key_feats))
        context = attend(query.flatten(2).transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2))
        return self.W(context.transpose(1, 2).reshape(b, -1, h, w))


class NonLocalBlock(AttentionBranch):
    """The plain non-local block of the efficiency comparison: shared key/query, full N×N attention."""

    def __init__(self, in_channels: int, out_channels: int, key_channels: int = 256, value_channels: int = 256):
        super().__init__(in_channels, key_channels, value_channels, out_channels, sizes=None)


class APNBAttention(AttentionBranch):
    """The attention branch of APNB alone (no fuse conv), as the paper's efficiency table measures it."""

    def __init__(self, in_channels: int, out_channels: int, key_channels: int = 256, value_channels: int = 256,
                 sizes: Sequence[int] = (1, 3, 6, 8), mode: str = "avg"):
        super().__init__(in_channels, key_channels, value_channels, out_channels, sizes=sizes, mode=mode)


class APNB(nn.Module):
    """Asymmetric Pyramid Non-local Block: fuse(cat[W(attention(x)), x]) with 1x1 conv + BN + ReLU + dropout.

    `sizes=None` gives the same block with full non-local attention.
    """

    def __init__(self, in_channels: int, out_channels: int, key_channels: int, value_channels: int,
                 dropout: float = 0.05, sizes: Sequence[int] | None = (1, 3, 6, 8), mode: str = "avg"):
        super().__init__()
        self.attention = AttentionBranch(in_channels, key_channels, value_channels, out_channels,
                                         sizes=sizes, mode=mode)
        self.fuse = nn.Sequential(
            nn.Conv2d(out_channels + in_channels, out_channels, 1), nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True), nn.Dropout2d(dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fuse(torch.cat([self.attention(x), x], dim=1))


class AFNB(nn.Module):
    """Asymmetric Fusion Non-local Block: queries from the high level, keys/values from the low level.

    fuse(cat[W(attention), high]) with 1x1 conv + BN (no ReLU, as the official code) + dropout.
    """

    def __init__(self, low_channels: int, high_channels: int, out_channels: int, key_channels: int,
                 value_channels: int, dropout: float = 0.05, sizes: Sequence[int] | None = (1, 3, 6, 8),
                 mode: str = "avg"):
        super().__init__()
        self.attention = AttentionBranch(low_channels, key_channels, value_channels, out_channels,
                                         query_channels=high_channels, sizes=sizes, mode=mode)
        self.fuse = nn.Sequential(
            nn.Conv2d(out_channels + high_channels, out_channels, 1), nn.BatchNorm2d(out_channels),
            nn.Dropout2d(dropout),
        )

    def forward(self, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
        return self.fuse(torch.cat([self.attention(high, low), high], dim=1))

