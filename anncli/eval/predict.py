"""`ann predict`: image files in; per image a label-id PNG, a colour PNG and an overlay out."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from PIL import Image

from anncli.errors import UserError
from anncli.eval.inference import load_model, predict_labels, resolve_protocol
from anncli.eval.onnx_predict import expand_images, read_rgb  # torch-free, so they live with the ONNX predictor
from anncli.eval.report import progress


def write_label_png(path: Path, labels: np.ndarray) -> None:
    """uint8 ids as a single-channel ('L') PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(labels.astype(np.uint8), mode="L").save(path)


FORMATS = ("trainid", "cityscapes")


def class_palette(recipe) -> np.ndarray:
    """[K, 3] uint8 RGB colours: the dataset's palette, or fixed pseudo-random colours without one."""
    from anncli.data import datasets

    k = recipe.model.num_classes
    try:
        colours = np.asarray(datasets.palette(recipe.data.dataset), dtype=np.uint8).reshape(-1, 3)
    except Exception:  # no palette for this dataset: colours are cosmetic
        colours = np.zeros((0, 3), dtype=np.uint8)
    if len(colours) >= k:
        return colours[:k]
    extra = np.random.default_rng(0).integers(0, 256, size=(k - len(colours), 3), dtype=np.uint8)
    return np.concatenate([colours, extra])


def _label_lut(fmt: str, recipe) -> Optional[np.ndarray]:
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    if fmt == "trainid":
        return None
    if recipe.data.dataset != "cityscapes" or recipe.model.num_classes != 19:
        raise UserError(f"--format cityscapes needs a 19-class Cityscapes recipe (this one: {recipe.data.dataset}, "
                        f"{recipe.model.num_classes} classes)")
    from anncli.data.datasets import CITYSCAPES_TRAINID_TO_LABELID

    lut = np.zeros(256, dtype=np.uint8)
    lut[:19] = CITYSCAPES_TRAINID_TO_LABELID
    return lut


def write_prediction(out: Path, stem: str, image: np.ndarray, labels: np.ndarray, palette: np.ndarray,
                     lut: Optional[np.ndarray]) -> list[Path]:
    """<stem>_pred.png (ids; <stem>_labelIds.png with a lut), <stem>_color.png, <stem>_overlay.png."""
    ids = labels if lut is None else lut[labels]
    colour = palette[labels]
    blend = (0.5 * image.astype(np.float32) + 0.5 * colour.astype(np.float32)).round().astype(np.uint8)
    paths = [out / f"{stem}_{'pred' if lut is None else 'labelIds'}.png", out / f"{stem}_color.png",
             out / f"{stem}_overlay.png"]
    write_label_png(paths[0], ids)
    Image.fromarray(colour, mode="RGB").save(paths[1])
    Image.fromarray(blend, mode="RGB").save(paths[2])
    return paths


@dataclass
class PredictSummary:
    """What `ann predict` did: the files it wrote, the images it could not read (path, why), and how long."""
    out: Path
    images: int
    written: list[Path] = field(default_factory=list)
    failed: list[tuple[Path, str]] = field(default_factory=list)
    seconds: float = 0.0

    def line(self) -> str:
        done = self.images - len(self.failed)
        failed = f"; {len(self.failed)} could not be read" if self.failed else ""
        return f"predicted {done} of {self.images} image(s) into {self.out} in {self.seconds:.1f} s{failed}"


def run_predict(images, checkpoint, out, recipe_path=None, overrides=(), multiscale=False, flip=None,
                fmt="trainid", recipe=None) -> PredictSummary:
    """Segment image files into `out`: label ids, colours and an overlay per image. An image that cannot be
    read is reported on stderr and skipped; the summary lists it. `recipe` (loaded) wins over `recipe_path`."""
    from anncli.runs.checkpoint import checkpoint_recipe
    from anncli.recipe import load_recipe
    from anncli.tuning import configure_algorithms, memory_format

    start = time.perf_counter()
    if recipe is None:
        recipe = load_recipe(recipe_path or checkpoint_recipe(Path(checkpoint)), list(overrides))
    lut = _label_lut(fmt, recipe)
    protocol = resolve_protocol(recipe, multiscale=multiscale, flip=flip)
    paths = expand_images(images)
    stems = [p.stem for p in paths]
    if len(set(stems)) != len(stems):
        raise UserError(f"two inputs share the name {next(s for s in stems if stems.count(s) > 1)!r}; "
                        "predict them into different --out directories")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    configure_algorithms(device, recipe.train.deterministic, shapes_repeat=protocol.mode == "slide")
    model = load_model(recipe, Path(checkpoint), device, memory_format(protocol.channels_last, device))
    palette, out = class_palette(recipe), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    summary = PredictSummary(out=out, images=len(paths))
    with progress("predict", total=len(paths)) as advance:
        for path in paths:
            try:
                image = read_rgb(path)
            except UserError as e:
                summary.failed.append((path, str(e)))
                print(f"ann: skipped {e}", file=sys.stderr, flush=True)
                advance()
                continue
            labels = predict_labels(model, image, protocol, device).to("cpu", torch.uint8).numpy()
            summary.written += write_prediction(out, path.stem, image, labels, palette, lut)
            advance()
    summary.seconds = time.perf_counter() - start
    print(summary.line(), flush=True)
    return summary
