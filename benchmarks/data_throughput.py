"""Data throughput: decode + augment of 2048x1024 PNG image/label pairs to 769x769 crops, per worker.

Compares, in one run and one process (= one DataLoader worker's share):
- shards: `GlobalStream` over WebDataset shards (cv2 decode, crop-then-resize augmentation);
- loose files: the usual baseline, a torch Dataset that opens each PNG with PIL and applies the same
  augmentation (so the difference is reading + decoding);
and breaks the per-sample time into decode and augment.

uint8 to the device, before/after in the same run, interleaved (`--rounds` rounds, each timing both):
`GlobalStream` with one real DataLoader worker (and in-process), where the worker either hands out
uint8 crops and uint8 labels (after: the step normalises on the device) or, as before, normalises each
crop to float32 and widens labels to int64 on the CPU (the previous loader work, reproduced by a
TrainTransform whose loader tensors are its float output). Also the bytes per sample that cross the
worker's shared memory and PCIe. Writes benchmarks/results/data.json.

    python benchmarks/data_throughput.py [--images 16] [--samples 48] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image

from anncli.data.images import decode_image, decode_label
from anncli.data.shards import ShardWriter
from anncli.data import transforms
from anncli.data.global_stream import GlobalStream
from anncli.data.counts import shard_counts
from anncli.data.transforms import TrainTransform, normalize_batch
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


def _counts(urls: list[str]) -> list[int]:
    return shard_counts(urls, os.path.dirname(urls[0]), announce=False)


def time_shards(urls, samples: int) -> float:
    stream = GlobalStream(urls, _counts(urls), augment=AUG, batch_size=1, effective_batch=1, seed=0, rank=0,
                          world_size=1, num_workers=0)
    it = iter(stream)
    next(it)  # warm-up
    start = time.perf_counter()
    for _ in range(samples):
        next(it)
    return samples / (time.perf_counter() - start)


class FloatOnCpu(TrainTransform):
    """The loader's work before uint8-to-device: float32 normalised crops and int64 labels, made on the CPU."""

    def uint8_tensors(self, image, label, rng):
        return self(image, label, rng)


@contextmanager
def loader_transform(cls):
    """GlobalStream builds its transform from `anncli.data.transforms.TrainTransform` (workers fork after)."""
    saved, transforms.TrainTransform = transforms.TrainTransform, cls
    try:
        yield
    finally:
        transforms.TrainTransform = saved


def time_stream(urls, samples: int, workers: int, cls) -> tuple[float, int]:
    """samples/s of the training stream (batch 1) and the bytes of one sample's image + label tensors."""
    with loader_transform(cls):
        stream = GlobalStream(urls, _counts(urls), augment=AUG, batch_size=1, effective_batch=1, seed=0, rank=0,
                              world_size=1, num_workers=workers)
        it = iter(stream)
        first = next(it)  # warm-up (starts the worker)
        start = time.perf_counter()
        for _ in range(samples):
            next(it)
        rate = samples / (time.perf_counter() - start)
        it.close()
    return rate, first["image"].nbytes + first["label"].nbytes


def uint8_before_after(urls, samples: int, rounds: int) -> dict:
    variants = {"before_float32_on_cpu": FloatOnCpu, "after_uint8": TrainTransform}
    out = {}
    for workers in (1, 0):
        rates = {name: [] for name in variants}
        nbytes = {}
        for _ in range(rounds):
            for name, cls in variants.items():
                rate, nbytes[name] = time_stream(urls, samples, workers, cls)
                rates[name].append(round(rate, 2))
        med = {name: statistics.median(r) for name, r in rates.items()}
        out[f"{workers}_worker" if workers else "in_process"] = {
            "samples_per_s_median": med, "samples_per_s": rates, "bytes_per_sample": nbytes,
            "after_over_before": round(med["after_uint8"] / med["before_float32_on_cpu"], 3)}
    return out


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
    ms = {"decode_cv2": [], "decode_pil": [], "augment_geometry_photometric": [], "normalize": [],
          "normalize_batch_on_cpu_device": []}
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
        normalize_batch(torch.from_numpy(crop)[None], AUG.mean, AUG.std, AUG.bgr)
        t5 = time.perf_counter()
        for k, v in zip(ms, (t1 - t0, t2 - t1, t3 - t2, (t4 - t3) - (t3 - t2), t5 - t4)):
            ms[k].append(v * 1000)
    return {k: round(float(np.median(v)), 2) for k, v in ms.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--samples", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the uint8 before/after")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "data.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    cv2.setNumThreads(1)  # one worker's share of the machine
    load_start = round(os.getloadavg()[0], 2)
    with tempfile.TemporaryDirectory() as tmp:
        urls, pairs = write_data(Path(tmp), args.images)
        png_mb = sum(p.stat().st_size for pair in pairs for p in pair) / len(pairs) / 1e6
        parts = breakdown(pairs, min(args.samples, 24))
        shards = time_shards(urls, args.samples)
        loose = time_loose(pairs, args.samples)
        uint8 = uint8_before_after(urls, args.samples // 2, args.rounds)
    augment_ms = parts["augment_geometry_photometric"]
    result = {
        "what": "decode + augment of 2048x1024 PNG image/label pairs to 769x769 crops, one process, 1 thread",
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "torch": torch.__version__, "opencv": cv2.__version__,
                    "load_avg_1min_at_start": load_start, "load_avg_1min_at_end": round(os.getloadavg()[0], 2)},
        "images": args.images, "samples_timed": args.samples, "png_mb_per_pair": round(png_mb, 2),
        "samples_per_s_per_worker": {"shards": round(shards, 2), "loose_files_pil": round(loose, 2)},
        "samples_per_s_note": "shards: the stream hands out uint8 crops (normalisation happens in the step); "
                              "loose files normalise on the CPU as mmseg's pipeline does",
        "uint8_to_device": uint8,
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
