"""Training throughput and peak memory: the demo recipe on 1 and 2 CPU ranks, and ANN-R101 on a GPU.

CPU part: runs the real CLI (`python -m anncli train recipes/demo.yaml ...`) once per setting and reads
the step records of `<work-dir>/events.jsonl`. img/s is the median over the records after the first
`--warmup-records` (it counts images over all ranks); `mem_mb` is rank 0's peak resident set. The
script also samples the resident set of the whole process tree (launcher + every rank) twice a second.
Settings: 1 rank with every core as threads (what `ann train` does by default), 1 rank with 1 thread,
and 2 ranks with 1 thread each (what torchrun does). A setting that runs past `--max-seconds` is sent
SIGTERM (the CLI saves and exits as on preemption) and reports the records it wrote.

GPU part (only when CUDA is available; otherwise skipped with the reason): ANN with the dilated
ResNet-101 at 769x769, batch 2, fp32 vs bf16 + channels_last, built directly (benchmarks/train_step.py:
model + DDPEngine + SegLoss on random tensors; the data pipeline is not what is measured), with the model
FLOPs per image from torch.utils.flop_counter on one forward + backward and the achieved fraction of the
GPU's peak.

    python benchmarks/train_throughput.py                  # writes benchmarks/results/train_throughput.json
    python benchmarks/train_throughput.py --quick --out /tmp/t.json   # tiny images, a few steps
    python benchmarks/train_throughput.py --cli                # `ann train` on 2048x1024 PNG shards vs the model-only
    python benchmarks/train_throughput.py --cli --cli-small    # step (benchmarks/train_cli.py); CPU-sized
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from train_step import bench_recipe, measure_training, model_flops_per_image, read_steps, summarize_steps

ROOT = Path(__file__).resolve().parents[1]
RECIPE = "recipes/demo.yaml"

# Dense peak TFLOPS by device-name fragment: (bf16, fp32, tf32). First match wins.
PEAK_TFLOPS = [
    ("H100 PCIe", (756.0, 51.0, 378.0)),
    ("H100", (989.0, 67.0, 495.0)),  # SXM (reported as "H100 80GB HBM3")
    ("H200", (989.0, 67.0, 495.0)),
    ("A100", (312.0, 19.5, 156.0)),
]


# --- the machine ------------------------------------------------------------------------------------


def machine_info() -> dict:
    import torch

    cpus = os.cpu_count() or 1
    load = os.getloadavg()[0]
    info = {"cpu_count": cpus, "cpu": platform.machine(), "torch": torch.__version__, "python": platform.python_version(),
            "load_avg_1min_at_start": round(load, 2)}
    if load > 0.5 * cpus:
        info["note"] = (f"numbers taken on a shared {cpus}-core machine: load average {load:.1f} at start, "
                        "other processes competed for the cores, so img/s is lower and noisier than on an idle machine")
    return info


def peak_tflops(device_name: str) -> dict | None:
    for fragment, (bf16, fp32, tf32) in PEAK_TFLOPS:
        if fragment.lower() in device_name.lower():
            return {"bf16": bf16, "fp32": fp32, "tf32": tf32}
    return None


# --- CPU: the real CLI ------------------------------------------------------------------------------


class TreeRss:
    """Samples the summed resident set of a process and all its descendants; keeps the peak (MiB)."""

    def __init__(self, pid: int, period_s: float = 0.5):
        self.pid, self.period_s, self.peak_mb = pid, period_s, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _tree(self) -> set[int]:
        parents = {}
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                except (OSError, IndexError, ValueError):
                    continue
        tree, grew = {self.pid}, True
        while grew:
            new = {p for p, parent in parents.items() if parent in tree} - tree
            tree |= new
            grew = bool(new)
        return tree

    def _sample(self) -> float:
        total_kb = 0
        for pid in self._tree():
            try:
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        total_kb += int(line.split()[1])
            except OSError:
                continue
        return total_kb / 1024

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            self.peak_mb = max(self.peak_mb, self._sample())

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak_mb


def cli_command(work_dir: Path, data_root: Path, nproc: int, args) -> list[str]:
    sets = {
        "train.iters": args.iters, "train.log_every": args.log_every, "train.checkpoint_every": 10**9,
        "data.root": data_root, "data.synth.train": args.synth_train, "data.synth.val": 16,
        **args.extra_sets,
    }
    cmd = [sys.executable, "-m", "anncli", "train", RECIPE, "--work-dir", str(work_dir), "--resume", "never"]
    for key, value in sets.items():
        cmd += ["--set", f"{key}={value}"]
    return cmd + (["--nproc-per-node", str(nproc)] if nproc > 1 else [])


def run_setting(name: str, nproc: int, threads: int, data_root: Path, scratch: Path, args) -> dict:
    work_dir = scratch / name
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1", GLOO_SOCKET_IFNAME="lo")
    log = (scratch / f"{name}.log").open("w")
    start = time.perf_counter()
    child = subprocess.Popen(cli_command(work_dir, data_root, nproc, args), cwd=ROOT, env=env,
                             stdout=log, stderr=subprocess.STDOUT)
    rss = TreeRss(child.pid)
    terminated = False
    try:
        child.wait(timeout=args.max_seconds)
    except subprocess.TimeoutExpired:
        terminated = True
        child.send_signal(signal.SIGTERM)  # the CLI saves and exits as on preemption
        child.wait(timeout=300)
    wall = time.perf_counter() - start
    tree_peak = rss.stop()
    log.close()
    records = read_steps(work_dir / "events.jsonl")
    stopped_early = terminated and (not records or records[-1]["step"] < args.iters)  # not just its exit
    if not terminated and child.returncode != 0:
        tail = (scratch / f"{name}.log").read_text()[-2000:]
        raise RuntimeError(f"setting {name}: ann train exited with {child.returncode}:\n{tail}")
    result = {"ranks": nproc, "threads_per_rank": threads, "iters_requested": args.iters,
              "log_every": args.log_every, "warmup_records_skipped": args.warmup_records,
              "stopped_early_after_s": args.max_seconds if stopped_early else None,
              **summarize_steps(records, args.warmup_records),
              "peak_rss_mb_all_processes": round(tree_peak, 1), "wall_s": round(wall, 1)}
    print(f"[bench] {name}: {json.dumps(result)}", flush=True)
    return result


def cpu_benchmark(args) -> dict:
    cpus = os.cpu_count() or 1
    settings = [("1rank_all_threads", 1, cpus), ("1rank_1thread", 1, 1), ("2ranks_1thread", 2, 1)]
    with tempfile.TemporaryDirectory(prefix="ann-train-bench-") as tmp:
        scratch = Path(tmp)
        data_root = scratch / "synth"
        size = args.extra_sets.get("data.synth.size", "[64, 128]").strip("[]").replace(", ", "x").replace(",", "x")
        subprocess.run([sys.executable, "-m", "anncli", "data", "synth", str(data_root), "--train", str(args.synth_train),
                        "--val", "16", "--size", size], cwd=ROOT, check=True, capture_output=True)
        runs = {name: run_setting(name, nproc, threads, data_root, scratch, args) for name, nproc, threads in settings}
    two, one, one_t1 = (runs[k]["img_per_s_median"] for k in ("2ranks_1thread", "1rank_all_threads", "1rank_1thread"))
    ratio = lambda a, b: round(a / b, 3) if a and b else None  # noqa: E731
    return {
        "recipe": RECIPE, "overrides": {k: str(v) for k, v in args.extra_sets.items()},
        "batch_size_per_rank": args.batch_size, "synth_train_samples": args.synth_train,
        "settings": runs,
        "ratios": {"2ranks_over_1rank_img_per_s": ratio(two, one),
                   "2ranks_over_1rank_1thread_img_per_s": ratio(two, one_t1)},
    }


# --- GPU: ANN-R101 built directly ---------------------------------------------------------------------


def gpu_benchmark(args) -> dict:
    import torch

    if not torch.cuda.is_available():
        return {"skipped": f"CUDA is not available (torch {torch.__version__}, no GPU on this machine)",
                "flops_per_image_r101_769": model_flops_per_image(bench_recipe("resnet101", 19, "fp32", False, 2).model,
                                                                  (769, 769))}
    device = torch.device("cuda", 0)
    name = torch.cuda.get_device_name(device)
    peaks = peak_tflops(name)
    runs = {}
    for precision, channels_last in (("fp32", False), ("bf16", True)):
        run = measure_training("resnet101", 19, (769, 769), 2, precision, channels_last, args.gpu_steps, 5, device)
        if peaks is not None:
            key = "bf16" if precision == "bf16" else "fp32"
            run["peak_tflops"] = peaks[key]
            achieved = run["flops_per_image"] * run["img_per_s"] / 1e12
            run["fraction_of_peak"] = round(achieved / peaks[key], 4)
            if precision == "fp32":  # cuDNN convolutions use TF32 by default
                run["fraction_of_tf32_peak"] = round(achieved / peaks["tf32"], 4)
        else:
            run["fraction_of_peak"] = None
        runs[f"{precision}{'_channels_last' if channels_last else ''}"] = run
        print(f"[bench] gpu {precision}: {json.dumps(run)}", flush=True)
        torch.cuda.empty_cache()
    fp32, bf16 = runs["fp32"], runs["bf16_channels_last"]
    return {"device": name, "model": "ann, dilated ResNet-101 (output stride 8), 19 classes, OHEM CE + aux",
            "tf32_allowed": {"cudnn": torch.backends.cudnn.allow_tf32, "matmul": torch.backends.cuda.matmul.allow_tf32},
            "peak_tflops_known": peaks is not None, "runs": runs,
            "bf16_over_fp32_img_per_s": round(bf16["img_per_s"] / fp32["img_per_s"], 3)}


# --- main -------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--iters", type=int, default=40, help="training iterations per CPU setting")
    p.add_argument("--log-every", type=int, default=2)
    p.add_argument("--warmup-records", type=int, default=3, help="first step records left out of the median")
    p.add_argument("--max-seconds", type=float, default=100.0, help="SIGTERM a CPU setting after this long")
    p.add_argument("--synth-train", type=int, default=256)
    p.add_argument("--gpu-steps", type=int, default=20)
    p.add_argument("--skip-gpu", action="store_true")
    p.add_argument("--quick", action="store_true", help="tiny images, batch 2, a few steps (a smoke run)")
    p.add_argument("--out", type=Path, default=None,
                   help="default benchmarks/results/train_throughput.json (train_throughput_cli-<device>.json with --cli)")
    from train_cli import add_cli_options, cli_defaults

    add_cli_options(p)
    args = p.parse_args(argv)
    cli_defaults(args, p)
    args.extra_sets, args.batch_size = {}, 16
    if args.quick:
        args.iters, args.log_every, args.warmup_records, args.synth_train = 4, 1, 1, 16
        args.batch_size = 2
        args.extra_sets = {"data.synth.size": "[32, 64]", "augment.crop": "[32, 64]", "train.batch_size": 2}
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    if args.cli:
        from train_cli import cli_benchmark

        result = {"benchmark": "train_throughput_cli", "machine": machine_info(), "cli": cli_benchmark(args)}
        args.out = args.out or ROOT / "benchmarks" / "results" / f"train_throughput_cli-{result['cli']['device_slug']}.json"
    else:
        result = {"benchmark": "train_throughput", "quick": args.quick, "machine": machine_info(),
                  "cpu": cpu_benchmark(args)}
        result["gpu"] = {"skipped": "--skip-gpu"} if args.skip_gpu else gpu_benchmark(args)
        args.out = args.out or ROOT / "benchmarks" / "results" / "train_throughput.json"
    result["machine"]["load_avg_1min_at_end"] = round(os.getloadavg()[0], 2)
    result["seconds_total"] = round(time.perf_counter() - started, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"[bench] wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
