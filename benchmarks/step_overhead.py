"""The engine's training step against a plain step of the same network: time ratio and op count.

A plain step is what a user writes by hand: forward (autocast for bf16), `SegLoss`, backward,
`torch.optim.SGD(momentum, weight_decay).step()`, `zero_grad`; `plain_fused` is the same with torch's fused
SGD, the kernel the engine steps with, so `*_vs_fused` is the cost of the engine's own machinery. The engine's step is
`micro_step(..., boundary=True)` + `optimizer_step()` of `DDPEngine` or `DeepSpeedEngine` (ZeRO-1) in one
process, with everything the engine promises (non-finite skip, BN restore) switched on as in training.
Both run the same ANN (official variant, 19 classes, aux head, plain BN) from the same initial weights,
in interleaved rounds; the figure is the median of the per-round ratios. Ops are the top-level aten ops
of one step under torch.profiler (an aten op called by another aten op is not counted again): on a GPU each
is at least one kernel launch.

    python benchmarks/step_overhead.py                       # R50 and R101, DDP and DeepSpeed, fp32 and bf16
    python benchmarks/step_overhead.py --arch resnet101 --engine ddp --precision fp32 --rounds 5
    python benchmarks/step_overhead.py --tree before=/path/to/older/checkout   # the same, for another tree

Writes benchmarks/results/step-overhead-<device>.json (`--out` to change). With `--tree NAME=DIR` each
configuration runs once more in a subprocess that imports `anncli` from DIR, so one run reports before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGETS = {"time_ratio": 1.02, "op_ratio": 1.05, "plain_ops_r101": 3100}


def _recipe(arch: str, engine: str, precision: str, size: int, batch: int):
    from anncli.recipe import load_recipe

    return load_recipe(ROOT / "recipes" / "cityscapes.yaml", [
        f"model.backbone={arch}", "model.norm=bn", "model.pretrained=null", f"engine={engine}",
        "deepspeed.zero_stage=1", f"train.precision={precision}", f"train.batch_size={batch}",
        "train.accum_steps=1", "train.world_size=1", f"augment.crop=[{size}, {size}]", "loss.ohem_min_kept=1000"])


def _inputs(recipe, size: int, batch: int, device):
    import torch

    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=g).to(device)
    y = torch.randint(0, recipe.model.num_classes, (batch, size, size), generator=g).to(device)
    return x, y


def _plain(recipe, device, fused: bool = False):
    """A hand-written step of the same network: model, loss and torch's SGD as a user builds them
    (`fused`: torch's fused SGD kernel, the one the engine uses, to show the skip machinery's own cost)."""
    import torch

    from anncli.models.ann import build_model
    from anncli.train.losses import SegLoss

    torch.manual_seed(0)
    model = build_model(recipe.model).to(device).train()
    o = recipe.optim
    opt = torch.optim.SGD(model.parameters(), lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay,
                          fused=fused or None)
    criterion = SegLoss(recipe.loss, recipe.model.num_classes).to(device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(recipe.train.precision)

    def step(x, y):
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            main, aux = model(x)
        total, _ = criterion(main, aux, y)
        total.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return total.detach()

    return step


def _engine(recipe, device):
    import torch

    from anncli.cluster.distributed import DistInfo
    from anncli.models.ann import build_model
    from anncli.train.engine import build_engine
    from anncli.train.losses import SegLoss

    torch.manual_seed(0)
    model = build_model(recipe.model).to(device).train()
    engine = build_engine(model, recipe, DistInfo(rank=0, world_size=1, local_rank=0, device=device))
    criterion = SegLoss(recipe.loss, recipe.model.num_classes, check=False).to(device)

    def step(x, y):
        stats, _ = engine.micro_step(x, y, criterion, boundary=True)
        engine.optimizer_step()
        return stats

    return step


def _bare_deepspeed(recipe, device):
    """DeepSpeed's own step of the same network (ZeRO as configured, torch's fused SGD, no skip machinery):
    what the DeepSpeed engine adds on top of it is ann's."""
    import deepspeed
    import torch

    from anncli.models.ann import build_model
    from anncli.train.engine import deepspeed_config
    from anncli.train.losses import SegLoss

    torch.manual_seed(0)
    model = build_model(recipe.model).to(device).train()
    o = recipe.optim
    opt = torch.optim.SGD(model.parameters(), lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay, fused=True)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=deepspeed_config(recipe))
    criterion = SegLoss(recipe.loss, recipe.model.num_classes, check=False).to(device)

    def step(x, y):
        main, aux = engine(x)  # deepspeed_config turns torch autocast on for bf16/fp16
        total, _ = criterion(main, aux, y)
        engine.backward(total)
        engine.step()
        return total.detach()

    return step


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(step, x, y, device) -> float:
    _sync(device)
    start = time.perf_counter()
    step(x, y)
    _sync(device)
    return time.perf_counter() - start


def top_level_aten_ops(step, x, y) -> int:
    """aten ops of one step that no other aten op called: what the Python side dispatches."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step(x, y)
    count = 0
    for event in prof.events():
        if not event.name.startswith("aten::"):
            continue
        parent = event.cpu_parent
        while parent is not None and not parent.name.startswith("aten::"):
            parent = parent.cpu_parent
        count += parent is None
    return count


def measure(arch: str, engine: str, precision: str, size: int, batch: int, rounds: int, warmup: int, device) -> dict:
    import torch

    recipe = _recipe(arch, engine, precision, size, batch)
    x, y = _inputs(recipe, size, batch, device)
    steps = {"plain": _plain(recipe, device), "plain_fused": _plain(recipe, device, fused=True),
             "engine": _engine(recipe, device)}
    if engine == "deepspeed":
        steps["bare_deepspeed"] = _bare_deepspeed(recipe, device)
    for _ in range(warmup):
        for step in steps.values():
            step(x, y)
    ops = {name: top_level_aten_ops(step, x, y) for name, step in steps.items()}
    times = {name: [] for name in steps}
    names = list(steps)
    for r in range(rounds):  # interleaved, the order rotating: load changes hit all alike
        for name in names[r % len(names):] + names[:r % len(names)]:
            times[name].append(_timed(steps[name], x, y, device))
    ratios = [e / p for e, p in zip(times["engine"], times["plain"])]
    fused_ratios = [e / p for e, p in zip(times["engine"], times["plain_fused"])]
    return {"arch": arch, "engine": engine, "precision": precision, "size": size, "batch": batch,
            "rounds": rounds, "threads": torch.get_num_threads(),
            "plain_ms": round(statistics.median(times["plain"]) * 1e3, 1),
            "engine_ms": round(statistics.median(times["engine"]) * 1e3, 1),
            "plain_fused_ms": round(statistics.median(times["plain_fused"]) * 1e3, 1),
            "time_ratio": round(statistics.median(ratios), 4),
            "time_ratio_vs_fused": round(statistics.median(fused_ratios), 4),
            "plain_ops": ops["plain"], "plain_fused_ops": ops["plain_fused"], "engine_ops": ops["engine"],
            "op_ratio": round(ops["engine"] / ops["plain"], 4),
            "op_ratio_vs_fused": round(ops["engine"] / ops["plain_fused"], 4),
            **({"bare_deepspeed_ms": round(statistics.median(times["bare_deepspeed"]) * 1e3, 1),
                "bare_deepspeed_ops": ops["bare_deepspeed"],
                "time_ratio_vs_bare_deepspeed": round(statistics.median(
                    [e / p for e, p in zip(times["engine"], times["bare_deepspeed"])]), 4),
                "op_ratio_vs_bare_deepspeed": round(ops["engine"] / ops["bare_deepspeed"], 4)}
               if "bare_deepspeed" in steps else {})}


def _in_tree(tree: Path, args, arch, engine, precision) -> dict:
    """One configuration measured by this script in a subprocess importing `anncli` from `tree`."""
    cmd = [sys.executable, __file__, "--single", "--arch", arch, "--engine", engine, "--precision", precision,
           "--size", str(args.size), "--batch", str(args.batch), "--rounds", str(args.rounds),
           "--warmup", str(args.warmup), "--device", args.device]
    env = dict(os.environ, PYTHONPATH=str(tree), ANN_STEP_OVERHEAD_TREE=str(tree))
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tree)
    if out.returncode != 0:
        raise SystemExit(f"step_overhead in {tree} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _write(out: Path, device, rows: list[dict]) -> None:
    import torch

    mine = [r for r in rows if r["tree"] == "this"]
    r101 = [r["plain_ops"] for r in mine if r["arch"] == "resnet101"]
    worst = {"time_ratio": max(r["time_ratio"] for r in mine), "op_ratio": max(r["op_ratio"] for r in mine),
             "plain_ops_r101": max(r101) if r101 else None}
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "cpu_count": os.cpu_count(), "load_avg": os.getloadavg(), "rows": rows,
              "targets": {k: {"target": TARGETS[k], "worst": v, "pass": v is not None and v <= TARGETS[k]}
                          for k, v in worst.items()},
              # against a plain step with torch's fused SGD (the engine's kernel): the machinery's own cost
              "against_fused_sgd": {k: max(r[k] for r in mine if k in r) if any(k in r for r in mine) else None
                                    for k in ("time_ratio_vs_fused", "op_ratio_vs_fused")},
              # DeepSpeed rows against DeepSpeed's own step of the same network: ann's share of the engine
              "against_bare_deepspeed": {k: max(r[k] for r in mine if k in r) if any(k in r for r in mine) else None
                                         for k in ("time_ratio_vs_bare_deepspeed", "op_ratio_vs_bare_deepspeed")}}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", action="append", choices=["resnet50", "resnet101"])
    p.add_argument("--engine", action="append", choices=["ddp", "deepspeed"])
    p.add_argument("--precision", action="append", choices=["fp32", "bf16"])
    p.add_argument("--size", type=int, default=129)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="auto")
    p.add_argument("--tree", action="append", default=[], help="NAME=DIR: also measure the anncli of DIR")
    p.add_argument("--single", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import torch

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    archs, engines = args.arch or ["resnet50", "resnet101"], args.engine or ["ddp", "deepspeed"]
    precisions = args.precision or ["fp32", "bf16"]
    if args.single:
        print(json.dumps(measure(archs[0], engines[0], precisions[0], args.size, args.batch, args.rounds,
                                 args.warmup, device)))
        return 0
    trees = {"this": ROOT, **{t.split("=", 1)[0]: Path(t.split("=", 1)[1]).resolve() for t in args.tree}}
    out = args.out or ROOT / "benchmarks" / "results" / f"step-overhead-{device.type}.json"
    rows = []
    for precision in precisions:  # fp32 first, then bf16; the JSON is rewritten after every row
        for engine in engines:
            for arch in archs:
                for name, tree in trees.items():
                    row = {"tree": name, **_in_tree(tree, args, arch, engine, precision)}
                    rows.append(row)
                    print(f"{name:>8} {arch} {engine:9} {precision}: plain {row['plain_ms']} ms, engine "
                          f"{row['engine_ms']} ms ({row['time_ratio']}x); ops {row['plain_ops']} / "
                          f"{row['engine_ops']} ({row['op_ratio']}x)"
                          + (f"; vs fused SGD {row['time_ratio_vs_fused']}x time, {row['op_ratio_vs_fused']}x ops"
                             if "plain_fused_ops" in row else "")
                          + (f"; vs DeepSpeed's own step {row['time_ratio_vs_bare_deepspeed']}x time, "
                             f"{row['op_ratio_vs_bare_deepspeed']}x ops" if "bare_deepspeed_ops" in row else ""), flush=True)
                    _write(out, device, rows)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
