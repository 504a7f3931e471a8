"""Test-time inference: whole image or sliding windows, multi-scale, horizontal flip; the protocol that says
which, and the network with a checkpoint's weights to run it on.

Every view (one scale, flipped or not) produces logits at its own size; they are resized to the
original resolution right away and added to one accumulator, so memory holds one view at a time.
`merge="logits"` sums raw logits (the official ANN test code); `merge="softmax"` averages
probabilities (mmseg's TTA). A scaled image smaller than the window in either dimension runs whole,
as in the official `mscrop_test`. Images and logits are resized bilinearly with align_corners=False
(mmseg's choice; the official code resizes logits with cv2 bicubic), and the accumulator is float32
on the image's device.

Speed without other numbers: the windows of one view go through the network `batch_windows` at a time
(auto: as many as half the free CUDA memory holds, a few on CPU), in channels_last where the recipe's
`model.channels_last` says so (auto: on CUDA), under autocast for bf16/fp16; every window's logits are
cast to float32 before they are added up.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from anncli.errors import UserError
from anncli.models.precision import autocast
from anncli.data.sizes import parse_hw
from anncli.models.tuning import memory_format

# `eval.batch_windows: auto`: windows per forward on CPU (more only add memory there), and the memory one
# window of the image takes on CUDA: ANN-R101-D8 peaks at about 1.2 KB per input pixel in float32 without
# gradients (benchmarks/results/eval_memory.json: 0.84 GiB for 864x864), rounded up for cuDNN workspace.
CPU_BATCH_WINDOWS = 4
WINDOW_BYTES_PER_PIXEL = 1536


@dataclass(frozen=True)
class Protocol:
    """How one image is turned into class scores; every field is reported with the metrics."""

    scales: tuple[float, ...] = (1.0,)
    flip: bool = False
    mode: str = "whole"  # whole | slide
    crop: Optional[tuple[int, int]] = None  # (h, w) of a sliding window
    stride: Optional[tuple[int, int]] = None
    merge: str = "logits"  # logits | softmax
    resize_short: Optional[int] = None  # base resize before the scales (ADE/Context protocol)
    max_long: Optional[int] = None
    size_divisor: int = 1  # zero-pad right/bottom to a multiple, crop the logits back
    precision: str = "fp32"  # fp32 | bf16 | fp16 (autocast)
    batch_windows: int | str = "auto"  # sliding windows per forward, or auto (windows_per_batch)
    channels_last: bool | str = "auto"  # the model's memory format (model.channels_last; auto: on CUDA)
    mean: tuple[float, float, float] = (123.675, 116.28, 103.53)
    std: tuple[float, float, float] = (58.395, 57.12, 57.375)
    bgr: bool = False

    @classmethod
    def from_recipe(cls, recipe, **changes) -> "Protocol":
        """The recipe's eval section and normalisation; `changes` override single fields."""
        ev, aug = recipe.eval, recipe.augment
        fields = dict(
            scales=(1.0,), flip=False, mode=ev.mode, crop=ev.crop, stride=ev.stride, merge=ev.merge,
            resize_short=ev.resize_short, max_long=ev.max_long, size_divisor=ev.size_divisor,
            precision=ev.precision, mean=tuple(aug.mean), std=tuple(aug.std), bgr=aug.bgr,
            batch_windows=ev.batch_windows, channels_last=recipe.model.channels_last,
        )
        fields.update(changes)
        fields["scales"] = tuple(float(s) for s in fields["scales"])
        return cls(**fields)

    def describe(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}


def base_factor(height: int, width: int, protocol: Protocol) -> float:
    """Resize factor applied before the scales: short side to resize_short, long side at most max_long."""
    factor = 1.0
    if protocol.resize_short:
        factor = protocol.resize_short / min(height, width)
    if protocol.max_long:
        factor = min(factor, protocol.max_long / max(height, width))
    return factor


def view_sizes(height: int, width: int, protocol: Protocol) -> list[tuple[int, int]]:
    base = base_factor(height, width, protocol)
    return [(max(1, round(height * base * s)), max(1, round(width * base * s))) for s in protocol.scales]


def _logits(output) -> torch.Tensor:
    if isinstance(output, (tuple, list)):
        output = output[0]
    elif isinstance(output, dict):
        output = output["out"]
    return output


def forward_padded(model, x: torch.Tensor, size_divisor: int = 1,
                   layout: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    """float32 logits [B, K, h, w] for input [B, 3, h, w]; pads to the divisor and crops the padding away."""
    h, w = x.shape[-2:]
    pad_h, pad_w = (-h) % size_divisor, (-w) % size_divisor
    if pad_h or pad_w:
        x = F.pad(x, (0, pad_w, 0, pad_h))
    out = _logits(model(x.contiguous(memory_format=layout))).float()
    if out.shape[-2:] != x.shape[-2:]:
        out = F.interpolate(out, size=x.shape[-2:], mode="bilinear", align_corners=False)
    return out[..., :h, :w]


def window_starts(length: int, crop: int, stride: int) -> list[int]:
    """Window origins along one axis; the last window is aligned to the border."""
    count = max(length - crop + stride - 1, 0) // stride + 1
    return sorted({min(i * stride, max(length - crop, 0)) for i in range(count)})


def windows_per_batch(setting: int | str, windows: int, crop: tuple[int, int], device: torch.device) -> int:
    """How many of a view's `windows` go through the network together: `eval.batch_windows` (at most all
    of them), or auto: on CUDA as many as half the free memory holds, on CPU CPU_BATCH_WINDOWS."""
    if setting != "auto":
        return max(1, min(int(setting), windows))
    if device.type != "cuda":
        return min(CPU_BATCH_WINDOWS, windows)
    free, _ = torch.cuda.mem_get_info(device)
    free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)  # cached, reusable
    return max(1, min(windows, int(free // 2 // (crop[0] * crop[1] * WINDOW_BYTES_PER_PIXEL))))


def slide_logits(model, x: torch.Tensor, crop: tuple[int, int], stride: tuple[int, int], size_divisor: int = 1,
                 batch_windows: int | str = 1, layout: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    """float32 logits of overlapping windows, each pixel the mean over the windows that cover it; the
    windows go through the network `batch_windows` at a time (windows_per_batch)."""
    n, h, w = x.shape[0], *x.shape[-2:]
    origins = [(y, x0) for y in window_starts(h, crop[0], stride[0]) for x0 in window_starts(w, crop[1], stride[1])]
    per_batch = windows_per_batch(batch_windows, len(origins), crop, x.device)
    total = counts = None
    for first in range(0, len(origins), per_batch):
        group = origins[first:first + per_batch]
        windows = torch.cat([x[..., y:y + crop[0], x0:x0 + crop[1]] for y, x0 in group])
        out = forward_padded(model, windows, size_divisor, layout)
        if total is None:
            total = out.new_zeros((n, out.shape[1], h, w))
            counts = out.new_zeros((1, 1, h, w))
        for i, (y, x0) in enumerate(group):
            total[..., y:y + crop[0], x0:x0 + crop[1]] += out[i * n:(i + 1) * n]
            counts[..., y:y + crop[0], x0:x0 + crop[1]] += 1
    return total.div_(counts)


def view_logits(model, x: torch.Tensor, protocol: Protocol) -> torch.Tensor:
    """One view at its own size: slide when the image covers the window, else whole."""
    h, w = x.shape[-2:]
    layout = memory_format(protocol.channels_last, x.device)
    if protocol.mode == "slide" and h >= protocol.crop[0] and w >= protocol.crop[1]:
        return slide_logits(model, x, protocol.crop, protocol.stride, protocol.size_divisor, protocol.batch_windows,
                            layout)
    return forward_padded(model, x, protocol.size_divisor, layout)


@torch.no_grad()
def infer_logits(model, image: torch.Tensor, protocol: Protocol) -> torch.Tensor:
    """Merged float32 scores [K, H, W] at the original size for a normalised image [3, H, W]."""
    height, width = image.shape[-2:]
    batch = image.unsqueeze(0)
    total, views = None, 0
    with autocast(image.device, protocol.precision):
        for size in view_sizes(height, width, protocol):
            scaled = batch if size == (height, width) else F.interpolate(
                batch, size=size, mode="bilinear", align_corners=False)
            for flipped in ((False, True) if protocol.flip else (False,)):
                x = scaled.flip(-1) if flipped else scaled
                out = view_logits(model, x, protocol).float()
                if flipped:
                    out = out.flip(-1)
                if out.shape[-2:] != (height, width):
                    out = F.interpolate(out, size=(height, width), mode="bilinear", align_corners=False)
                if protocol.merge == "softmax":
                    out = out.softmax(dim=1)
                total = out if total is None else total.add_(out)
                views += 1
    if protocol.merge == "softmax":
        total /= views
    return total[0]


def load_model(recipe, checkpoint: Path, device: torch.device, layout: torch.memory_format = torch.contiguous_format):
    """The recipe's network with the checkpoint's weights, in eval mode on the device, its weights in `layout`."""
    from anncli.runs.checkpoint import load_model_for_inference
    from anncli.models.ann import build_model

    # The checkpoint holds every weight: no ImageNet backbone file is read (nor needed) to evaluate.
    model = build_model(recipe.model.model_copy(update={"pretrained": None}))
    model.load_state_dict(load_model_for_inference(Path(checkpoint), recipe))
    return model.to(device, memory_format=layout).eval()


def normalize_image(image: np.ndarray, protocol: Protocol, device: torch.device) -> torch.Tensor:
    """uint8 HxWx3 RGB -> normalised float [3, H, W] on the device."""
    from anncli.data.transforms import normalize

    return normalize(image, protocol.mean, protocol.std, protocol.bgr).to(device)


def predict_labels(model, image: np.ndarray, protocol: Protocol, device: torch.device) -> torch.Tensor:
    """int64 [H, W] class ids for a uint8 RGB image."""
    return infer_logits(model, normalize_image(image, protocol, device), protocol).argmax(dim=0)


MAX_SCALE = 4.0  # the official protocols go up to 2; beyond 4 a Cityscapes image no longer fits in memory


def parse_scales(text: str) -> tuple[float, ...]:
    pieces = [s.strip() for s in text.split(",")]
    if not any(pieces):
        raise UserError("--scales: no scale given")
    if not all(pieces):
        raise UserError(f"--scales {text!r}: an empty item; expected comma-separated numbers, e.g. 0.75,1,1.25")
    try:
        scales = tuple(float(s) for s in pieces)
    except ValueError:
        raise UserError(f"--scales {text!r}: expected comma-separated numbers, e.g. 0.75,1,1.25") from None
    if any(not (0 < s <= MAX_SCALE) for s in scales):
        raise UserError(f"--scales {text!r}: every scale must be > 0 and at most {MAX_SCALE:g}")
    return scales


def resolve_protocol(recipe, *, multiscale: bool = False, scales: Optional[str] = None, flip: Optional[bool] = None,
                     mode: Optional[str] = None, crop: Optional[str] = None, stride: Optional[str] = None,
                     merge: Optional[str] = None) -> Protocol:
    """The inference protocol from the recipe and the command-line options.

    - scales: `--scales` if given; else the recipe's `eval.scales` with `--multiscale`; else [1.0].
    - flip: `--flip/--no-flip` if given; else the recipe's `eval.flip` with `--multiscale`; else off.
    - mode, crop, stride, merge: the option if given, else the recipe's eval section.
    - resize_short, max_long, size_divisor, precision and normalisation come from the recipe.
    """
    ev = recipe.eval
    chosen_scales = parse_scales(scales) if scales else (tuple(ev.scales) if multiscale else (1.0,))
    chosen_flip = flip if flip is not None else (ev.flip if multiscale else False)
    chosen_mode = mode or ev.mode
    if chosen_mode not in ("whole", "slide"):
        raise UserError(f"--mode {chosen_mode!r}: expected whole or slide")
    chosen_merge = merge or ev.merge
    if chosen_merge not in ("logits", "softmax"):
        raise UserError(f"--merge {chosen_merge!r}: expected logits or softmax")
    if chosen_mode == "whole" and (crop or stride):
        given = "--crop" if crop else "--stride"
        raise UserError(f"{given} sets the sliding window, which whole mode does not use; add --mode slide or drop {given}")
    window = parse_hw(crop, "--crop") if crop else ev.crop
    step = parse_hw(stride, "--stride") if stride else ev.stride
    if chosen_mode == "slide" and (window is None or step is None):
        raise UserError("slide mode needs a window: --crop HxW and --stride HxW (or eval.crop/eval.stride in the recipe)")
    if window and step and (step[0] > window[0] or step[1] > window[1]):
        raise UserError(f"--stride {step[0]}x{step[1]} is larger than the crop {window[0]}x{window[1]}")
    return Protocol.from_recipe(recipe, scales=chosen_scales, flip=chosen_flip, mode=chosen_mode,
                                crop=window, stride=step, merge=chosen_merge)
