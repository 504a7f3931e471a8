"""Peak memory and seconds per image of whole vs sliding-window inference: ANN vs the plain non-local net.

Each configuration runs in its own process, so that one peak does not hide another. On CPU the peak
is the resident-set high-water mark during inference (reset with /proc/self/clear_refs before it);
on CUDA it is torch's max_memory_allocated. Reported: the peak with the model loaded and the increment
above the loaded model.

Keeping the run bounded on a small CPU:
- a configuration whose plain non-local affinity (N x N float32, N = H/8 * W/8 positions) does not fit
  the memory budget is skipped with the computed requirement;
- a whole-image run whose estimated time (from the single-window run) exceeds --time-budget is skipped
  with the estimate;
- sliding windows: the first --max-windows windows run for real; later windows reuse the first
  window's output (same shape, so the accumulators and the peak are those of a full run) and the
  seconds per image are extrapolated from the measured window time. Both counts are recorded.

    python benchmarks/eval_memory.py                   # 2048x1024, scales 1.0 and 1.75, 864/576 windows
    python benchmarks/eval_memory.py --quick           # 512x256 image, 216/144 windows, every window real
    python benchmarks/eval_memory.py --modes whole --scales 1.0 --time-budget 900 --update
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

GIB = 1024**3
ROOT = Path(__file__).resolve().parents[1]


def affinity_gib(height: int, width: int, scale: float, output_stride: int = 8) -> float:
    """float32 bytes of one N x N attention map for the image at this scale, in GiB."""
    n = -(-round(height * scale) // output_stride) * -(-round(width * scale) // output_stride)
    return n * n * 4 / GIB


def available_gib() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024 / GIB
    return float("inf")


# ----------------------------------------------------------------------------------- one configuration


def _rss_gib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024 / GIB
    raise RuntimeError(field)


class WindowBudget:
    """Runs the first `limit` forwards for real; later ones return the first output (same shape)."""

    def __init__(self, model, limit: int):
        self.model, self.limit, self.calls, self.real_seconds, self.first = model, limit, 0, [], None

    def __call__(self, x):
        import torch

        self.calls += 1
        if self.first is not None and self.calls > self.limit:
            return self.first
        start = time.perf_counter()
        out = self.model(x)
        if x.is_cuda:
            torch.cuda.synchronize()
        self.real_seconds.append(time.perf_counter() - start)
        self.first = out if self.first is None else self.first
        return out


def run_one(cfg: dict) -> dict:
    import torch

    from anncli.eval.inference import Protocol, infer_logits
    from anncli.models.ann import build_model
    from anncli.recipe import ModelConfig

    torch.set_num_threads(cfg["threads"])
    device = torch.device(cfg["device"])
    torch.manual_seed(0)
    model = build_model(ModelConfig(name=cfg["model"], backbone=cfg["backbone"], num_classes=19, norm="bn",
                                    aux=False)).to(device).eval()
    image = torch.randn(3, cfg["height"], cfg["width"], device=device)
    slide = cfg["mode"] == "slide"
    protocol = Protocol(scales=(cfg["scale"],), mode=cfg["mode"], crop=tuple(cfg["crop"]) if slide else None,
                        stride=tuple(cfg["stride"]) if slide else None, batch_windows=1)  # one window a forward
    wrapped = WindowBudget(model, cfg["max_windows"] if slide else 1 << 30)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() / GIB
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM, the peak resident set
        before = _rss_gib("VmRSS")
    start = time.perf_counter()
    infer_logits(wrapped, image, protocol)
    if device.type == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / GIB if device.type == "cuda" else _rss_gib("VmHWM")
    skipped = wrapped.calls - len(wrapped.real_seconds)
    per_forward = sum(wrapped.real_seconds) / len(wrapped.real_seconds)
    return {
        "peak_gib": round(peak, 3), "loaded_model_gib": round(before, 3),
        "inference_peak_gib": round(peak - before, 3),
        "forwards": wrapped.calls, "forwards_run": len(wrapped.real_seconds),
        "seconds_per_forward": round(per_forward, 3),
        "seconds_per_image": round(wall + skipped * per_forward, 3),
        "seconds_extrapolated": skipped > 0,
    }


# ---------------------------------------------------------------------------------------- orchestration


def windows(length: int, crop: int, stride: int) -> int:
    return max(length - crop + stride - 1, 0) // stride + 1


def plan(args) -> list[dict]:
    """The reference single window first (its time calibrates the estimates), then every configuration."""
    base = {"backbone": args.backbone, "device": args.device, "threads": args.threads,
            "crop": list(args.crop), "stride": list(args.stride), "max_windows": args.max_windows}
    runs = []
    for model in args.models:
        if "slide" in args.modes:
            runs.append({**base, "model": model, "mode": "whole", "scale": 1.0, "height": args.crop[0],
                         "width": args.crop[1], "reference": True})
        for scale in args.scales:
            for mode in args.modes:
                runs.append({**base, "model": model, "mode": mode, "scale": scale, "height": args.height,
                             "width": args.width, "reference": False})
    return runs


def precheck(cfg: dict, args, window_seconds: dict) -> str | None:
    """A reason to skip the configuration, or None."""
    h, w = round(cfg["height"] * cfg["scale"]), round(cfg["width"] * cfg["scale"])
    runs_whole = cfg["mode"] == "whole" or h < cfg["crop"][0] or w < cfg["crop"][1]
    view = (h, w) if runs_whole else tuple(cfg["crop"])
    if cfg["model"] == "nonlocal":
        need = 2 * affinity_gib(*view, 1.0)  # the affinity and its softmax are alive together
        if need > args.mem_gib:
            return f"needs about {need:.1f} GiB for two {affinity_gib(*view, 1.0):.1f} GiB affinity maps (budget {args.mem_gib:.1f} GiB)"
    ref = window_seconds.get(cfg["model"])
    if runs_whole and ref is not None:
        estimate = ref * (h * w) / (cfg["crop"][0] * cfg["crop"][1])  # linear in pixels: a lower bound
        if estimate > args.time_budget:
            return f"estimated {estimate:.0f} s > --time-budget {args.time_budget:.0f} s"
    return None


def run_all(args) -> dict:
    results, window_seconds = [], {}
    started = time.perf_counter()
    for cfg in plan(args):
        h, w = round(cfg["height"] * cfg["scale"]), round(cfg["width"] * cfg["scale"])
        row = {k: cfg[k] for k in ("model", "backbone", "mode", "scale", "height", "width", "reference")}
        row["scaled"] = [h, w]
        if cfg["mode"] == "slide":
            row.update(crop=cfg["crop"], stride=cfg["stride"],
                       windows=windows(h, cfg["crop"][0], cfg["stride"][0]) * windows(w, cfg["crop"][1], cfg["stride"][1]))
        row["affinity_gib_if_plain_nonlocal"] = round(
            affinity_gib(*(cfg["crop"] if cfg["mode"] == "slide" and h >= cfg["crop"][0] and w >= cfg["crop"][1] else (h, w)), 1.0), 3)
        row["loadavg_before"] = round(os.getloadavg()[0], 2)
        reason = precheck(cfg, args, window_seconds)
        if reason:
            row["skipped"] = reason
        else:
            row.update(_subprocess(cfg, timeout=max(60.0, 3 * args.time_budget)))
            if cfg["reference"] and "seconds_per_forward" in row:
                window_seconds[cfg["model"]] = row["seconds_per_forward"]
        print(json.dumps(row), flush=True)
        results.append(row)
    _add_ratios(results)
    return {"benchmark": "eval_memory", "device": args.device, "host": platform.node(), "cpus": os.cpu_count(),
            "threads": args.threads, "memory_budget_gib": args.mem_gib, "time_budget_s": args.time_budget,
            "max_windows": args.max_windows, "seconds_total": round(time.perf_counter() - started, 1),
            "target": "slide peak within 1.5x of the single-window peak (ANN), at every scale", "runs": results}


def _add_ratios(results: list[dict]) -> None:
    refs = {r["model"]: r for r in results if r["reference"] and "peak_gib" in r}
    for r in results:
        ref = refs.get(r["model"])
        if r["mode"] == "slide" and not r["reference"] and ref and "peak_gib" in r:
            r["peak_vs_single_window"] = round(r["peak_gib"] / ref["peak_gib"], 3)
            r["inference_peak_vs_single_window"] = round(r["inference_peak_gib"] / ref["inference_peak_gib"], 3)
            r["within_1_5x"] = r["peak_vs_single_window"] <= 1.5


def merge_reports(old: dict, new: dict) -> dict:
    """The old report with the runs of the new one replacing those of the same configuration."""
    key = lambda r: (r["model"], r["mode"], r["scale"], r["height"], r["width"], r["reference"])  # noqa: E731
    fresh = {key(r): r for r in new["runs"]}
    runs = [fresh.pop(key(r), r) for r in old["runs"]] + list(fresh.values())
    _add_ratios(runs)
    merged = {**old, "runs": runs}
    merged["seconds_total"] = round(old.get("seconds_total", 0) + new["seconds_total"], 1)
    merged.setdefault("updates", []).append(
        {k: new[k] for k in ("time_budget_s", "memory_budget_gib", "max_windows", "seconds_total")})
    return merged


def _subprocess(cfg: dict, timeout: float) -> dict:
    cmd = [sys.executable, __file__, "--one", json.dumps(cfg)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"skipped": f"timed out after {timeout:.0f} s"}
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        killed = done.returncode in (-9, 137)
        return {"skipped": "killed (out of memory?)" if killed else f"failed: {tail}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def _pair(text: str) -> tuple[int, int]:
    h, _, w = text.partition("x")
    return int(h), int(w or h)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--one", help=argparse.SUPPRESS)
    p.add_argument("--quick", action="store_true", help="512x256 image, 216x216 windows at stride 144")
    p.add_argument("--size", type=_pair, default=(1024, 2048), help="image HxW (default 1024x2048)")
    p.add_argument("--crop", type=_pair, default=(864, 864))
    p.add_argument("--stride", type=_pair, default=(576, 576))
    p.add_argument("--scales", type=lambda s: [float(v) for v in s.split(",")], default=[1.0, 1.75])
    p.add_argument("--models", type=lambda s: s.split(","), default=["ann", "nonlocal"])
    p.add_argument("--modes", type=lambda s: s.split(","), default=["slide", "whole"],
                   help="slide,whole; without slide there is no reference window and no time estimate")
    p.add_argument("--update", action="store_true", help="replace matching runs in an existing --json file")
    p.add_argument("--backbone", default="resnet101")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--max-windows", type=int, default=1, help="windows run for real per slide configuration")
    p.add_argument("--time-budget", type=float, default=240.0, help="skip whole-image runs estimated longer (s)")
    p.add_argument("--mem-gib", type=float, default=None, help="memory budget (default: 80%% of MemAvailable)")
    p.add_argument("--json", type=Path, default=ROOT / "benchmarks/results/eval_memory.json")
    args = p.parse_args()
    if args.one:
        print(json.dumps(run_one(json.loads(args.one))))
        return
    if args.quick:
        args.size, args.crop, args.stride, args.max_windows = (256, 512), (216, 216), (144, 144), 1 << 30
    args.height, args.width = args.size
    if args.mem_gib is None:
        args.mem_gib = round(0.8 * available_gib(), 1)
    report = run_all(args)
    if args.update and args.json.is_file():
        report = merge_reports(json.loads(args.json.read_text()), report)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.json} in {report['seconds_total']} s")


if __name__ == "__main__":
    main()
