"""CPU latency of ANN-R50 at 512x1024: eager PyTorch against the exported ONNX model on onnxruntime.

The network is the dilated ResNet-50 ANN (output stride 8, 19 classes, random weights: latency does not
depend on them) behind the same input normalisation `ann export` puts in the graph. It is exported
with `anncli.interop.export.export_onnx` (static 1x3x512x1024), then both run on the same random image with the
same number of threads. The timed forwards alternate (eager, onnxruntime, onnxruntime, eager, ...), so
a machine shared with other jobs slows both alike; the ratio of the medians is the figure to read.

    python benchmarks/export_latency.py                    # writes benchmarks/results/export_latency.json
    python benchmarks/export_latency.py --size 128x256 --rounds 2 --out /tmp/e.json   # quick
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def build():
    import torch

    from anncli.interop.export import Exported
    from anncli.models.ann import build_model
    from anncli.recipe import load_recipe

    recipe = load_recipe(ROOT / "recipes" / "cityscapes.yaml", ["model.backbone=resnet50", "model.aux=false"])
    torch.manual_seed(0)
    model = build_model(recipe.model).eval()
    return recipe, Exported(model, recipe.augment.mean, recipe.augment.std, recipe.augment.bgr).eval()


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1000.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="512x1024")
    parser.add_argument("--rounds", type=int, default=5, help="timed forwards of each runtime")
    parser.add_argument("--threads", type=int, default=0, help="threads for both (default: torch's default)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "export_latency.json")
    args = parser.parse_args()

    import numpy as np
    import onnxruntime as ort
    import torch

    from anncli.interop.export import export_onnx

    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    h, w = (int(v) for v in args.size.lower().split("x"))
    recipe, module = build()
    x = np.random.default_rng(0).uniform(0, 255, size=(1, 3, h, w)).astype(np.float32)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ann_r50.onnx"
        start = time.perf_counter()
        export_onnx(module, torch.from_numpy(x), path, dynamic=False, meta={"recipe": recipe.name})
        export_s = time.perf_counter() - start
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def run_eager():
        with torch.no_grad():
            return module(torch.from_numpy(x)).numpy()

    def run_ort():
        return session.run(None, {"image": x})[0]

    max_diff = float(np.abs(run_eager() - run_ort()).max())  # also the warm-up of both
    eager_ms, ort_ms = [], []
    for r in range(args.rounds):
        order = [(eager_ms, run_eager), (ort_ms, run_ort)]
        for times, fn in (order if r % 2 == 0 else order[::-1]):
            times.append(timed(fn))
        print(f"round {r + 1}/{args.rounds}: eager {eager_ms[-1]:.0f} ms, onnxruntime {ort_ms[-1]:.0f} ms", flush=True)
    eager_med, ort_med = statistics.median(eager_ms), statistics.median(ort_ms)
    result = {
        "model": "ANN-R50 (dilated ResNet-50, output stride 8, 19 classes, no aux head, random weights)",
        "input": [1, 3, h, w], "threads": threads, "rounds": args.rounds,
        "eager_ms": [round(t, 1) for t in eager_ms], "onnxruntime_ms": [round(t, 1) for t in ort_ms],
        "eager_median_ms": round(eager_med, 1), "onnxruntime_median_ms": round(ort_med, 1),
        "eager_over_onnxruntime": round(eager_med / ort_med, 3),
        "per_round_ratio_median": round(statistics.median(e / o for e, o in zip(eager_ms, ort_ms)), 3),
        "max_abs_diff_logits": max_diff, "export_seconds": round(export_s, 1),
        "load_average_before": round(load_before, 2), "load_average_after": round(os.getloadavg()[0], 2),
        "cpu_count": os.cpu_count(), "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__, "onnxruntime": ort.__version__,
        "note": "timed forwards interleaved on a CPU that may be shared with other jobs; compare the ratio",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"eager {eager_med:.0f} ms, onnxruntime {ort_med:.0f} ms (eager / onnxruntime = {eager_med / ort_med:.2f}), "
          f"max |diff| {max_diff:.2g}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
