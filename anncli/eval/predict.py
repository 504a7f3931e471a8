"""`ann predict`: image files in; per image an id PNG (in the chosen format), a colour PNG and an overlay out."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from anncli.data.images import expand_images, read_rgb
from anncli.errors import UserError
from anncli.eval.formats import PredictionPlaces, pred_format
from anncli.eval.inference import load_model, predict_labels, resolve_protocol
from anncli.eval.report import progress


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
                fmt="train-ids", recipe=None, colors=None, overlay=None) -> PredictSummary:
    """Segment image files into `out`: ids in the format `fmt` (formats.py), colours and an overlay per image
    (where PredictionPlaces puts them). An image that cannot be read is reported on stderr and skipped; the
    summary lists it. `recipe` (loaded) wins over `recipe_path`."""
    from anncli.runs.checkpoint import checkpoint_recipe
    from anncli.recipe import load_recipe
    from anncli.models.tuning import configure_algorithms, memory_format

    start = time.perf_counter()
    if recipe is None:
        recipe = load_recipe(recipe_path or checkpoint_recipe(Path(checkpoint)), list(overrides))
    places = PredictionPlaces.choose(out, pred_format(fmt, recipe.data.dataset, recipe.model.num_classes),
                                     colors, overlay)
    protocol = resolve_protocol(recipe, multiscale=multiscale, flip=flip)
    paths = expand_images(images)
    places.check_inputs(paths)
    places.make()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    configure_algorithms(device, recipe.train.deterministic, shapes_repeat=protocol.mode == "slide")
    model = load_model(recipe, Path(checkpoint), device, memory_format(protocol.channels_last, device))
    palette = class_palette(recipe)
    summary = PredictSummary(out=places.out, images=len(paths))
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
            summary.written += places.write(path.stem, image, labels, palette)
            advance()
    summary.seconds = time.perf_counter() - start
    print(summary.line(), flush=True)
    return summary
