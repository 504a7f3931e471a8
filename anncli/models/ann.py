"""The ANN network (backbone + AFNB + 3x3 conv + APNB + classifier, aux head on layer3) and its baselines.

`build_model` turns a `ModelConfig` into one of:
- `ann`: the official MendelXu/ANN structure;
- `nonlocal`: the same network with full N×N attention in both blocks (the plain non-local baseline);
- `fcn`: the same backbone with a 3x3 conv head, no attention.
In train mode the network returns (main_logits, aux_logits or None); in eval mode main_logits only,
both upsampled to the input size (bilinear, align_corners=True) as the official code does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from anncli.models.attention import AFNB, APNB
from anncli.models.resnet import BACKBONES, load_backbone_weights
from anncli.recipe import ModelConfig


def conv3x3_bn_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def fcn_head(cin: int, width: int, num_classes: int, dropout: float) -> nn.Sequential:
    """3x3 conv + BN + ReLU + Dropout2d + 1x1 classifier (the official `dsn` aux head)."""
    return nn.Sequential(conv3x3_bn_relu(cin, width), nn.Dropout2d(dropout), nn.Conv2d(width, num_classes, 1))


def upsample_to(x: torch.Tensor, size, align_corners: bool = True) -> torch.Tensor:
    return F.interpolate(x, size=size, mode="bilinear", align_corners=align_corners)


class SegmentationNet(nn.Module):
    """Backbone, optional AFNB, context conv, optional APNB, classifier and optional aux head."""

    def __init__(self, backbone: nn.Module, context: nn.Module, classifier: nn.Module, num_classes: int,
                 afnb: nn.Module | None = None, apnb: nn.Module | None = None, aux_head: nn.Module | None = None,
                 align_corners: bool = True, aux_first: bool = True):
        super().__init__()
        self.backbone = backbone
        self.afnb = afnb
        self.context = context
        self.apnb = apnb
        self.classifier = classifier
        self.aux_head = aux_head
        self.num_classes = num_classes
        self.aux = aux_head is not None
        self.align_corners = align_corners
        self.aux_first = aux_first

    def forward(self, x: torch.Tensor):
        size = x.shape[-2:]
        *_, c3, c4 = self.backbone(x)
        aux = None
        if self.training and self.aux_head is not None and self.aux_first:
            aux = self.aux_head(c3)  # the official code runs its aux head first: same dropout draws
        y = c4 if self.afnb is None else self.afnb(c3, c4)
        y = self.context(y)
        if self.apnb is not None:
            y = self.apnb(y)
        main = upsample_to(self.classifier(y), size, self.align_corners)
        if not self.training:
            return main
        if self.aux_head is not None and aux is None:
            aux = self.aux_head(c3)  # mmseg: decode head, then auxiliary head
        return main, None if aux is None else upsample_to(aux, size, self.align_corners)


def build_model(cfg: ModelConfig) -> SegmentationNet:
    """Build the network of `cfg` with plain BatchNorm2d (callers convert to SyncBN / channels_last)."""
    if cfg.variant == "mmseg":
        from anncli.models.mmseg import build_mmseg_model

        return build_mmseg_model(cfg)
    backbone = BACKBONES[cfg.backbone](cfg.output_stride)
    if cfg.pretrained:
        load_backbone_weights(backbone, cfg.pretrained)
    c3, c4 = backbone.out_channels[2], backbone.out_channels[3]
    small = cfg.backbone == "small"
    width, aux_width = (128, 64) if small else (512, 512)
    k = cfg.num_classes
    aux_head = fcn_head(c3, aux_width, k, cfg.dropout) if cfg.aux else None
    if cfg.name == "fcn":
        context = nn.Sequential(conv3x3_bn_relu(c4, width), nn.Dropout2d(cfg.dropout))
        return SegmentationNet(backbone, context, nn.Conv2d(width, k, 1), k, aux_head=aux_head)
    sizes = None if cfg.name == "nonlocal" else cfg.psp_sizes
    afnb = AFNB(c3, c4, c4, cfg.key_channels, cfg.value_channels, cfg.dropout, sizes, cfg.psp_pool, cfg.attention)
    apnb = APNB(width, width, cfg.key_channels, cfg.value_channels, cfg.dropout, sizes, cfg.psp_pool, cfg.attention)
    return SegmentationNet(backbone, conv3x3_bn_relu(c4, width), nn.Conv2d(width, k, 1), k,
                           afnb=afnb, apnb=apnb, aux_head=aux_head, align_corners=cfg.resolved_align_corners)
