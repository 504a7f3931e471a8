"""The parts of `make gpu-check` (benchmarks/gpu_check.py) that measure the GPU-first work of the training
step, evaluation and the CLI, and the issue's targets as JSON fields (ratio or value, target, pass).

Each part takes the check's sizes (FULL on a GPU, DRY on the CPU) and returns a dict; gpu_check.py times
it and records an error instead when it raises. Compile and `eval.batch_windows` are used when the
recipe has them; otherwise their part says "unavailable".
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

FULL_CLI = {"cli_backbone": "resnet101", "cli_crop": (769, 769), "cli_batch": 2, "cli_precision": "bf16",
            "cli_channels_last": True, "cli_iters": 30, "cli_log_every": 10, "cli_warmup_records": 1,
            "cli_images": 32, "cli_workers": [8, 12]}
DRY_CLI = {"cli_backbone": "small", "cli_crop": (65, 65), "cli_batch": 2, "cli_precision": "fp32",
           "cli_channels_last": False, "cli_iters": 4, "cli_log_every": 1, "cli_warmup_records": 1,
           "cli_images": 2, "cli_workers": [0]}
COMPILE_TIMEOUT_S = 150  # the target is 120 s to the first step


def cli_args(dry: bool, **changes) -> argparse.Namespace:
    return argparse.Namespace(**{**(DRY_CLI if dry else FULL_CLI), **changes})


def shards_in(scratch: Path, dry: bool) -> Path:
    """The generated 2048x1024 PNG shards the CLI parts share, written on first use."""
    from train_cli import write_cityscapes_like_shards

    out = scratch / "shards"
    if not (out / "cityscapes-train.json").is_file():
        write_cityscapes_like_shards(out, cli_args(dry).cli_images)
    return out


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_part(device, dry: bool) -> dict:
    """The bf16 matmul rate of this device: the yardstick of the training step's FLOP/s."""
    import torch

    n, reps = (256, 2) if dry else (8192, 20)
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    a @ b
    _sync(device)
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    _sync(device)
    seconds = time.perf_counter() - start
    return {"n": n, "repeats": reps, "tflops": round(2 * n**3 * reps / seconds / 1e12, 6)}


def cudnn_part(cfg: dict, device) -> dict:
    """The bf16 channels_last training step with cuDNN's autotuner off and on."""
    import torch
    from train_step import measure_training

    before = torch.backends.cudnn.benchmark
    runs = {}
    try:
        for on in (False, True):
            torch.backends.cudnn.benchmark = on
            runs[f"benchmark_{'on' if on else 'off'}"] = measure_training(
                cfg["backbone"], 19, cfg["crop"], cfg["batch"], "bf16", True, cfg["steps"], cfg["warmup"], device)
    finally:
        torch.backends.cudnn.benchmark = before
    on, off = runs["benchmark_on"]["img_per_s"], runs["benchmark_off"]["img_per_s"]
    return {"runs": runs, "on_over_off_img_per_s": round(on / off, 3)}


def batch8_part(cfg: dict, device, matmul_tflops: float | None) -> dict:
    """The bf16 channels_last step at batch 8: its FLOP/s as a fraction of the measured bf16 matmul rate."""
    from train_step import measure_training

    run = measure_training(cfg["backbone"], 19, cfg["crop"], 8, "bf16", True, cfg["steps"], cfg["warmup"], device)
    achieved = run["flops_per_image"] * run["img_per_s"] / 1e12
    run["fraction_of_matmul"] = round(achieved / matmul_tflops, 6) if matmul_tflops else None
    return run


def eval_protocol_part(cfg: dict, device) -> dict:
    """The card's protocol (scales 0.75/1/1.25 + flip, 864 windows at stride 576) on one 2048x1024 image,
    fp32 against bf16: seconds per image, with eval.batch_windows "auto" where the protocol has it."""
    import dataclasses

    import torch

    from anncli.eval.inference import Protocol, infer_logits
    from anncli.models.ann import build_model
    from anncli.recipe import ModelConfig

    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone=cfg["backbone"], num_classes=19)).to(device).eval()
    image = torch.randn(3, *cfg["size"], device=device)
    batched = "batch_windows" in {f.name for f in dataclasses.fields(Protocol)}
    out = {"image": f"{cfg['size'][1]}x{cfg['size'][0]}", "scales": [0.75, 1.0, 1.25], "flip": True,
           "crop": cfg["crop"], "stride": cfg["stride"],
           "batch_windows": "auto" if batched else "unavailable (windows one by one)"}
    for precision in ("fp32", "bf16"):
        fields = dict(scales=(0.75, 1.0, 1.25), flip=True, mode="slide", crop=tuple(cfg["crop"]),
                      stride=tuple(cfg["stride"]), precision=precision)
        protocol = Protocol(**fields, **({"batch_windows": "auto"} if batched else {}))
        with torch.no_grad():
            infer_logits(model, image, protocol)  # warm-up: allocation, autotuning
            _sync(device)
            start = time.perf_counter()
            for _ in range(cfg["repeats"]):
                infer_logits(model, image, protocol)
            _sync(device)
        out[f"{precision}_s_per_image"] = round((time.perf_counter() - start) / cfg["repeats"], 4)
    out["bf16_over_fp32_speed"] = round(out["fp32_s_per_image"] / out["bf16_s_per_image"], 3)
    return out


def cli_part(dry: bool, shards: Path, scratch: Path) -> dict:
    """train_cli.py: `ann train` on 2048x1024 PNG shards against the model-only step."""
    from train_cli import cli_benchmark

    return cli_benchmark(cli_args(dry), shards=shards, scratch=scratch)


def compile_part(dry: bool, shards: Path, scratch: Path, eager: dict) -> dict:
    """`ann train --compile` on the CLI part's settings and workers, logging every step: the seconds to its
    first step, and its steady img/s over the eager CLI run's (`eager`: the cli part's report)."""
    from train_cli import run_cli

    from anncli.recipe import ModelConfig

    if "compile" not in ModelConfig.model_fields:
        return {"unavailable": "this version has no model.compile / --compile"}
    args = cli_args(dry, cli_iters=3 if dry else 25, cli_log_every=1, cli_warmup_records=1 if dry else 5)
    workers = eager.get("workers_for_ratio", args.cli_workers[-1])
    compiled = run_cli(args, shards, scratch, workers, name="compiled", flags=("--compile",), timeout=COMPILE_TIMEOUT_S)
    out = {"compiled": compiled, "first_step_s": compiled.get("first_record_s"), "eager_img_per_s": eager.get("img_per_s")}
    if compiled.get("img_per_s_median") and eager.get("img_per_s"):
        out["steady_over_eager"] = round(compiled["img_per_s_median"] / eager["img_per_s"], 3)
    return out


def deepspeed_part(dry: bool, shards: Path, scratch: Path, ddp_img_per_s: float | None) -> dict:
    """`ann train` with DeepSpeed ZeRO-2 in bf16 on the same shards, beside the DDP engine's CLI rate."""
    from train_cli import run_cli

    args = cli_args(dry, cli_precision="bf16")
    run = run_cli(args, shards, scratch, args.cli_workers[-1], name="deepspeed",
                  extra={"engine": "deepspeed", "deepspeed.zero_stage": 2})
    rate = run.get("img_per_s_median")
    return {"engine": "deepspeed", "zero_stage": 2, "precision": "bf16", "run": run,
            "over_ddp_cli_img_per_s": round(rate / ddp_img_per_s, 3) if rate and ddp_img_per_s else None}


def _target(value, target: float, at_least: bool, **extra) -> dict:
    key = "ratio" if at_least else "value"
    met = None if value is None else (value >= target if at_least else value <= target)
    return {key: value, "target": target, "compare": ">=" if at_least else "<=", "pass": met, **extra}


def targets(report: dict) -> dict:
    """The issue's targets, each with its measured ratio or value, the target and whether it holds
    (pass null: the part failed or could not measure it)."""
    get = lambda part, *keys: _dig(report.get(part, {}), keys)  # noqa: E731
    return {
        "attention_memory_nonlocal_over_apnb": _target(get("attention", "ratios", "memory"), 28.0, True),
        "train_bf16_batch8_fraction_of_matmul": _target(get("train_batch8", "fraction_of_matmul"), 0.35, True),
        "train_bf16_over_mmseg_amp": _target(None, 2.0, True, note="unmeasured: mmsegmentation is not in this check"),
        "eval_bf16_s_per_image": _target(get("eval_protocol", "bf16_s_per_image"), 0.25, False, unit="s"),
        "eval_bf16_over_fp32": _target(get("eval_protocol", "bf16_over_fp32_speed"), 1.5, True),
        "compile_first_step_s": _target(get("compile", "first_step_s"), 120.0, False, unit="s"),
        "compile_steady_over_eager": _target(get("compile", "steady_over_eager"), 1.15, True),
        "cli_over_model_only": _target(get("cli", "ratio"), 0.9, True, workers=get("cli", "workers_for_ratio")),
    }


def _dig(tree, keys):
    for key in keys:
        if not isinstance(tree, dict) or key not in tree:
            return None
        tree = tree[key]
    return tree
