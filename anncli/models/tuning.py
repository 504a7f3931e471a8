"""Device settings that change speed, not the model's maths: cuDNN autotuning or deterministic
algorithms, the channels_last memory format, and torch.compile of a network.

- `model.channels_last` is true, false or auto (on CUDA, off on CPU): NHWC weights and inputs, the
  layout tensor cores read without transposes; the same convolutions, only float rounding may differ.
- Where shapes repeat (training on fixed crops, sliding-window evaluation) cuDNN benchmarks its
  convolution algorithms once per shape and keeps the fastest (`torch.backends.cudnn.benchmark`).
  `train.deterministic: true` turns that off and asks torch for deterministic algorithms instead, as
  torch's reproducibility notes describe (CUBLAS_WORKSPACE_CONFIG, `use_deterministic_algorithms`).
"""

from __future__ import annotations

import os

import torch

# The cuBLAS workspace setting torch's reproducibility notes name for deterministic cuBLAS (CUDA >= 10.2).
CUBLAS_WORKSPACE = ":4096:8"


def use_channels_last(setting, device: torch.device) -> bool:
    """`model.channels_last` on this device: true/false as given, auto = on CUDA only."""
    return device.type == "cuda" if setting == "auto" else bool(setting)


def memory_format(setting, device: torch.device) -> torch.memory_format:
    return torch.channels_last if use_channels_last(setting, device) else torch.contiguous_format


def configure_algorithms(device: torch.device, deterministic: bool, shapes_repeat: bool = True) -> None:
    """Deterministic algorithms, or cuDNN autotuning on CUDA when the same shapes come again.

    Deterministic mode uses `warn_only=True`: torch then warns (once per op) instead of failing where an op
    has no deterministic CUDA kernel (the backward of bilinear upsampling, NLL loss), and those ops stay
    nondeterministic; everything else (convolutions, matmuls, reductions torch controls) is reproducible.
    """
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)  # read when cuBLAS starts
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
        torch.use_deterministic_algorithms(True, warn_only=True)
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = shapes_repeat
