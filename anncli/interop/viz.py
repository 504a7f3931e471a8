"""`ann viz attention`: where one pixel looks, in APNB and AFNB.

Both blocks attend from every feature position to 110 pooled anchors: the 1×1, 3×3, 6×6 and 8×8 cells
of an adaptive average pooling of the key map. For one query pixel, each anchor's softmax weight is
spread evenly over the image region its cell pools (weight / area), so the four scales become four
density maps on the image, and their sum (which integrates to 1) shows where the pixel draws its
context from. The picture puts them next to the image and the prediction.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from anncli.errors import UserError

BLOCKS = ("apnb", "afnb")


@dataclass
class AttentionMaps:
    """One query pixel's attention: per block, the per-scale density on the image [len(sizes), H, W]."""

    image: np.ndarray  # uint8 HxWx3
    prediction: np.ndarray  # int64 HxW
    pixel: tuple[int, int]
    sizes: tuple[int, ...]
    density: dict[str, np.ndarray]
    shares: dict[str, list[float]]  # per block, the softmax weight of each scale's anchors (sums to 1)


def parse_pixel(text: str, height: int, width: int) -> tuple[int, int]:
    try:
        y, x = (int(v) for v in text.replace(" ", "").split(","))
    except ValueError:
        raise UserError(f"--pixel {text!r}: expected Y,X, e.g. 32,100") from None
    if not (0 <= y < height and 0 <= x < width):
        raise UserError(f"--pixel {y},{x} is outside the {height}x{width} image")
    return y, x


def _bins(length: int, size: int) -> list[tuple[int, int]]:
    """The [start, end) cells of adaptive pooling of `length` into `size` (torch's rule)."""
    return [((i * length) // size, -((-(i + 1) * length) // size)) for i in range(size)]


def anchor_density(weights: torch.Tensor, sizes, feat_hw: tuple[int, int]) -> torch.Tensor:
    """Anchor weights (S,) -> per-scale density on the feature grid [len(sizes), h, w].

    Each anchor's weight is divided by the number of cells it pools and added to each of them, so a
    scale's map sums to the total weight of its anchors.
    """
    h, w = feat_hw
    out = torch.zeros(len(sizes), h, w, dtype=torch.float64)
    offset = 0
    for k, s in enumerate(sizes):
        for i, (y0, y1) in enumerate(_bins(h, s)):
            for j, (x0, x1) in enumerate(_bins(w, s)):
                area = (y1 - y0) * (x1 - x0)
                out[k, y0:y1, x0:x1] += float(weights[offset + i * s + j]) / area
        offset += s * s
    if offset != weights.numel():
        raise UserError(f"{weights.numel()} anchors do not match the pyramid sizes {tuple(sizes)}")
    return out


def _nearest_cells(pixels: int, cells: int) -> torch.Tensor:
    """The feature cell of each pixel, with the network's own alignment (align_corners=True upsampling)."""
    if pixels == 1 or cells == 1:
        return torch.zeros(pixels, dtype=torch.long)
    return torch.round(torch.arange(pixels, dtype=torch.float64) * (cells - 1) / (pixels - 1)).long()


def _to_image(density: torch.Tensor, padded_hw: tuple[int, int], image_hw: tuple[int, int]) -> np.ndarray:
    """Feature-grid density -> density per image pixel.

    A cell's mass is spread over the area of one cell pitch around its centre; a cell centred on the
    border has part of that area outside the image, so a map sums to slightly less than its mass.
    """
    h, w = density.shape[-2:]
    (ph, pw), pitch = padded_hw, 1.0
    for pixels, cells in ((ph, h), (pw, w)):
        pitch *= (pixels - 1) / (cells - 1) if pixels > 1 and cells > 1 else pixels / cells
    rows, cols = _nearest_cells(ph, h), _nearest_cells(pw, w)
    up = density[:, rows][:, :, cols] / pitch
    return up[:, : image_hw[0], : image_hw[1]].numpy()


def attention_maps(model, image: np.ndarray, pixel: tuple[int, int], protocol, device) -> AttentionMaps:
    """Run the model once on the whole image and return where `pixel` attends in each block."""
    from anncli.eval.inference import normalize_image
    from anncli.models.attention import capture_attention

    blocks = {name: getattr(model, name, None) for name in BLOCKS}
    blocks = {name: b for name, b in blocks.items() if b is not None}
    if not blocks:
        raise UserError("this model has no APNB or AFNB (model.name fcn?): there is no attention to show")
    sizes = next(iter(blocks.values())).attention.sampler
    if sizes is None:
        raise UserError("this model attends to every position (model.name nonlocal), not to pooled anchors")
    sizes = sizes.sizes
    x = normalize_image(image, protocol, device)[None]
    height, width = x.shape[-2:]
    div = protocol.size_divisor
    x = F.pad(x, (0, (-width) % div, 0, (-height) % div))
    shapes, captured, hooks = {}, {}, []
    for name, block in blocks.items():
        def pre(module, args, name=name):
            shapes[name] = (args[0].shape[-2:], (args[1] if len(args) > 1 else args[0]).shape[-2:])

        hooks.append(block.attention.register_forward_pre_hook(pre))
    try:
        with torch.no_grad(), capture_attention() as maps:
            logits = model(x)
    finally:
        for h in hooks:
            h.remove()
    if len(maps) != len(blocks):
        raise UserError(f"expected {len(blocks)} attention maps, captured {len(maps)}")
    order = [n for n in ("afnb", "apnb") if n in blocks]  # the network runs AFNB first
    density, shares = {}, {}
    for name, sim in zip(order, maps):
        (qh, qw), key_hw = shapes[name]
        qy, qx = int(_nearest_cells(x.shape[-2], qh)[pixel[0]]), int(_nearest_cells(x.shape[-1], qw)[pixel[1]])
        weights = sim[0, qy * qw + qx].cpu()
        grid = anchor_density(weights, sizes, tuple(key_hw))
        shares[name] = [float(v) for v in grid.flatten(1).sum(1)]
        density[name] = _to_image(grid, tuple(x.shape[-2:]), (height, width))
    prediction = logits[0, :, :height, :width].argmax(0).cpu().numpy()
    return AttentionMaps(image=image, prediction=prediction, pixel=pixel, sizes=tuple(sizes), density=density,
                         shares=shares)


def region_ratio(density: np.ndarray, region: np.ndarray) -> float:
    """Attention per unit area inside `region` (bool HxW) over that outside it, all scales summed."""
    total = density.sum(axis=0) if density.ndim == 3 else density
    return float(total[region].mean() / total[~region].mean())


def draw(maps: AttentionMaps, palette: np.ndarray, out: Path, title: str) -> None:
    """Image and prediction on the first row; per block, one panel per scale and their sum."""
    from anncli.interop.plot import pyplot, save_figure

    plt = pyplot()
    names = [n for n in BLOCKS if n in maps.density]
    cols = len(maps.sizes) + 1
    fig, axes = plt.subplots(1 + len(names), cols, figsize=(3.2 * cols, 2.0 * (1 + len(names)) + 0.6),
                             squeeze=False)
    y, x = maps.pixel
    for ax in axes.ravel():
        ax.set_axis_off()
    axes[0, 0].imshow(maps.image)
    axes[0, 0].set_title("image")
    axes[0, 1].imshow(palette[maps.prediction])
    axes[0, 1].set_title("prediction")
    for row, name in enumerate(names, start=1):
        dens = maps.density[name]
        share = maps.shares[name]
        panels = [(f"{name.upper()} {s}×{s}", dens[k], share[k]) for k, s in enumerate(maps.sizes)]
        panels.append((f"{name.upper()} all scales", dens.sum(axis=0), sum(share)))
        for col, (label, d, weight) in enumerate(panels):
            ax = axes[row, col]
            ax.imshow(maps.image, alpha=0.45)
            ax.imshow(d, cmap="magma", alpha=0.65)
            ax.set_title(f"{label} (weight {weight:.0%})", fontsize=9)
    for ax in axes.ravel():
        if ax.images:
            ax.plot([x], [y], marker="+", color="cyan", markersize=12, mew=2)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    save_figure(fig, out, plt)


def run_viz_attention(checkpoint: Path, image_path: Path, pixel: str, out: Path, recipe_path=None,
                      overrides=()) -> AttentionMaps:
    """`ann viz attention`: load, run once, draw `out`, and print where the pixel looks most."""
    from anncli.runs.checkpoint import checkpoint_recipe
    from anncli.eval.inference import load_model
    from anncli.eval.predict import class_palette
    from anncli.eval.inference import resolve_protocol
    from anncli.data.images import read_rgb
    from anncli.interop.plot import pyplot
    from anncli.recipe import load_recipe

    pyplot()  # fail early, before loading anything, when matplotlib is missing
    recipe = load_recipe(recipe_path or checkpoint_recipe(Path(checkpoint)), list(overrides))
    image = read_rgb(Path(image_path))
    yx = parse_pixel(pixel, *image.shape[:2])
    device = torch.device("cpu")
    model = load_model(recipe, Path(checkpoint), device)
    maps = attention_maps(model, image, yx, resolve_protocol(recipe), device)
    draw(maps, class_palette(recipe), Path(out), f"{recipe.name} · {Path(checkpoint).name} · pixel (y={yx[0]}, x={yx[1]})")
    for name in BLOCKS:
        if name in maps.density:
            total = maps.density[name].sum(axis=0)
            py, px = np.unravel_index(int(total.argmax()), total.shape)
            share = ", ".join(f"{s}×{s} {w:.0%}" for s, w in zip(maps.sizes, maps.shares[name]))
            print(f"{name.upper()}: densest at (y={py}, x={px}); weight per scale: {share}")
    print(f"wrote {out}")
    return maps
