"""`make gpu-check`: the GPU figures in one command, written to benchmarks/results/gpu-<device>.json.

On a machine with one CUDA GPU, after `make install` (under 6 minutes on one H200). Where no venv can be
built (no package registry), the machine's own python3 runs it with the wheels that
../shared/gpu/kit.sh gathers: `<the line kit.sh prints> python3 benchmarks/gpu_check.py` (the CLI parts
start `python3 -m anncli`, which PYTHONPATH finds). The parts:
1. attention: `ann bench attention --device cuda` at 128×256, C = 2048, fp32 — time and peak-memory
   ratios of the plain non-local block over APNB, beside the paper's (about 6× and 28×);
2. training: ANN-R101 (aux, 19 classes) at 769×769, batch 2, one process, fp32 against bf16 +
   channels_last — img/s, peak memory, FLOPs per image from FlopCounterMode and the achieved fraction of
   the device's peak FLOP/s (benchmarks/train_step.py's measurement);
3. eval memory: sliding-window inference (864×864 windows at stride 576) of a 2048×1024 image at
   scales 1.0 and 1.75, peak allocated memory (benchmarks/eval_memory.py's measurement);
4. matmul: the device's bf16 matmul TFLOP/s, the yardstick of (6);
5. cudnn: the bf16 channels_last step with `cudnn.benchmark` off and on;
6. train_batch8: that step at batch 8, as a fraction of the measured matmul rate;
7. eval_protocol: the card's protocol (scales 0.75/1/1.25 + flip, 864 windows at stride 576) on one
   2048x1024 image, fp32 against bf16, seconds per image (`eval.batch_windows: auto` where it exists);
8. cli: the real `ann train` on generated 2048x1024 PNG shards at 769x769 against the model-only step,
   worker counts tried until the ratio reaches 0.9 (benchmarks/train_cli.py);
9. compile: `ann train --compile` against eager: first-step seconds and steady img/s ("unavailable"
   where there is no model.compile);
10. deepspeed: `ann train` with DeepSpeed ZeRO-2 bf16 on the same shards;
11. `pytest -m gpu`: the CUDA tests, their summary line and exit code.
Each part records its seconds; a part that fails is recorded with its error and the others still run.
`targets` holds the issue's targets, each as {ratio or value, target, compare, pass} (gpu_parts.targets).

Without CUDA it prints one line and exits with 2. `--dry` runs the same parts on the CPU at toy sizes
(small backbone, 65×65 crops, a 16×32 attention map, a 96×64 image, two 2048x1024 PNGs for the CLI
parts): it checks the wiring, not the GPU, and writes to --out (default benchmarks/results/gpu-dry-cpu.json).

    python benchmarks/gpu_check.py            # on a GPU machine
    python benchmarks/gpu_check.py --dry --out /tmp/gpu-dry.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmark scripts
from gpu_parts import (batch8_part, cli_part, compile_part, cudnn_part, deepspeed_part,  # noqa: E402
                       eval_protocol_part, matmul_part, shards_in, targets)

PAPER = {"time_ratio": 6.0, "memory_ratio": 28.0, "note": "ANN paper, APNB vs non-local at 128x256, C=2048, GPU"}
FULL = {"attention": {"sizes": "128x256", "channels": 2048, "repeats": None},
        "train": {"backbone": "resnet101", "crop": (769, 769), "batch": 2, "steps": 20, "warmup": 5},
        "eval": {"backbone": "resnet101", "size": (1024, 2048), "crop": [864, 864], "stride": [576, 576]},
        "protocol": {"backbone": "resnet101", "size": (1024, 2048), "crop": [864, 864], "stride": [576, 576],
                     "repeats": 3}}
DRY = {"attention": {"sizes": "16x32", "channels": 64, "repeats": 1},
       "train": {"backbone": "small", "crop": (65, 65), "batch": 2, "steps": 1, "warmup": 1},
       "eval": {"backbone": "small", "size": (64, 96), "crop": [48, 48], "stride": [48, 48]},
       "protocol": {"backbone": "small", "size": (32, 48), "crop": [32, 32], "stride": [16, 16], "repeats": 1}}


def device_slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "gpu"


def attention_part(cfg: dict, device: str) -> dict:
    from anncli.interop.bench import run_attention_bench

    report = run_attention_bench(cfg["sizes"], device, "float32", cfg["channels"], cfg["repeats"], None)
    (entry,) = report["results"]
    return {"size": entry["size"], "channels": report["channels"], "nonlocal": entry["nonlocal"],
            "apnb": entry["apnb"], "ratios": entry["ratios"], "paper": PAPER}


def train_part(cfg: dict, device) -> dict:
    import torch
    from train_step import measure_training
    from train_throughput import peak_tflops

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peaks = peak_tflops(name)
    runs = {}
    for precision, channels_last in (("fp32", False), ("bf16", True)):
        run = measure_training(cfg["backbone"], 19, cfg["crop"], cfg["batch"], precision, channels_last,
                               cfg["steps"], cfg["warmup"], device)
        key = "bf16" if precision == "bf16" else "fp32"
        achieved = run["flops_per_image"] * run["img_per_s"]
        run["peak_tflops"] = peaks[key] if peaks else None
        run["fraction_of_peak"] = round(achieved / 1e12 / peaks[key], 4) if peaks else None
        if peaks and precision == "fp32":  # cuDNN convolutions run in TF32 by default
            run["fraction_of_tf32_peak"] = round(achieved / 1e12 / peaks["tf32"], 4)
        runs[f"{precision}{'_channels_last' if channels_last else ''}"] = run
        if device.type == "cuda":
            torch.cuda.empty_cache()
    fp32, bf16 = runs["fp32"], runs["bf16_channels_last"]
    out = {"model": f"ann, {cfg['backbone']}, aux, 19 classes, OHEM CE", "runs": runs,
           "bf16_over_fp32_img_per_s": round(bf16["img_per_s"] / fp32["img_per_s"], 3)}
    if "peak_mem_mb" in fp32:
        out["bf16_over_fp32_peak_mem"] = round(bf16["peak_mem_mb"] / fp32["peak_mem_mb"], 3)
    if device.type == "cuda":
        out["tf32_allowed"] = {"cudnn": torch.backends.cudnn.allow_tf32,
                               "matmul": torch.backends.cuda.matmul.allow_tf32}
    return out


def eval_part(cfg: dict, device: str) -> dict:
    from eval_memory import run_one

    runs = {}
    for scale in (1.0, 1.75):
        one = {"model": "ann", "backbone": cfg["backbone"], "device": device, "threads": os.cpu_count() or 1,
               "mode": "slide", "scale": scale, "height": cfg["size"][0], "width": cfg["size"][1],
               "crop": cfg["crop"], "stride": cfg["stride"], "max_windows": 1 << 30}
        runs[f"scale_{scale}"] = run_one(one)
        if device == "cuda":
            import torch

            torch.cuda.empty_cache()
    return {"image": f"{cfg['size'][1]}x{cfg['size'][0]}", "crop": cfg["crop"], "stride": cfg["stride"],
            "peak": "torch.cuda.max_memory_allocated" if device == "cuda" else "resident-set high-water mark",
            "runs": runs}


def pytest_part() -> dict:
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider"],
                          cwd=ROOT, capture_output=True, text=True)
    lines = [line for line in done.stdout.strip().splitlines() if line.strip()]
    return {"exit_code": done.returncode, "summary": lines[-1] if lines else "", "passed": done.returncode == 0}


def run_part(name: str, fn, report: dict) -> None:
    start = time.perf_counter()
    try:
        report[name] = fn()
    except Exception as e:  # one failing part must not hide the others' figures
        report[name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-2000:]}
    report[name]["seconds"] = round(time.perf_counter() - start, 1)
    print(f"[gpu-check] {name}: {report[name]['seconds']} s{' (failed)' if 'error' in report[name] else ''}",
          flush=True)


MEASURED = ("attention", "train", "eval_memory", "matmul", "cudnn", "train_batch8", "eval_protocol", "cli", "compile",
            "deepspeed")


def run_gpu_first_parts(cfg: dict, device, dry: bool, report: dict) -> None:
    """Parts 4-10; the CLI parts share one folder of generated shards."""
    with tempfile.TemporaryDirectory(prefix="ann-gpu-check-") as tmp:
        scratch = Path(tmp)
        run_part("matmul", lambda: matmul_part(device, dry), report)
        run_part("cudnn", lambda: cudnn_part(cfg["train"], device), report)
        run_part("train_batch8", lambda: batch8_part(cfg["train"], device, report["matmul"].get("tflops")), report)
        run_part("eval_protocol", lambda: eval_protocol_part(cfg["protocol"], device), report)
        run_part("cli", lambda: cli_part(dry, shards_in(scratch, dry), scratch), report)
        run_part("deepspeed", lambda: deepspeed_part(dry, shards_in(scratch, dry), scratch,
                                                     report["cli"].get("img_per_s")), report)
        run_part("compile", lambda: compile_part(dry, shards_in(scratch, dry), scratch, report["cli"]), report)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry", action="store_true", help="run every part on the CPU at toy sizes (wiring check)")
    p.add_argument("--out", type=Path, default=None, help="default benchmarks/results/gpu-<device>.json")
    args = p.parse_args(argv)
    import torch

    if not args.dry and not torch.cuda.is_available():
        print(f"gpu-check: no CUDA device visible (torch {torch.__version__}, built for CUDA "
              f"{torch.version.cuda or 'none'}); run it on a machine with a GPU after `make install`",
              file=sys.stderr)
        return 2
    cfg = DRY if args.dry else FULL
    device = torch.device("cpu") if args.dry else torch.device("cuda", 0)
    name = "dry-cpu" if args.dry else torch.cuda.get_device_name(device)
    out = args.out or ROOT / "benchmarks" / "results" / f"gpu-{device_slug(name)}.json"
    started = time.perf_counter()
    report = {"benchmark": "gpu_check", "dry": args.dry, "device": name, "torch": torch.__version__,
              "cuda": torch.version.cuda, "host_cpus": os.cpu_count()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        report["device_memory_gib"] = round(props.total_memory / 2**30, 1)
    run_part("attention", lambda: attention_part(cfg["attention"], device.type), report)
    run_part("train", lambda: train_part(cfg["train"], device), report)
    run_part("eval_memory", lambda: eval_part(cfg["eval"], device.type), report)
    run_gpu_first_parts(cfg, device, args.dry, report)
    run_part("pytest_gpu", pytest_part, report)
    report["targets"] = targets(report)
    report["seconds_total"] = round(time.perf_counter() - started, 1)
    report["under_6_minutes"] = report["seconds_total"] < 360
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"[gpu-check] wrote {out} in {report['seconds_total']} s")
    failed = [k for k in (*MEASURED, "pytest_gpu") if "error" in report[k]]
    return 1 if failed or not report["pytest_gpu"].get("passed", False) else 0


if __name__ == "__main__":
    sys.exit(main())
