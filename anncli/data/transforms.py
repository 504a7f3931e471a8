"""Training augmentation and normalisation on numpy uint8 images (labels: nearest, uint8, 255 = ignore).

The training stream carries uint8 crops (`TrainTransform.uint8_tensors`); the step normalises them on
the device (`normalize_batch`). Evaluation and `TrainTransform.__call__` normalise on the CPU (`normalize`).

The training pipeline follows mmseg/ANN: random rescale (optionally with aspect jitter), random crop with
`cat_max_ratio`, padding (image 0, label 255), horizontal flip, photometric distortion, normalisation.
The crop is taken first and only the crop is resampled: the source window under the crop is cut out and
resized, so the cost depends on the crop size, not on the image size (window borders may differ from
resize-then-crop by under a pixel).
Every random decision comes from the numpy Generator passed in, in a fixed order, so a sample's
augmentation is reproducible from the generator's seed alone.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
import torch

from anncli.data.labels import IGNORE_INDEX
from anncli.recipe import AugmentConfig

_CAT_MAX_TRIES = 10
_CAT_CHECK_PIXELS = 16384  # the class-ratio check looks at a subsample of at most this many pixels


def normalize(image: np.ndarray, mean, std, bgr: bool = False) -> torch.Tensor:
    """uint8 HxWx3 RGB image → float32 [3,H,W]: (x - mean) / std, channels reordered to BGR when `bgr`.

    `mean` and `std` are given in the channel order the network expects (RGB, or BGR when `bgr`).
    """
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 image, got shape {image.shape}")
    if bgr:
        image = image[..., ::-1]
    scale = (1.0 / np.asarray(std, dtype=np.float32)).reshape(1, 1, 3)
    shift = (-np.asarray(mean, dtype=np.float32)).reshape(1, 1, 3) * scale
    chw = np.ascontiguousarray(image.transpose(2, 0, 1)).astype(np.float32)
    chw *= scale.reshape(3, 1, 1)
    chw += shift.reshape(3, 1, 1)
    return torch.from_numpy(chw)


def normalize_batch(images: torch.Tensor, mean, std, bgr: bool = False, channels_last: bool = False) -> torch.Tensor:
    """uint8 (B,H,W,3) RGB batch → float32 (B,3,H,W) on the batch's device: (x - mean) / std.

    The training loader carries uint8 crops (a quarter of the bytes through worker shared memory and
    to the GPU); the step normalises them here, on the device. The arithmetic is `normalize`'s
    (x·(1/std) + (-mean/std), each step rounded to float32), so both give the same bits. The NHWC batch
    seen as NCHW is channels_last in memory already; otherwise it is made contiguous.
    """
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected a uint8 BxHxWx3 batch, got {images.dtype} {tuple(images.shape)}")
    scale = 1.0 / np.asarray(std, dtype=np.float32)
    shift = -np.asarray(mean, dtype=np.float32) * scale
    if bgr:
        images = images.flip(-1)
    x = images.permute(0, 3, 1, 2).float()
    x.mul_(torch.from_numpy(scale).to(x.device, non_blocking=True).view(1, 3, 1, 1))
    x.add_(torch.from_numpy(shift).to(x.device, non_blocking=True).view(1, 3, 1, 1))
    return x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def _scale_factors(h: int, w: int, cfg: AugmentConfig, rng: np.random.Generator) -> tuple[float, float]:
    ratio = rng.uniform(*cfg.scale)
    if cfg.base_size is not None:
        # mmseg keep-ratio rescale: the long side fits max(base)*ratio and the short side min(base)*ratio.
        long_t, short_t = max(cfg.base_size) * ratio, min(cfg.base_size) * ratio
        f = min(long_t / max(h, w), short_t / min(h, w))
    else:
        f = ratio
    if cfg.aspect is None:
        return f, f
    root = math.sqrt(rng.uniform(*cfg.aspect))
    return f / root, f * root  # (fy, fx), as in the official code's aspect-ratio jitter


def _crop_ok(label: np.ndarray, y0: int, x0: int, ch: int, cw: int, fy: float, fx: float, max_ratio: float) -> bool:
    """The mmseg rule on the (subsampled) source window: ≥ 2 classes and none above `max_ratio`."""
    h, w = label.shape
    ys, ye = int(y0 / fy), min(h, int(math.ceil((y0 + ch) / fy)))
    xs, xe = int(x0 / fx), min(w, int(math.ceil((x0 + cw) / fx)))
    step = max(1, int(math.sqrt(max(1, (ye - ys) * (xe - xs)) / _CAT_CHECK_PIXELS)))
    counts = np.bincount(label[ys:ye:step, xs:xe:step].ravel(), minlength=256)[:IGNORE_INDEX]
    counts = counts[counts > 0]
    return len(counts) > 1 and counts.max() / counts.sum() < max_ratio


def _choose_crop(label, sh, sw, ch, cw, fy, fx, cfg, rng) -> tuple[int, int]:
    def draw():
        return int(rng.integers(0, max(sh - ch, 0) + 1)), int(rng.integers(0, max(sw - cw, 0) + 1))

    y0, x0 = draw()
    if cfg.cat_max_ratio < 1.0:
        for _ in range(_CAT_MAX_TRIES):
            if _crop_ok(label, y0, x0, ch, cw, fy, fx, cfg.cat_max_ratio):
                break
            y0, x0 = draw()
    return y0, x0


def _resize_window(src: np.ndarray, fy: float, fx: float, y0: int, x0: int, vh: int, vw: int, interp: int):
    """Rows y0..y0+vh and columns x0..x0+vw of `src` scaled by (fy, fx), resizing only that window."""
    h, w = src.shape[:2]
    ys, ye = int(y0 / fy), min(h, int(math.ceil((y0 + vh) / fy)))
    xs, xe = int(x0 / fx), min(w, int(math.ceil((x0 + vw) / fx)))
    dy, dx = int(round(y0 - ys * fy)), int(round(x0 - xs * fx))
    oh, ow = max(dy + vh, int(round((ye - ys) * fy))), max(dx + vw, int(round((xe - xs) * fx)))
    window = src[ys:ye, xs:xe]
    out = window if (oh, ow) == window.shape[:2] else cv2.resize(window, (ow, oh), interpolation=interp)
    return out[dy : dy + vh, dx : dx + vw]


def _pad(window: np.ndarray, ch: int, cw: int, value: int) -> np.ndarray:
    """A contiguous ch×cw array: the window at the top left, `value` below and to the right of it."""
    vh, vw = window.shape[:2]
    if (vh, vw) == (ch, cw):
        return np.ascontiguousarray(window)
    fill = (value,) * (window.shape[2] if window.ndim == 3 else 1)
    return cv2.copyMakeBorder(window, 0, ch - vh, 0, cw - vw, cv2.BORDER_CONSTANT, value=fill)


def _lut(fn) -> np.ndarray:
    return np.clip(np.rint(fn(np.arange(256, dtype=np.float32))), 0, 255).astype(np.uint8)


def _photometric(img: np.ndarray, cfg: AugmentConfig, rng: np.random.Generator) -> np.ndarray:
    """Brightness/contrast/saturation/hue as uint8 lookup tables (each step rounds and clips to 0..255)."""
    if cfg.photometric == "none":
        return img
    delta = float(cfg.brightness_delta)
    if cfg.photometric == "brightness":  # the official ANN code: one uniform brightness shift
        shift = rng.uniform(-delta, delta)
        return cv2.LUT(img, _lut(lambda v: v + shift))
    # mmseg PhotoMetricDistortion; each step with p=0.5, contrast before or after the HSV steps.
    shift = rng.uniform(-delta, delta) if rng.integers(2) else 0.0
    contrast_first = bool(rng.integers(2))
    gain = rng.uniform(0.5, 1.5) if contrast_first and rng.integers(2) else 1.0
    img = cv2.LUT(img, _lut(lambda v: np.clip(v + shift, 0, 255) * gain))
    do_sat, do_hue = bool(rng.integers(2)), bool(rng.integers(2))
    if do_sat or do_hue:
        hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)
        if do_sat:
            sat = rng.uniform(0.5, 1.5)
            hsv[..., 1] = cv2.LUT(hsv[..., 1], _lut(lambda v: v * sat))
        if do_hue:
            hue = int(rng.integers(-18, 19))
            hsv[..., 0] = cv2.LUT(hsv[..., 0], ((np.arange(256) + hue) % 180).astype(np.uint8))
        img = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    if not contrast_first and rng.integers(2):
        gain = rng.uniform(0.5, 1.5)
        img = cv2.LUT(img, _lut(lambda v: v * gain))
    return img


class TrainTransform:
    """Scale → crop (+pad) → flip → photometric → normalise, driven by an explicit Generator."""

    def __init__(self, augment: AugmentConfig):
        self.cfg = augment

    def crop_uint8(self, image: np.ndarray, label: np.ndarray, rng: np.random.Generator):
        """The geometric and photometric part: uint8 crop image (HxWx3 RGB) and uint8 crop label."""
        cfg = self.cfg
        h, w = label.shape
        ch, cw = cfg.crop
        fy, fx = _scale_factors(h, w, cfg, rng)
        sh, sw = max(1, int(h * fy + 0.5)), max(1, int(w * fx + 0.5))
        fy, fx = sh / h, sw / w
        y0, x0 = _choose_crop(label, sh, sw, ch, cw, fy, fx, cfg, rng)
        vh, vw = min(ch, sh - y0), min(cw, sw - x0)
        img = _pad(_resize_window(image, fy, fx, y0, x0, vh, vw, cv2.INTER_LINEAR), ch, cw, 0)
        lbl = _pad(_resize_window(label, fy, fx, y0, x0, vh, vw, cv2.INTER_NEAREST), ch, cw, IGNORE_INDEX)
        if rng.random() < cfg.flip:
            img, lbl = cv2.flip(img, 1), cv2.flip(lbl, 1)
        return _photometric(img, cfg, rng), lbl

    def uint8_tensors(self, image: np.ndarray, label: np.ndarray, rng: np.random.Generator):
        """→ (uint8 tensor [ch,cw,3] RGB, uint8 tensor [ch,cw], 255 = ignore): what the training loader
        carries; `normalize_batch` finishes the images on the device (labels: `.long()` there)."""
        img, lbl = self.crop_uint8(image, label, rng)
        return torch.from_numpy(np.ascontiguousarray(img)), torch.from_numpy(np.ascontiguousarray(lbl))

    def __call__(self, image: np.ndarray, label: np.ndarray, rng: np.random.Generator):
        """→ (float32 tensor [3,ch,cw] normalised, int64 tensor [ch,cw] with 255 = ignore)."""
        img, lbl = self.crop_uint8(image, label, rng)
        return normalize(img, self.cfg.mean, self.cfg.std, self.cfg.bgr), torch.from_numpy(lbl).long()
