"""Before/after of the exact attention savings, in one run, interleaved: pool-then-project, the output
fold and SDPA.

Variants (all the same weights and inputs):
- `before`: the blocks' code as it was on main before these savings (anncli/models/attention.py at
  BEFORE_REV, read with git): the official formulation (1x1 value projection of every position, then
  torch's adaptive pools; softmax(q·kᵀ)·v; W on every attended vector; the fuse conv over the concat);
- `after_pool`: today's blocks with only the pool-first value path (separable matmul pooling, the
  value conv on the 110 anchors);
- `after`: the default, which at these sizes takes both pool-first and the output fold (W, and the fuse
  conv's columns that read it, applied to the 110 anchor values before attending), explicit attention;
- `after_sdpa`: as `after`, with `model.attention: sdpa`.

Part `blocks`: `ann bench attention`'s comparison at 128×256, C = 2048 (eval, no_grad, fp32): today's
plain non-local block against each APNB variant; FLOPs from FlopCounterMode, time per forward.
Part `network`: ANN-R101 with aux at 257×257, batch 1, one training step (forward, cross-entropy on
main + 0.4 aux, backward) and one eval forward per variant (`before`: the same network with its AFNB
and APNB swapped for the old code's, same weights).

Every round times each variant once, in turn, so a load change on a shared machine hits all of them;
the JSON keeps every sample, the medians and the ratios. Writes benchmarks/results/attention_fusion.json.

    python benchmarks/attention_fusion.py [--rounds 3] [--net-rounds 8] [--part all|blocks|network]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import time
import types
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from anncli.interop.bench import ANCHOR_SIZES, KEY_CHANNELS, VALUE_CHANNELS, make_block
from anncli.models.ann import build_model
from anncli.models.attention import AttentionBranch
from anncli.recipe import ModelConfig

ROOT = Path(__file__).resolve().parents[1]
BEFORE_REV = "18d8759"  # main when the performance issue was filed: the literal blocks
# (pool_first, fold_output, attention); None: the default, each saving where it costs less for the shape
VARIANTS = {"after_pool": (True, False, "explicit"), "after": (None, None, "explicit"),
            "after_sdpa": (None, None, "sdpa")}


def blocks_before(rev: str = BEFORE_REV) -> types.ModuleType:
    """anncli/models/attention.py as it was at `rev`, as a module of its own."""
    source = subprocess.run(["git", "show", f"{rev}:anncli/models/attention.py"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout
    module = types.ModuleType("attention_before")
    exec(compile(source, f"{rev}:anncli/models/attention.py", "exec"), module.__dict__)
    return module


def set_variant(module: nn.Module, variant: str) -> nn.Module:
    pool_first, fold_output, impl = VARIANTS[variant]
    for m in module.modules():
        if isinstance(m, AttentionBranch) and m.sampler is not None:
            m.pool_first, m.fold_output, m.impl = pool_first, fold_output, impl
            m.sampler.separable = pool_first is not False
    return module


def make_apnb(variant: str, channels: int, old: types.ModuleType) -> nn.Module:
    if variant == "before":
        return old.APNBAttention(channels, channels, KEY_CHANNELS, VALUE_CHANNELS, ANCHOR_SIZES)
    return set_variant(make_block("apnb", channels), variant)


def with_old_blocks(model: nn.Module, old: types.ModuleType, cfg: ModelConfig) -> nn.Module:
    """A copy of the official-variant `model` whose AFNB and APNB are the old code's, with the same weights."""
    before = copy.deepcopy(model)
    c3, c4, width = 1024, 2048, 512
    k, v, sizes = cfg.key_channels, cfg.value_channels, cfg.psp_sizes
    before.afnb = old.AFNB(c3, c4, c4, k, v, cfg.dropout, sizes)
    before.apnb = old.APNB(width, width, k, v, cfg.dropout, sizes)
    before.afnb.load_state_dict(model.afnb.state_dict())
    before.apnb.load_state_dict(model.apnb.state_dict())
    return before


def block_flops(variant: str | None, channels: int, size, old: types.ModuleType) -> int:
    with torch.device("meta"):
        block = (make_block("nonlocal", channels) if variant is None else make_apnb(variant, channels, old)).eval()
        x = torch.empty(1, channels, *size)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        block(x)
    return int(counter.get_total_flops())


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def interleaved(runs: dict, rounds: int, cold: tuple[str, ...] = ()) -> dict:
    """One warm-up call per entry (except those in `cold`), then `rounds` rounds timing every entry once,
    in turn (ms)."""
    for name, fn in runs.items():
        if name not in cold:
            fn()
    samples = {name: [] for name in runs}
    for _ in range(rounds):
        for name, fn in runs.items():
            samples[name].append(1e3 * _timed(fn))
    return {name: {"median_ms": statistics.median(s), "ms": [round(v, 1) for v in s]} for name, s in samples.items()}


def blocks_part(rounds: int, channels: int, size, old: types.ModuleType) -> dict:
    torch.manual_seed(0)
    x = torch.randn(1, channels, *size)
    nl = make_block("nonlocal", channels).eval()
    state = make_block("apnb", channels).state_dict()
    apnbs = {v: make_apnb(v, channels, old).eval() for v in ("before", *VARIANTS)}
    for block in apnbs.values():
        block.load_state_dict(state)

    def forward(block):
        def run():
            with torch.no_grad():
                block(x)
        return run

    runs = {"nonlocal": forward(nl), **{f"apnb_{v}": forward(b) for v, b in apnbs.items()}}
    # The non-local forward at 128x256 is ~1.2 TFLOP (close to a minute on 2 cores): it is not warmed up
    # (its 4 GiB maps are fresh allocations on every call anyway); the APNB variants are.
    times = interleaved(runs, rounds, cold=("nonlocal",))
    flops = {"nonlocal": block_flops(None, channels, size, old),
             **{f"apnb_{v}": block_flops(v, channels, size, old) for v in apnbs}}
    nl_ms, nl_flops = times["nonlocal"]["median_ms"], flops["nonlocal"]
    ratios = {v: {"time_nl_over_apnb": round(nl_ms / times[f"apnb_{v}"]["median_ms"], 2),
                  "flops_nl_over_apnb": round(nl_flops / flops[f"apnb_{v}"], 2)} for v in apnbs}
    return {"size": f"{size[0]}x{size[1]}", "channels": channels, "times": times, "flops": flops,
            "ratios_nl_over_apnb": ratios}


def network_part(rounds: int, size: int, eval_rounds: int, old: types.ModuleType) -> dict:
    torch.manual_seed(0)
    cfg = ModelConfig(backbone="resnet101", num_classes=19, norm="bn")
    model = build_model(cfg)
    models = {"before": with_old_blocks(model, old, cfg), **{v: model for v in VARIANTS}}
    x = torch.randn(1, 3, size, size)
    y = torch.randint(0, 19, (1, size, size))

    def train_step(variant):
        def run():
            net = models[variant] if variant == "before" else set_variant(model, variant)
            main, aux = net.train()(x)
            (F.cross_entropy(main, y) + 0.4 * F.cross_entropy(aux, y)).backward()
            net.zero_grad(set_to_none=True)
        return run

    def eval_forward(variant):
        def run():
            net = models[variant] if variant == "before" else set_variant(model, variant)
            with torch.no_grad():
                net.eval()(x)
        return run

    names = list(models)
    train = interleaved({v: train_step(v) for v in names}, rounds)
    out = {"model": "ANN-R101, aux, 19 classes, plain BN", "input": f"1x3x{size}x{size}", "train_step": train,
           "speedup_over_before": {v: {"train_step": round(train["before"]["median_ms"] / train[v]["median_ms"], 3)}
                                   for v in names}}
    if eval_rounds:
        evals = out["eval_forward"] = interleaved({v: eval_forward(v) for v in names}, eval_rounds)
        for v in names:
            out["speedup_over_before"][v]["eval_forward"] = round(evals["before"]["median_ms"] / evals[v]["median_ms"], 3)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", choices=("all", "blocks", "network"), default="all")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds of the block comparison")
    p.add_argument("--net-rounds", type=int, default=8, help="timed rounds of the network step")
    p.add_argument("--net-eval-rounds", type=int, default=6, help="timed rounds of the eval forward (0: none)")
    p.add_argument("--before-rev", default=BEFORE_REV, help="git revision whose blocks are `before`")
    p.add_argument("--channels", type=int, default=2048)
    p.add_argument("--size", default="128x256")
    p.add_argument("--net-size", type=int, default=257)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "attention_fusion.json")
    args = p.parse_args()
    h, w = (int(v) for v in args.size.lower().split("x"))
    result = {"benchmark": "attention_fusion", "torch": torch.__version__, "threads": torch.get_num_threads(),
              "cpus": os.cpu_count(), "load_avg_1min_at_start": round(os.getloadavg()[0], 2),
              "variants": {"before": {"code": f"anncli/models/attention.py at {args.before_rev}"},
                           **{v: {"pool_first": pf, "fold_output": fold, "attention": impl}
                              for v, (pf, fold, impl) in VARIANTS.items()}}}
    old = blocks_before(args.before_rev)
    if args.part in ("all", "network"):
        result["network"] = network_part(args.net_rounds, args.net_size, args.net_eval_rounds, old)
        print(json.dumps(result["network"]["speedup_over_before"]), flush=True)
    if args.part in ("all", "blocks"):
        result["blocks"] = blocks_part(args.rounds, args.channels, (h, w), old)
        print(json.dumps(result["blocks"]["ratios_nl_over_apnb"]), flush=True)
    result["load_avg_1min_at_end"] = round(os.getloadavg()[0], 2)
    if result["load_avg_1min_at_start"] > 0.5 * (os.cpu_count() or 1):
        result["note"] = ("measured on a shared machine (other jobs were running): absolute times are inflated "
                          "and noisy; the interleaved ratios are the figures to read")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
