"""Dilated deep-stem ResNets (output stride 8 or 16) and the small basic-block backbone for CPU demos.

The deep stem follows the official ANN code (MendelXu/ANN, torchcv `deepbase_resnet*_dilated8`): three
3x3 convs 64-64-128 held in a module called `prefix`, a 3x3/2 max-pool with ceil_mode, bottlenecks with
the stride on the 3x3 conv, and dilation in place of stride in the last stages. The first block of a
dilated stage uses half the dilation, so a 769x769 input gives 97x97 stride-8 maps.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

from anncli.errors import UserError


def conv3x3(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, dilation: int = 1, first_dilation: int = 1,
                 downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride, first_dilation)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, 1, dilation)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """ResNet v1.5 bottleneck: the stride (or dilation) sits on the 3x3 conv."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, dilation: int = 1, first_dilation: int = 1,
                 downsample: nn.Module | None = None):
        super().__init__()
        del dilation  # a bottleneck has one 3x3 conv; it takes `first_dilation`
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride, first_dilation)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


def deep_stem(widths: tuple[int, int, int]) -> nn.Sequential:
    c1, c2, c3 = widths
    return nn.Sequential(OrderedDict([
        ("conv1", nn.Conv2d(3, c1, 3, stride=2, padding=1, bias=False)), ("bn1", nn.BatchNorm2d(c1)),
        ("relu1", nn.ReLU(inplace=True)),
        ("conv2", conv3x3(c1, c2)), ("bn2", nn.BatchNorm2d(c2)), ("relu2", nn.ReLU(inplace=True)),
        ("conv3", conv3x3(c2, c3)), ("bn3", nn.BatchNorm2d(c3)), ("relu3", nn.ReLU(inplace=True)),
    ]))


class DilatedResNet(nn.Module):
    """Backbone returning the four stage outputs [layer1, layer2, layer3, layer4].

    `dilations` gives (stride, dilation) per stage for layer3 and layer4; `halve_first` makes the first
    block of a dilated stage use half the dilation (the official `_nostride_dilate` rule).
    """

    def __init__(self, block, layers: list[int], stem: tuple[int, int, int], widths: tuple[int, ...],
                 output_stride: int = 8, halve_first: bool = True):
        super().__init__()
        if output_stride not in (8, 16):
            raise ValueError(f"output_stride must be 8 or 16, got {output_stride}")
        self.prefix = deep_stem(stem)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True)
        self.halve_first = halve_first
        self.inplanes = stem[2]
        plan = [(1, 1), (2, 1), (1, 2), (1, 4)] if output_stride == 8 else [(1, 1), (2, 1), (2, 1), (1, 2)]
        self.layer1, self.layer2, self.layer3, self.layer4 = (
            self._make_layer(block, width, n, stride, dilation)
            for width, n, (stride, dilation) in zip(widths, layers, plan)
        )
        self.out_channels = [w * block.expansion for w in widths]
        self._init_weights()

    def _make_layer(self, block, planes: int, blocks: int, stride: int, dilation: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion),
            )
        first = max(dilation // 2, 1) if self.halve_first else dilation
        layers = [block(self.inplanes, planes, stride, dilation, first, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes, 1, dilation, dilation) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.prefix(x)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.maxpool(self._stem(x))
        c1 = self.layer1(x)
        c2 = self.layer2(c1)
        c3 = self.layer3(c2)
        return [c1, c2, c3, self.layer4(c3)]


def resnet50(output_stride: int = 8) -> DilatedResNet:
    return DilatedResNet(Bottleneck, [3, 4, 6, 3], (64, 64, 128), (64, 128, 256, 512), output_stride)


def resnet101(output_stride: int = 8) -> DilatedResNet:
    return DilatedResNet(Bottleneck, [3, 4, 23, 3], (64, 64, 128), (64, 128, 256, 512), output_stride)


def small_basic_resnet(output_stride: int = 8) -> DilatedResNet:
    """A small basic-block backbone for CPU demos and tests (not a paper model).

    Stem 16-16-32, one basic block per stage, channels 32/64/128/256; at output stride 8 every conv of
    layer3 is dilated by 2 and every conv of layer4 by 4.
    """
    return DilatedResNet(BasicBlock, [1, 1, 1, 1], (16, 16, 32), (32, 64, 128, 256), output_stride,
                         halve_first=False)


BACKBONES = {"resnet50": resnet50, "resnet101": resnet101, "small": small_basic_resnet}
_STEM_KEYS = ("conv1.", "bn1.", "conv2.", "bn2.", "conv3.", "bn3.")


def _short_list(names: list[str], limit: int = 4) -> str:
    more = f" (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _unwrap(obj) -> dict[str, torch.Tensor]:
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError("not a state dict of tensors")
    return obj


def _to_backbone_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map official (`prefix.*`), segmentation-checkpoint (`backbone.*`) and torchvision-style keys."""
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if any(k.startswith("backbone.") for k in state):
        state = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
    out = {}
    for key, value in state.items():
        if key.startswith("fc."):
            continue
        out["prefix." + key if key.startswith(_STEM_KEYS) else key] = value
    return out


def load_backbone_weights(backbone: nn.Module, path: str | Path) -> None:
    """Load ImageNet weights into a backbone from a local file; any mismatch is one UserError line."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"model.pretrained: {path}: file not found")
    try:
        state = _to_backbone_keys(_unwrap(torch.load(path, map_location="cpu", weights_only=True)))
    except Exception as e:  # noqa: BLE001 - any unreadable file is the user's input
        raise UserError(f"model.pretrained: {path}: cannot read backbone weights ({type(e).__name__}: {e})".split("\n")[0]) from None
    own = backbone.state_dict()
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    wrong = [f"{k} {list(state[k].shape)} vs {list(v.shape)}" for k, v in own.items()
             if k in state and state[k].shape != v.shape]
    if missing or unexpected or wrong:
        parts = [f"{label}: {_short_list(names)}" for label, names in
                 (("missing", missing), ("unexpected", unexpected), ("shape mismatch", wrong)) if names]
        raise UserError(f"model.pretrained: {path}: weights do not fit the deep-stem backbone; " + "; ".join(parts))
    backbone.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
