"""Prediction files in the ids their reader expects: ours, the Cityscapes benchmark's, the ADE20K server's.

- train-ids: the class ids the model was trained with (0..K-1), as `ann eval` compares them.
- cityscapes: Cityscapes label ids (trainId -> labelId, 7..33), one `<name>_labelIds.png` per image: the
  official evaluation finds, for every ground truth `<city>_<seq>_<frame>_gtFine_labelIds.png`, the single
  file matching `<city>_<seq>_<frame>*.png` anywhere under the results folder, so nothing else may lie there.
- ade20k: the scene-parsing server's class indices 1..150 (0 = "other", never predicted), one `<name>.png`.

Colour and overlay pictures are for people; with a server format they go to folders of their own.
Torch-free: `ann predict --model FILE.onnx` writes through here too.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image

from anncli.errors import UserError
from anncli.paths import replaced_whole

PRED_FORMATS = ("train-ids", "cityscapes", "ade20k")
_ALIASES = {"trainid": "train-ids"}  # the name `ann predict --format` took before the server formats
# Which recipe each server format needs: dataset, class count.
_SERVER = {"cityscapes": ("cityscapes", 19), "ade20k": ("ade20k", 150)}


@dataclass(frozen=True, eq=False)  # eq=False: the lut is an array
class PredFormat:
    name: str
    lut: Optional[np.ndarray]  # 256 uint8 entries: train id -> the value written; None: written as predicted
    suffix: str  # after the image's name; train-ids: the caller's own

    @property
    def is_server(self) -> bool:
        return self.name in _SERVER

    def ids(self, labels: np.ndarray) -> np.ndarray:
        labels = labels.astype(np.uint8, copy=False)
        return labels if self.lut is None else self.lut[labels]

    def filename(self, name: str, train_ids_suffix: str = "") -> str:
        return f"{name}{self.suffix if self.is_server else train_ids_suffix}.png"


TRAIN_IDS = PredFormat("train-ids", None, "")


def format_name(name: str, option: str = "--format") -> str:
    """The format's own name (aliases resolved); an unknown one is a UserError, before any model is read."""
    fmt = _ALIASES.get(name, name)
    if fmt not in PRED_FORMATS:
        raise UserError(f"{option} {name!r}: expected one of {', '.join(PRED_FORMATS)}")
    return fmt


def pred_format(name: str, dataset: str, num_classes: int, option: str = "--format") -> PredFormat:
    """The format called `name` for a model of `num_classes` classes of `dataset`; a mismatch is a UserError."""
    fmt = format_name(name, option)
    if fmt == "train-ids":
        return TRAIN_IDS
    need_dataset, need_classes = _SERVER[fmt]
    if dataset.replace("-", "_").lower() != need_dataset or num_classes != need_classes:
        raise UserError(f"{option} {fmt} needs a {need_classes}-class {need_dataset} model "
                        f"(this one: {dataset}, {num_classes} classes)")
    lut = np.zeros(256, dtype=np.uint8)
    if fmt == "cityscapes":
        from anncli.data.datasets import CITYSCAPES_TRAINID_TO_LABELID

        lut[:19] = CITYSCAPES_TRAINID_TO_LABELID
        return PredFormat(fmt, lut, "_labelIds")
    lut[:150] = np.arange(1, 151)
    return PredFormat(fmt, lut, "")


def write_png(path: Path, pixels: np.ndarray, mode: str) -> None:
    """A PNG written whole (paths.replaced_whole): an old file is never truncated, a failed write leaves
    nothing, so the official scripts never read a 0-byte or half-written prediction."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with replaced_whole(path) as tmp:
        Image.fromarray(pixels, mode=mode).save(tmp, format="PNG")


def write_label_png(path: Path, labels: np.ndarray) -> None:
    """uint8 ids as a single-channel ('L') PNG."""
    write_png(path, labels.astype(np.uint8), "L")


@dataclass(frozen=True)
class PredictionPlaces:
    """Where `ann predict` writes: the id PNGs, and the colour and overlay pictures (None: not written)."""
    out: Path
    colors: Optional[Path]
    overlay: Optional[Path]
    fmt: PredFormat

    @classmethod
    def choose(cls, out, fmt: PredFormat, colors=None, overlay=None) -> "PredictionPlaces":
        """train-ids keeps the pictures beside the ids unless told otherwise; a server format writes them only
        where --colors/--overlay say, outside --out (the official script would count them as predictions)."""
        out = Path(out)
        if not fmt.is_server:
            return cls(out, Path(colors or out), Path(overlay or out), fmt)
        for option, folder in (("--colors", colors), ("--overlay", overlay)):
            if folder is not None and Path(folder).resolve().is_relative_to(out.resolve()):
                raise UserError(f"{option} {folder}: inside --out {out}; with --format {fmt.name} --out holds "
                                "nothing but the prediction files, so give the pictures a folder of their own")
        return cls(out, colors and Path(colors), overlay and Path(overlay), fmt)

    def make(self) -> None:
        for folder in (self.out, self.colors, self.overlay):
            if folder is not None:
                folder.mkdir(parents=True, exist_ok=True)

    def write(self, stem: str, image: np.ndarray, labels: np.ndarray, palette: np.ndarray) -> list[Path]:
        """The ids of `labels` (train ids HxW) in this format, and the pictures this place asks for."""
        ids = self.out / self.fmt.filename(stem, "_pred")
        write_label_png(ids, self.fmt.ids(labels))
        written = [ids]
        colour = palette[labels]
        if self.colors is not None:
            written.append(self.colors / f"{stem}_color.png")
            write_png(written[-1], colour, "RGB")
        if self.overlay is not None:
            blend = (0.5 * image.astype(np.float32) + 0.5 * colour.astype(np.float32)).round().astype(np.uint8)
            written.append(self.overlay / f"{stem}_overlay.png")
            write_png(written[-1], blend, "RGB")
        return written

    def check_inputs(self, images: list[Path]) -> None:
        """Distinct image names, and no prediction written over an input image."""
        stems = [p.stem for p in images]
        if len(set(stems)) != len(stems):
            raise UserError(f"two inputs share the name {next(s for s in stems if stems.count(s) > 1)!r}; "
                            "predict them into different --out directories")
        inputs = {p.resolve() for p in images}
        for path in images:
            target = (self.out / self.fmt.filename(path.stem, "_pred")).resolve()
            if target in inputs:
                raise UserError(f"--out {self.out}: the prediction of {path} would overwrite an input image; "
                                "choose another --out")
