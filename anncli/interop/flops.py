"""FLOPs of one forward, counted from shapes with torch's FlopCounterMode (a multiply-add counts 2).

Build the module and its input on the meta device and counting needs no memory and no compute, even for a
ResNet-101 at 769x769.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_forward_flops(module: nn.Module, x: torch.Tensor) -> int:
    """FLOPs of one eval-mode forward of `module` on `x` under no_grad."""
    module.eval()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        module(x)
    return int(counter.get_total_flops())
