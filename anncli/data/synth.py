"""The synthetic long-range set: a distant coloured key decides the class of identical grey squares.

Each image (default 64x128) has a noise background (class 0, uniform [0, 0.5] per pixel and channel), a
10x10 key (class 4) in the left or right outer quarter coloured red, green or blue (0.95 on one channel,
0.1 on the others, N(0, 0.03) noise), and 2–4 grey squares (0.7 + N(0, 0.03)), 6–11 px, in the far half,
≥ 2 px apart. A square's class is 1 + the key's colour index, so its label depends on pixels 40–118 px
away: a plain FCN guesses, a non-local block can look. A 1-px rim around every object is ignore (255).
Sizes scale with the image (relative to 64x128).

Sample i of a split is drawn from its own generator, seeded by (seed, split, i): the same seed gives
identical bytes, and validation samples do not depend on how many training samples were asked for.
"""

from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path

import cv2
import numpy as np

from anncli.data.datasets import manifest_for
from anncli.data.manifest import manifest_path
from anncli.data.shards import ShardWriter
from anncli.errors import UserError
from anncli.data.labels import IGNORE_INDEX
from anncli.data.sizes import parse_hw

COLOURS = ("red", "green", "blue")
KEY_CLASS = 4
_SPLIT_STREAMS = {"train": 1, "val": 2}
_SET_FILE = re.compile(r"synth-(train|val)(-\d{6}\.tar|\.json)")  # what writing a set replaces


MAX_SIDE = 4096  # a 4096x4096 sample is 64 MB to draw; the set exists to be small


def parse_size(size) -> tuple[int, int]:
    """`--size HxW` text or the recipe's [h, w]; at least 16x32, at most MAX_SIDE a side."""
    if isinstance(size, str):
        h, w = parse_hw(size, "--size", "64x128")
    else:
        h, w = (int(v) for v in size)
    if h < 16 or w < 32:
        raise UserError(f"size {h}x{w}: the synthetic set needs at least 16x32 pixels")
    if max(h, w) > MAX_SIDE:
        raise UserError(f"size {h}x{w}: the synthetic set's images are at most {MAX_SIDE} pixels a side")
    return h, w


def _place_squares(rng, h, w, left: bool, n: int, lo: int, hi: int) -> list[tuple[int, int, int]]:
    x_lo, x_hi = (w // 2, w) if left else (0, w // 2)
    boxes: list[tuple[int, int, int]] = []
    for _ in range(n):
        for _try in range(50):
            side = int(rng.integers(lo, hi + 1))
            y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(x_lo, x_hi - side + 1))
            # ≥ 2 px between squares: the boxes grown by 2 must not overlap.
            if all(y >= by + bs + 2 or by >= y + side + 2 or x >= bx + bs + 2 or bx >= x + side + 2
                   for by, bx, bs in boxes):
                boxes.append((y, x, side))
                break
    return boxes


def make_sample(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, np.ndarray, dict]:
    """→ (uint8 HxWx3 RGB image, uint8 HxW label, meta)."""
    s = min(h / 64, w / 128)
    key_side, lo, hi = max(3, round(10 * s)), max(2, round(6 * s)), max(3, round(11 * s))
    img = rng.uniform(0.0, 0.5, (h, w, 3))
    label = np.zeros((h, w), np.uint8)
    left = bool(rng.random() < 0.5)
    colour = int(rng.integers(3))
    quarter = w // 4
    ky = int(rng.integers(0, h - key_side + 1))
    kx = int(rng.integers(0, quarter - key_side + 1)) if left else int(rng.integers(w - quarter, w - key_side + 1))
    tint = np.full(3, 0.1)
    tint[colour] = 0.95
    img[ky : ky + key_side, kx : kx + key_side] = tint + rng.normal(0, 0.03, (key_side, key_side, 3))
    label[ky : ky + key_side, kx : kx + key_side] = KEY_CLASS
    boxes = _place_squares(rng, h, w, left, int(rng.integers(2, 5)), lo, hi)
    for y, x, side in boxes:
        img[y : y + side, x : x + side] = 0.7 + rng.normal(0, 0.03, (side, side, 3))
        label[y : y + side, x : x + side] = 1 + colour
    for y, x, side in [(ky, kx, key_side), *boxes]:
        ring = label[max(0, y - 1) : y + side + 1, max(0, x - 1) : x + side + 1]
        ring[ring == 0] = IGNORE_INDEX
    image = np.clip(np.rint(img * 255), 0, 255).astype(np.uint8)
    meta = {"key_colour": COLOURS[colour], "key_side": "left" if left else "right", "squares": len(boxes)}
    return image, label, meta


def _encode_png(arr: np.ndarray) -> bytes:
    if arr.ndim == 3:
        arr = cv2.cvtColor(arr, cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(".png", arr, [cv2.IMWRITE_PNG_COMPRESSION, 1])
    assert ok
    return buf.tobytes()


def _write_split(writer: ShardWriter, split: str, count: int, h: int, w: int, seed: int, made_from: dict) -> dict:
    for i in range(count):
        rng = np.random.default_rng([seed & ((1 << 63) - 1), _SPLIT_STREAMS[split], i])
        image, label, meta = make_sample(rng, h, w)
        key = f"synth_{split}_{i:06d}"
        meta = {"dataset": "synth", "split": split, "key": key, "height": h, "width": w, **meta}
        writer.write(key, {"img.png": _encode_png(image), "seg.png": _encode_png(label),
                           "meta.json": json.dumps(meta, sort_keys=True).encode()})
    return writer.finish(lambda shards: {**manifest_for("synth", split, shards), "made_from": made_from})


def write_synth(out, *, train: int = 2048, val: int = 256, size="64x128", seed: int = 0, max_samples: int = 256,
                verbose: bool = True, force: bool = False) -> dict:
    """Write synth-train-*.tar, synth-val-*.tar and their manifests under `out`; returns both manifests.
    Both splits go into place together, after every file is written (ShardWriter.commit). Files of a set
    there already are replaced only with `force`."""
    h, w = parse_size(size)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a directory")
    if train + val == 0:
        raise UserError("--train 0 --val 0: the synthetic set would hold no sample; ask for at least one")
    existing = _set_files(out)
    if existing and not force:
        raise UserError(f"{out} holds a synthetic set already ({_names(existing)}); pass --force to replace it")
    made_from = _made_from(train, val, (h, w), seed, max_samples)
    with contextlib.ExitStack() as stack:
        writers = {split: stack.enter_context(ShardWriter(out, f"synth-{split}", max_samples, 1 << 62))
                   for split in _SPLIT_STREAMS}
        manifests = {split: _write_split(writers[split], split, n, h, w, seed, made_from)
                     for split, n in (("train", train), ("val", val))}
        for writer in writers.values():
            writer.commit()
    if verbose:
        print(f"wrote the synthetic set to {out}: {train} train and {val} val samples, {h}x{w}, seed {seed}")
    return manifests


def _made_from(train: int, val: int, size, seed: int, max_samples: int) -> dict:
    """What a synthetic set is made from, recorded in its manifests: the same record, the same bytes."""
    return {"train": train, "val": val, "size": list(size), "seed": seed, "max_samples": max_samples}


def _set_files(root: Path) -> list[str]:
    """The files under `root` that writing a synthetic set there replaces or removes."""
    return sorted(p.name for p in root.iterdir() if _SET_FILE.fullmatch(p.name)) if root.is_dir() else []


def _made_here(root: Path) -> set[str]:
    """The files of a set that `ann` wrote under `root`: its manifests with a made_from record and the shards
    they list."""
    names: set[str] = set()
    for split in _SPLIT_STREAMS:
        path = manifest_path(root, "synth", split)
        try:
            manifest = json.loads(path.read_text())
            if manifest.get("made_from"):
                names |= {path.name, *(shard["name"] for shard in manifest["shards"])}
        except (OSError, ValueError, AttributeError, KeyError, TypeError):
            continue
    return names


def _names(names: list[str]) -> str:
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def _recorded(root: Path) -> dict | None | bool:
    """The record of the set under `root`: a dict, None for a set without one, False when there is none."""
    paths = [manifest_path(root, "synth", s) for s in _SPLIT_STREAMS]
    if not all(p.is_file() for p in paths):
        return False
    records = []
    for path in paths:
        try:
            records.append(json.loads(path.read_text()).get("made_from"))
        except (ValueError, AttributeError, UnicodeDecodeError):
            records.append(None)
    return records[0] if records[0] == records[1] else None


def _describe(record: dict) -> str:
    h, w = record["size"]
    return (f"{record['train']} train, {record['val']} val, {h}x{w}, seed {record['seed']}, "
            f"{record['max_samples']} per shard")


def ensure_synth(root: str, cfg, create: bool = True) -> bool:
    """Make the synthetic set under `root` what the recipe's `data.synth` asks for (saying so): create it
    when missing, replace one made from other parameters; True if written. With `create` False, a missing
    or different set is a UserError instead."""
    root_path = Path(root)
    want = _made_from(cfg.train, cfg.val, parse_size(cfg.size), cfg.seed, cfg.max_samples)
    have = _recorded(root_path)
    if have == want:
        return False
    found = ("no synthetic set" if have is False else "a synthetic set made from unrecorded parameters"
             if have is None else f"a synthetic set made from {_describe(have)}")
    if not create:
        raise UserError(f"the checkpoint's recipe reads a synthetic set ({_describe(want)}) under {root}, which "
                        f"holds {found}; evaluating without a recipe never writes data: pass the recipe, or "
                        f"create the set with `ann data synth`")
    foreign = sorted(set(_set_files(root_path)) - _made_here(root_path))
    if foreign:
        raise UserError(f"{root_path} holds {_names(foreign)}, which no synthetic set of `ann` lists (a manifest "
                        "with a made_from record); the recipe's data.synth would replace them: move them away, or "
                        "point data.root at another folder")
    verb = "creating" if have is False else f"replacing {found} with"
    print(f"{verb} the synthetic long-range dataset under {root_path} ({_describe(want)})", flush=True)
    write_synth(root_path, train=cfg.train, val=cfg.val, size=tuple(want["size"]), seed=cfg.seed,
                max_samples=cfg.max_samples, verbose=False, force=True)
    return True


def prepare_synth(data, is_main: bool, create: bool = True) -> None:
    """Create the recipe's synthetic set on rank 0 when it asks for one that is missing; every rank waits.
    With `create` False a missing set is a UserError instead."""
    from anncli.cluster.distributed import barrier

    if data.synth is not None and is_main:
        ensure_synth(data.root, data.synth, create)
    barrier()
