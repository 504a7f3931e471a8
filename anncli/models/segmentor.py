"""The network shell both variants share: backbone, optional AFNB, context conv, optional APNB, classifier and
optional aux head (`SegmentationNet`), and the small heads and resize it is built from.

In train mode the network returns (main_logits, aux_logits or None); in eval mode main_logits only, both
resized to the input size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


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
