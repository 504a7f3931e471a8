"""The ANN network (backbone + AFNB + 3x3 conv + APNB + classifier, aux head on layer3) and its baselines.

`build_model` turns a `ModelConfig` into one of:
- `ann`: the official MendelXu/ANN structure;
- `nonlocal`: the same network with full N×N attention in both blocks (the plain non-local baseline);
- `fcn`: the same backbone with a 3x3 conv head, no attention.
In train mode the network returns (main_logits, aux_logits or None); in eval mode main_logits only,
both upsampled to the input size (bilinear, align_corners=True) as the official code does.
"""

from __future__ import annotations

from torch import nn

from anncli.models.attention import AFNB, APNB
from anncli.models.mmseg import build_mmseg_model
from anncli.models.resnet import BACKBONES, load_backbone_weights
from anncli.models.segmentor import SegmentationNet, conv3x3_bn_relu, fcn_head
from anncli.recipe import ModelConfig


def build_model(cfg: ModelConfig) -> SegmentationNet:
    """Build the network of `cfg` with plain BatchNorm2d (callers convert to SyncBN / channels_last)."""
    if cfg.variant == "mmseg":
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
