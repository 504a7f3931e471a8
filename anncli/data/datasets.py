"""Cityscapes / ADE20K / PASCAL Context: class names, palettes, label maps, and packing into shards.

Label conventions (all end as uint8 train ids with 255 = ignore):
- Cityscapes: `*_gtFine_labelIds.png` (ids 0..33) → 19 train ids through a 256-entry table; void ids → 255.
- ADE20K: annotations 0..150, reduce_zero_label: 0 → 255, others − 1 → 150 classes.
- PASCAL Context (59): SegmentationClassContext 0..59 ('L' or 'P'; the ids are read, never the colours),
  reduce_zero_label: background 0 → 255, others − 1; class order alphabetical as the converter writes them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from anncli.data.guards import hw_text
from anncli.data.shards import ShardWriter
from anncli.data.voc import VOC_CLASSES, VOC_PALETTE, read_sbd_mat, voc12aug_layout
from anncli.errors import UserError
from anncli.data.labels import IGNORE_INDEX

CITYSCAPES_CLASSES = [
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
]
CITYSCAPES_PALETTE = [
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153), (153, 153, 153),
    (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60), (255, 0, 0),
    (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32),
]
# trainId → labelId, for writing test-server PNGs.
CITYSCAPES_TRAINID_TO_LABELID = [7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33]

ADE20K_CLASSES = [
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk",
    "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand",
    "path", "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge",
    "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove",
    "palm", "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus",
    "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver",
    "airplane", "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle",
    "buffet", "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything",
    "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven",
    "ball", "food", "step", "tank", "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher",
    "screen", "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier",
    "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator", "glass", "clock", "flag",
]
_ADE20K_PALETTE_FLAT = [
    120, 120, 120, 180, 120, 120, 6, 230, 230, 80, 50, 50, 4, 200, 3, 120, 120, 80, 140, 140, 140, 204, 5, 255,
    230, 230, 230, 4, 250, 7, 224, 5, 255, 235, 255, 7, 150, 5, 61, 120, 120, 70, 8, 255, 51, 255, 6, 82,
    143, 255, 140, 204, 255, 4, 255, 51, 7, 204, 70, 3, 0, 102, 200, 61, 230, 250, 255, 6, 51, 11, 102, 255,
    255, 7, 71, 255, 9, 224, 9, 7, 230, 220, 220, 220, 255, 9, 92, 112, 9, 255, 8, 255, 214, 7, 255, 224,
    255, 184, 6, 10, 255, 71, 255, 41, 10, 7, 255, 255, 224, 255, 8, 102, 8, 255, 255, 61, 6, 255, 194, 7,
    255, 122, 8, 0, 255, 20, 255, 8, 41, 255, 5, 153, 6, 51, 255, 235, 12, 255, 160, 150, 20, 0, 163, 255,
    140, 140, 140, 250, 10, 15, 20, 255, 0, 31, 255, 0, 255, 31, 0, 255, 224, 0, 153, 255, 0, 0, 0, 255,
    255, 71, 0, 0, 235, 255, 0, 173, 255, 31, 0, 255, 11, 200, 200, 255, 82, 0, 0, 255, 245, 0, 61, 255,
    0, 255, 112, 0, 255, 133, 255, 0, 0, 255, 163, 0, 255, 102, 0, 194, 255, 0, 0, 143, 255, 51, 255, 0,
    0, 82, 255, 0, 255, 41, 0, 255, 173, 10, 0, 255, 173, 255, 0, 0, 255, 153, 255, 92, 0, 255, 0, 255,
    255, 0, 245, 255, 0, 102, 255, 173, 0, 255, 0, 20, 255, 184, 184, 0, 31, 255, 0, 255, 61, 0, 71, 255,
    255, 0, 204, 0, 255, 194, 0, 255, 82, 0, 10, 255, 0, 112, 255, 51, 0, 255, 0, 194, 255, 0, 122, 255,
    0, 255, 163, 255, 153, 0, 0, 255, 10, 255, 112, 0, 143, 255, 0, 82, 0, 255, 163, 255, 0, 255, 235, 0,
    8, 184, 170, 133, 0, 255, 0, 255, 92, 184, 0, 255, 255, 0, 31, 0, 184, 255, 0, 214, 255, 255, 0, 112,
    92, 255, 0, 0, 224, 255, 112, 224, 255, 70, 184, 160, 163, 0, 255, 153, 0, 255, 71, 255, 0, 255, 0, 163,
    255, 204, 0, 255, 0, 143, 0, 255, 235, 133, 255, 0, 255, 0, 235, 245, 0, 255, 255, 0, 122, 255, 245, 0,
    10, 190, 212, 214, 255, 0, 0, 204, 255, 20, 0, 255, 255, 255, 0, 0, 153, 255, 0, 41, 255, 0, 255, 204,
    41, 0, 255, 41, 255, 0, 173, 0, 255, 0, 245, 255, 71, 0, 255, 122, 0, 255, 0, 255, 184, 0, 92, 255,
    184, 255, 0, 0, 133, 255, 255, 214, 0, 25, 194, 194, 102, 255, 0, 92, 0, 255,
]
ADE20K_PALETTE = [tuple(_ADE20K_PALETTE_FLAT[i : i + 3]) for i in range(0, len(_ADE20K_PALETTE_FLAT), 3)]

PASCAL_CONTEXT_CLASSES = [
    "aeroplane", "bag", "bed", "bedclothes", "bench", "bicycle", "bird", "boat", "book", "bottle", "building",
    "bus", "cabinet", "car", "cat", "ceiling", "chair", "cloth", "computer", "cow", "cup", "curtain", "dog",
    "door", "fence", "floor", "flower", "food", "grass", "ground", "horse", "keyboard", "light", "motorbike",
    "mountain", "mouse", "person", "plate", "platform", "pottedplant", "road", "rock", "sheep", "shelves",
    "sidewalk", "sign", "sky", "snow", "sofa", "table", "track", "train", "tree", "truck", "tvmonitor", "wall",
    "water", "window", "wood",
]
# The mmseg PascalContextDataset59 palette is the ADE20K palette shifted by one (background dropped).
PASCAL_CONTEXT_PALETTE = ADE20K_PALETTE[1:60]

SYNTH_CLASSES = ["background", "square-red-key", "square-green-key", "square-blue-key", "key"]
SYNTH_PALETTE = [(0, 0, 0), (230, 60, 60), (60, 200, 60), (60, 90, 230), (255, 255, 255)]

_TABLES = {
    "cityscapes": (CITYSCAPES_CLASSES, CITYSCAPES_PALETTE),
    "ade20k": (ADE20K_CLASSES, ADE20K_PALETTE),
    "pascal_context": (PASCAL_CONTEXT_CLASSES, PASCAL_CONTEXT_PALETTE),
    "synth": (SYNTH_CLASSES, SYNTH_PALETTE),
    "voc12aug": (VOC_CLASSES, VOC_PALETTE),
}


def canonical_name(dataset: str) -> str:
    name = dataset.strip().lower().replace("-", "_")
    if name not in _TABLES:
        raise UserError(f"unknown dataset {dataset!r}: expected cityscapes, ade20k, pascal-context, voc12aug or synth")
    return name


def class_names(dataset: str) -> list[str]:
    return list(_TABLES[canonical_name(dataset)][0])


def palette(dataset: str) -> list[tuple[int, int, int]]:
    return [tuple(c) for c in _TABLES[canonical_name(dataset)][1]]


def label_lut(dataset: str) -> np.ndarray:
    """256-entry int16 table: source label value → train id (255 = ignore), −1 = not a valid source value."""
    lut = np.full(256, -1, np.int16)
    lut[IGNORE_INDEX] = IGNORE_INDEX
    name = canonical_name(dataset)
    if name == "cityscapes":
        lut[:34] = IGNORE_INDEX
        lut[CITYSCAPES_TRAINID_TO_LABELID] = np.arange(19)
    elif name == "ade20k":
        lut[0], lut[1:151] = IGNORE_INDEX, np.arange(150)
    elif name == "pascal_context":
        lut[0], lut[1:60] = IGNORE_INDEX, np.arange(59)
    elif name == "voc12aug":
        lut[:21] = np.arange(21)
    else:
        lut[:5] = np.arange(5)
    return lut


def manifest_for(dataset: str, split: str, shards: list[dict]) -> dict:
    return {
        "dataset": dataset, "split": split, "num_classes": len(class_names(dataset)),
        "classes": class_names(dataset), "palette": [list(c) for c in palette(dataset)],
        "ignore_index": IGNORE_INDEX, "shards": shards, "total": sum(s["count"] for s in shards),
    }


def encode_label_png(label: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", label, [cv2.IMWRITE_PNG_COMPRESSION, 6])
    assert ok
    return buf.tobytes()


def read_source_label(path: Path) -> np.ndarray:
    if path.suffix == ".mat":  # SBD
        return read_sbd_mat(path)
    try:
        with Image.open(path) as im:
            arr = np.array(im) if im.mode in ("L", "P") else None
    except Exception:
        raise UserError(f"{path}: label cannot be read as an image") from None
    if arr is None or arr.dtype != np.uint8 or arr.ndim != 2:
        raise UserError(f"{path}: label must be an 8-bit 'L' or palette 'P' PNG of class ids")
    return arr


def map_label(path: Path, label: np.ndarray, lut: np.ndarray) -> np.ndarray:
    present = np.flatnonzero(np.bincount(label.ravel(), minlength=256))
    bad = [int(v) for v in present if lut[v] < 0]
    if bad:
        raise UserError(f"{path}: label values {bad[:10]} are not valid ids for this dataset")
    return lut.astype(np.uint8)[label]


def image_size(path: Path) -> tuple[int, int]:
    try:
        with Image.open(path) as im:
            return im.size
    except Exception:
        raise UserError(f"{path}: image cannot be read") from None


def pack_dataset(dataset: str, root, out, *, split: str, max_samples: int = 100, max_size: int = 1_000_000_000,
                 skip_missing: bool = False, seed: int = 0) -> dict:
    """Pack one split of a dataset in its official layout into shards plus a manifest; returns the manifest."""
    from rich.progress import Progress

    name = canonical_name(dataset)
    if name == "synth":
        raise UserError("the synthetic set is written by `ann data synth`, not packed")
    root, out = Path(root), Path(out)
    if not root.is_dir():
        raise UserError(f"{root}: dataset root not found")
    out_split, pairs = find_pairs(name, root, split, skip_missing)
    if out_split == "train":
        pairs = [pairs[i] for i in np.random.default_rng(seed).permutation(len(pairs))]
    lut = label_lut(name)
    with ShardWriter(out, f"{name}-{out_split}", max_samples, max_size) as writer:
        with Progress(transient=True, console=_stderr_console()) as progress:
            task = progress.add_task(f"packing {name} {out_split}", total=len(pairs))
            for key, img_path, lbl_path in pairs:
                writer.write(key, _sample_members(name, out_split, key, img_path, lbl_path, root, lut))
                progress.advance(task)
        manifest = writer.finish(lambda shards: manifest_for(name, out_split, shards))
        writer.commit()
    print(f"wrote {manifest['total']} samples in {len(manifest['shards'])} shard(s) to {out} "
          f"({name}-{out_split}.json)")
    return manifest


def _sample_members(name, split, key, img_path: Path, lbl_path: Path, root: Path, lut) -> dict[str, bytes]:
    w, h = image_size(img_path)
    label = read_source_label(lbl_path)
    if label.shape != (h, w):
        raise UserError(f"{lbl_path}: label is {hw_text(label.shape)} but its image is {h}x{w} (HxW)")
    ext = "img.png" if img_path.suffix.lower() == ".png" else "img.jpg"
    meta = {"dataset": name, "split": split, "key": key, "height": h, "width": w,
            "source": img_path.relative_to(root).as_posix()}
    return {ext: img_path.read_bytes(), "seg.png": encode_label_png(map_label(lbl_path, label, lut)),
            "meta.json": json.dumps(meta, sort_keys=True).encode()}


def find_pairs(name: str, root: Path, split: str, skip_missing: bool) -> tuple[str, list[tuple[str, Path, Path]]]:
    """(output split name, [(key, image, label)] sorted by key) for one split of an official layout."""
    out_split, images, labels = _LAYOUTS[name](root, split)
    missing_lbl = sorted(set(images) - set(labels))
    missing_img = sorted(set(labels) - set(images))
    if (missing_lbl or missing_img) and not skip_missing:
        parts = [f"{len(missing_lbl)} image(s) without a label, e.g. {', '.join(missing_lbl[:3])}"] if missing_lbl else []
        if missing_img:
            parts.append(f"{len(missing_img)} label(s) without an image, e.g. {', '.join(missing_img[:3])}")
        raise UserError(f"{root}: {'; '.join(parts)} (use --skip-missing to leave them out)")
    if missing_lbl or missing_img:
        print(f"skipping {len(missing_lbl)} image(s) without a label and {len(missing_img)} label(s) without an image",
              file=sys.stderr)
    keys = sorted(set(images) & set(labels))
    if not keys:
        raise UserError(f"{root}: no image/label pairs found for split {split!r}")
    return out_split, [(k, images[k], labels[k]) for k in keys]


def _need_dir(path: Path, root: Path, expected: str) -> Path:
    if not path.is_dir():
        raise UserError(f"{root}: expected {expected} (folder {path} not found)")
    return path


def _split_name(dataset: str, split: str, allowed: dict[str, str]) -> str:
    if split not in allowed:
        raise UserError(f"{dataset}: unknown split {split!r}, expected one of {', '.join(sorted(set(allowed)))}")
    return allowed[split]


def _cityscapes(root: Path, split: str):
    _split_name("cityscapes", split, {"train": "train", "val": "val", "test": "test"})
    img_dir = _need_dir(root / "leftImg8bit" / split, root, f"leftImg8bit/{split}/<city>/*_leftImg8bit.png")
    lbl_dir = _need_dir(root / "gtFine" / split, root, f"gtFine/{split}/<city>/*_gtFine_labelIds.png")
    images = {p.name[: -len("_leftImg8bit.png")]: p for p in img_dir.glob("*/*_leftImg8bit.png")}
    labels = {p.name[: -len("_gtFine_labelIds.png")]: p for p in lbl_dir.glob("*/*_gtFine_labelIds.png")}
    if not images and not labels:
        raise UserError(f"{root}: expected leftImg8bit/{split}/<city>/*_leftImg8bit.png, found none")
    return split, images, labels


def _ade20k(root: Path, split: str):
    folder = {"training": "training", "train": "training", "validation": "validation", "val": "validation"}
    src = folder[_split_name("ade20k", split, folder)]
    base = root / "ADEChallengeData2016" if (root / "ADEChallengeData2016").is_dir() else root
    img_dir = _need_dir(base / "images" / src, root, f"ADEChallengeData2016/images/{src}/*.jpg")
    lbl_dir = _need_dir(base / "annotations" / src, root, f"ADEChallengeData2016/annotations/{src}/*.png")
    images = {p.stem: p for p in img_dir.glob("*.jpg")}
    labels = {p.stem: p for p in lbl_dir.glob("*.png")}
    return ("train" if src == "training" else "val"), images, labels


def _pascal_context(root: Path, split: str):
    _split_name("pascal-context", split, {"train": "train", "val": "val"})
    bases = [root, root / "VOC2010", root / "VOCdevkit" / "VOC2010"]
    base = next((b for b in bases if (b / "JPEGImages").is_dir()), root)
    _need_dir(base / "JPEGImages", root, "VOCdevkit/VOC2010/JPEGImages/*.jpg")
    _need_dir(base / "SegmentationClassContext", root, "VOC2010/SegmentationClassContext/*.png")
    listing = base / "ImageSets" / "SegmentationContext" / f"{split}.txt"
    if not listing.is_file():
        raise UserError(f"{root}: expected VOC2010/ImageSets/SegmentationContext/{split}.txt (not found)")
    ids = [line.strip() for line in listing.read_text().splitlines() if line.strip()]
    images = {i: base / "JPEGImages" / f"{i}.jpg" for i in ids if (base / "JPEGImages" / f"{i}.jpg").is_file()}
    labels = {i: base / "SegmentationClassContext" / f"{i}.png" for i in ids
              if (base / "SegmentationClassContext" / f"{i}.png").is_file()}
    lost = [i for i in ids if i not in images and i not in labels]
    if lost:
        raise UserError(f"{listing}: {len(lost)} listed id(s) have neither image nor label, e.g. {', '.join(lost[:3])}")
    return split, images, labels


_LAYOUTS = {"cityscapes": _cityscapes, "ade20k": _ade20k, "pascal_context": _pascal_context,
            "voc12aug": voc12aug_layout}


def _stderr_console():
    from rich.console import Console

    return Console(file=sys.stderr)
