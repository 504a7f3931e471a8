"""Data throughput: decode + augment of 2048x1024 PNG image/label pairs to 769x769 crops, per worker.

Compares, in one run and one process (= one DataLoader worker's share):
- shards: `GlobalStream` over WebDataset shards (cv2 decode, crop-then-resize augmentation);
- loose files: the usual baseline, a torch Dataset that opens each PNG with PIL and applies the same
  augmentation (so the difference is reading + decoding);
and breaks the per-sample time into decode and augment. Writes benchmarks/results/data.json.

    python benchmarks/data_throughput.py [--images 16] [--samples 48]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image

from anncli.data.shards import ShardWriter, decode_image, decode_label
from anncli.data.global_stream import GlobalStream
from anncli.data.manifest import shard_counts
from anncli.data.transforms import TrainTransform
from anncli.recipe import AugmentConfig

H, W = 1024, 2048
AUG = AugmentConfig(crop=(769, 769), base_size=(2048, 1024), scale=(0.5, 2.0), photometric="brightness")


def street_like(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A photo-like image (smooth regions, edges, mild noise) so PNG sizes and decode times are realistic."""
    label = np.zeros((H // 8, W // 8), np.uint8)
    for _ in range(40):
        y, x = rng.integers(0, H // 8, 2), rng.integers(0, W // 8, 2)
        label[y.min() : y.max() + 1, x.min() : x.max() + 1] = rng.integers(0, 19)
    label = cv2.resize(label, (W, H), interpolation=cv2.INTER_NEAREST)
    colours = rng.integers(0, 256, (256, 3), dtype=np.uint8)
    image = colours[label].astype(np.int16)
    image += (np.linspace(-30, 30, W)[None, :, None]).astype(np.int16)
    image += rng.normal(0, 4, image.shape).astype(np.int16)
    label[rng.random(label.shape) < 0.002] = 255
    return np.clip(image, 0, 255).astype(np.uint8), label


def write_data(folder: Path, n: int) -> tuple[list[str], list[tuple[Path, Path]]]:
    rng = np.random.default_rng(0)
    writer = ShardWriter(folder, "bench-train", max_count=max(1, n // 4), max_size=1 << 40)
    loose = []
    for i in range(n):
        image, label = street_like(rng)
        img_path, lbl_path = folder / f"img_{i:04d}.png", folder / f"lbl_{i:04d}.png"
        Image.fromarray(image).save(img_path)
        Image.fromarray(label).save(lbl_path)
        writer.write(f"s{i:04d}", {"img.png": img_path.read_bytes(), "seg.png": lbl_path.read_bytes()})
        loose.append((img_path, lbl_path))
    return [str(folder / s["name"]) for s in writer.close()], loose


class LooseFiles(torch.utils.data.Dataset):
    def __init__(self, pairs, transform):
        self.pairs, self.transform = pairs, transform

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, i):
        img_path, lbl_path = self.pairs[i]
        image = np.array(Image.open(img_path).convert("RGB"))
        label = np.array(Image.open(lbl_path))
        img, lbl = self.transform(image, label, np.random.default_rng(i))
        return {"image": img, "label": lbl}


def time_shards(urls, samples: int) -> float:
    stream = GlobalStream(urls, shard_counts(urls, os.path.dirname(urls[0]), announce=False), augment=AUG,
                          batch_size=1, effective_batch=1, seed=0, rank=0, world_size=1, num_workers=0)
    it = iter(stream)
    next(it)  # warm-up
    start = time.perf_counter()
    for _ in range(samples):
        next(it)
    return samples / (time.perf_counter() - start)


def time_loose(pairs, samples: int) -> float:
    loader = torch.utils.data.DataLoader(LooseFiles(pairs, TrainTransform(AUG)), batch_size=1, shuffle=True,
                                         num_workers=0, generator=torch.Generator().manual_seed(0))
    done, start = -1, 0.0
    while done < samples:
        for _ in loader:
            done += 1
            if done == 0:
                start = time.perf_counter()
            if done == samples:
                break
    return samples / (time.perf_counter() - start)


def breakdown(pairs, repeats: int) -> dict:
    t = TrainTransform(AUG)
    ms = {"decode_cv2": [], "decode_pil": [], "augment_geometry_photometric": [], "normalize": []}
    for i in range(repeats):
        img_path, lbl_path = pairs[i % len(pairs)]
        img_bytes, lbl_bytes = img_path.read_bytes(), lbl_path.read_bytes()
        t0 = time.perf_counter()
        image, label = decode_image(img_bytes), decode_label(lbl_bytes)
        t1 = time.perf_counter()
        np.array(Image.open(img_path).convert("RGB")), np.array(Image.open(lbl_path))
        t2 = time.perf_counter()
        crop, lbl = t.crop_uint8(image, label, np.random.default_rng(i))
        t3 = time.perf_counter()
        t(image, label, np.random.default_rng(i))
        t4 = time.perf_counter()
        for k, v in zip(ms, (t1 - t0, t2 - t1, t3 - t2, (t4 - t3) - (t3 - t2))):
            ms[k].append(v * 1000)
    return {k: round(float(np.median(v)), 2) for k, v in ms.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--samples", type=int, default=48)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "data.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    cv2.setNumThreads(1)  # one worker's share of the machine
    with tempfile.TemporaryDirectory() as tmp:
        urls, pairs = write_data(Path(tmp), args.images)
        png_mb = sum(p.stat().st_size for pair in pairs for p in pair) / len(pairs) / 1e6
        parts = breakdown(pairs, min(args.samples, 24))
        shards = time_shards(urls, args.samples)
        loose = time_loose(pairs, args.samples)
    augment_ms = parts["augment_geometry_photometric"]
    result = {
        "what": "decode + augment of 2048x1024 PNG image/label pairs to 769x769 crops, one process, 1 thread",
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "torch": torch.__version__, "opencv": cv2.__version__},
        "images": args.images, "samples_timed": args.samples, "png_mb_per_pair": round(png_mb, 2),
        "samples_per_s_per_worker": {"shards": round(shards, 2), "loose_files_pil": round(loose, 2)},
        "shards_vs_loose": round(shards / loose, 3),
        "ms_per_sample_median": parts,
        "augment_ms": round(augment_ms, 2),
        "augment_ms_note": "scale + crop + pad + flip + photometric (brightness); normalisation listed separately",
        "targets": {"shards_ge_loose": shards >= loose, "augment_le_5ms": augment_ms <= 5.0},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
