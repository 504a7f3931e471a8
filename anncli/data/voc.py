"""PASCAL VOC 2012 with the SBD extra annotations ("voc12aug", 21 classes), as mmseg trains ANN on it.

Layout under the root given to `ann data pack voc12aug ROOT OUT --split train|val`:

    [VOCdevkit/]VOC2012/JPEGImages/<id>.jpg, SegmentationClass/<id>.png, ImageSets/Segmentation/{train,val}.txt
    [VOCdevkit/]VOCaug/dataset/cls/<id>.mat, train.txt, val.txt      (SBD; also benchmark_RELEASE/dataset)

- val: the 1,449 VOC 2012 val images with their SegmentationClass labels.
- train ("trainaug", 10,582 images with the full SBD): VOC train plus SBD train and val, minus VOC val,
  as mmseg's voc_aug.py builds it. Labels come from VOC SegmentationClass where VOC has one, else
  from the SBD .mat file (`GTcls.Segmentation`, read with scipy; `pip install anncli[voc]`).
Label ids are 0 (background) .. 20, 255 = ignore (VOC's object borders); no id is shifted.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from anncli.errors import UserError

VOC_CLASSES = [
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
]


def _voc_colour(i: int) -> tuple[int, int, int]:
    """The VOC colour map: the bits of the class id spread over the high bits of r, g, b."""
    r = g = b = 0
    for shift in range(7, -1, -1):
        r |= ((i >> 0) & 1) << shift
        g |= ((i >> 1) & 1) << shift
        b |= ((i >> 2) & 1) << shift
        i >>= 3
    return r, g, b


VOC_PALETTE = [_voc_colour(i) for i in range(len(VOC_CLASSES))]


def read_sbd_mat(path: Path) -> np.ndarray:
    """The class-id map (uint8 HxW) of an SBD `cls/<id>.mat` file."""
    try:
        from scipy.io import loadmat
    except ImportError:
        raise UserError("reading SBD .mat labels needs scipy: pip install 'anncli[voc]'") from None
    try:
        seg = loadmat(str(path))["GTcls"]["Segmentation"][0][0]
    except Exception:  # noqa: BLE001 - a damaged file is the user's input
        raise UserError(f"{path}: not an SBD class label file (expected GTcls.Segmentation)") from None
    seg = np.asarray(seg)
    if seg.ndim != 2:
        raise UserError(f"{path}: GTcls.Segmentation is not a 2-D map")
    return seg.astype(np.uint8)


def _first_dir(candidates: list[Path]) -> Path | None:
    return next((p for p in candidates if p.is_dir()), None)


def _ids(listing: Path) -> list[str]:
    if not listing.is_file():
        raise UserError(f"{listing}: list file not found")
    return [line.strip() for line in listing.read_text().splitlines() if line.strip()]


def voc12aug_layout(root: Path, split: str):
    """(split, {id: image}, {id: label .png or .mat}) for voc12aug train or val."""
    if split not in ("train", "val"):
        raise UserError(f"voc12aug: unknown split {split!r}, expected one of train, val")
    voc = _first_dir([root / "VOC2012", root / "VOCdevkit" / "VOC2012", root])
    if voc is None or not (voc / "JPEGImages").is_dir():
        raise UserError(f"{root}: expected VOCdevkit/VOC2012/JPEGImages (not found)")
    sets = voc / "ImageSets" / "Segmentation"
    val = _ids(sets / "val.txt")
    if split == "val":
        ids, voc_ids = val, set(val)
    else:
        sbd = _first_dir([root / d / "dataset" for d in ("VOCaug", "benchmark_RELEASE", "SBD")] +
                         [root / "VOCdevkit" / d / "dataset" for d in ("VOCaug", "benchmark_RELEASE", "SBD")])
        if sbd is None:
            raise UserError(f"{root}: expected the SBD annotations in VOCaug/dataset (cls/*.mat, train.txt, val.txt)")
        voc_ids = set(_ids(sets / "train.txt"))
        extra = {i: sbd / "cls" / f"{i}.mat" for i in _ids(sbd / "train.txt") + _ids(sbd / "val.txt")}
        ids = sorted((voc_ids | set(extra)) - set(val))
    images = {i: voc / "JPEGImages" / f"{i}.jpg" for i in ids if (voc / "JPEGImages" / f"{i}.jpg").is_file()}
    labels = {}
    for i in ids:
        png = voc / "SegmentationClass" / f"{i}.png"
        if i in voc_ids and png.is_file():
            labels[i] = png
        elif split == "train" and extra.get(i) is not None and extra[i].is_file():
            labels[i] = extra[i]
    return split, images, labels
