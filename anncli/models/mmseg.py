"""The mmsegmentation ANN network (`model.variant: mmseg`): ResNetV1c-D8 + ANNHead + aux FCNHead.

It differs from the official network (models/ann.py) where mmseg's `ann_r50-d8.py` config does:
- backbone ResNetV1c: deep stem 3x3 convs 32-32-64 held in a Sequential called `stem`, a plain 3x3/2
  max-pool (no ceil_mode), then the same dilated bottlenecks (contract dilation: the first block of a
  dilated stage uses half the dilation);
- every conv followed by BN (mmcv ConvModule) has no bias; value and output projections keep theirs;
- one Dropout2d(0.1) after AFNB and one before the classifier, none inside AFNB / APNB;
- the aux head is mmseg's FCNHead with one 3x3 conv of 256 channels, Dropout2d(0.1) and a 1x1 classifier;
- logits are resized to the input with bilinear `align_corners=False` (True in mmseg's 769x769 configs);
- in training the aux head runs after the decode head (the official network runs it first), so that
  with dropout active the same seed draws the same masks as mmseg.
Module names follow the official variant (backbone, afnb, context, apnb, classifier, aux_head), so
summaries, checkpoints and `--init-skip classifier` treat both variants alike.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from anncli.models.attention import AFNB, APNB
from anncli.models.resnet import Bottleneck, DilatedResNet, conv3x3, load_backbone_weights
from anncli.models.segmentor import SegmentationNet
from anncli.recipe import ModelConfig

STEM = (32, 32, 64)
DEPTHS = {"resnet50": [3, 4, 6, 3], "resnet101": [3, 4, 23, 3]}


def drop_bias(conv: nn.Conv2d) -> nn.Conv2d:
    """The conv without its bias parameter (mmcv's ConvModule sets bias=False when a norm follows)."""
    conv.register_parameter("bias", None)
    return conv


def conv_bn_relu(cin: int, cout: int, kernel: int = 1, relu: bool = True) -> nn.Sequential:
    layers = [drop_bias(nn.Conv2d(cin, cout, kernel, padding=kernel // 2)), nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, nn.ReLU(inplace=True)) if relu else nn.Sequential(*layers)


class ResNetV1c(DilatedResNet):
    """mmseg's ResNetV1c at output stride 8 or 16, returning [layer1, layer2, layer3, layer4]."""

    def __init__(self, layers: list[int], output_stride: int = 8):
        super().__init__(Bottleneck, layers, STEM, (64, 128, 256, 512), output_stride, halve_first=True)
        del self.prefix
        c1, c2, c3 = STEM
        self.stem = nn.Sequential(
            nn.Conv2d(3, c1, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c1), nn.ReLU(inplace=True),
            conv3x3(c1, c2), nn.BatchNorm2d(c2), nn.ReLU(inplace=True),
            conv3x3(c2, c3), nn.BatchNorm2d(c3), nn.ReLU(inplace=True),
        )
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self._init_weights()
        # state-dict order as mmseg writes it: stem first
        self._modules = OrderedDict([("stem", self._modules.pop("stem"))] + list(self._modules.items()))

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.stem(x)


def _mmseg_attention(block: nn.Module) -> nn.Module:
    """Make an official AFNB/APNB mmseg's: no conv bias before BN, no dropout at the end of the fuse."""
    att = block.attention
    for proj in (att.f_key, att.f_query):
        if proj is not None:
            drop_bias(proj[0])
    drop_bias(block.fuse[0])
    block.fuse = nn.Sequential(*[m for m in block.fuse if not isinstance(m, nn.Dropout2d)])
    return block


def build_mmseg_model(cfg: ModelConfig):
    """ResNetV1c-D8 + mmseg ANNHead (+ FCNHead aux) as a SegmentationNet with mmseg's resize rule."""
    if cfg.backbone not in DEPTHS:
        raise ValueError(f"the mmseg variant has backbones {sorted(DEPTHS)}, not {cfg.backbone!r}")
    backbone = ResNetV1c(DEPTHS[cfg.backbone], cfg.output_stride)
    if cfg.pretrained:
        load_backbone_weights(backbone, cfg.pretrained)
    c3, c4, width, k = 1024, 2048, 512, cfg.num_classes
    sizes = None if cfg.name == "nonlocal" else cfg.psp_sizes
    afnb = _mmseg_attention(AFNB(c3, c4, c4, cfg.key_channels, cfg.value_channels, 0.0, sizes, cfg.psp_pool,
                                 cfg.attention))
    apnb = _mmseg_attention(APNB(width, width, cfg.key_channels, cfg.value_channels, 0.0, sizes, cfg.psp_pool,
                                 cfg.attention))
    context = nn.Sequential(nn.Dropout2d(cfg.dropout), *conv_bn_relu(c4, width, kernel=3))
    classifier = nn.Sequential(nn.Dropout2d(cfg.dropout), nn.Conv2d(width, k, 1))
    aux_head = None
    if cfg.aux:
        aux_head = nn.Sequential(conv_bn_relu(c3, 256, kernel=3), nn.Dropout2d(cfg.dropout), nn.Conv2d(256, k, 1))
    for conv in (classifier[1], aux_head[2] if aux_head is not None else None):
        if conv is not None:  # mmseg's decode-head init: conv_seg ~ Normal(0, 0.01), bias 0
            nn.init.normal_(conv.weight, 0, 0.01)
            nn.init.zeros_(conv.bias)
    return SegmentationNet(backbone, context, classifier, k, afnb=afnb, apnb=apnb, aux_head=aux_head,
                           align_corners=cfg.resolved_align_corners, aux_first=False)
