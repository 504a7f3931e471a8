"""Mixed precision: the autocast dtype of each recipe precision, and autocast turned on or off.

`train.precision` and `eval.precision` are fp32, bf16 or fp16; fp32 runs without autocast. Code that must
stay in float32 whatever the surrounding autocast (the losses, the attention softmax) runs under
`autocast_off`.
"""

from __future__ import annotations

import contextlib

import torch

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, precision: str):
    """Autocast to the precision's dtype on the device; no autocast for fp32."""
    if precision not in AUTOCAST_DTYPES:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=AUTOCAST_DTYPES[precision])


def autocast_off(device: torch.device):
    """Autocast disabled on the device; nothing to disable where autocast does not exist (e.g. the meta
    device, used to count FLOPs and shapes)."""
    if device.type in ("cpu", "cuda", "xpu", "mps"):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()
