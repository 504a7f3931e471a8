"""`ann bench attention`: the paper's efficiency comparison of APNB with the plain non-local block.

Blocks (reference §5): the attention branch of APNB(C, C, 256, 256) with anchors (1, 3, 6, 8) against
the non-local block with the same convs and full N×N attention, on feature maps 1×C×H×W, in eval mode
under no_grad. Per block and size:
- flops: `torch.utils.flop_counter.FlopCounterMode` on the meta device (a multiply-add counts 2);
- peak_mem_bytes: CUDA `max_memory_allocated` of the forward minus that of an identity block; CPU the
  peak RSS of a child process during one forward above its RSS just before (module and input resident);
- time_ms: median of `repeats` timed forwards after warm-up (10 by default, 3 on CPU when a forward
  takes over a second).
The query/key projection is computed once (the official code runs it twice) and APNB's value path
pools before its projection (exact algebra), so the FLOP ratio at 2048×128×256 is above the
reference's 8.8.

JSON (`--json PATH`): {"device", "device_name", "dtype", "channels", "key_channels", "value_channels",
"anchor_sizes", "torch", "threads", "results": [{"size", "n", "nonlocal": {...}, "apnb": {...},
"ratios": {"flops", "memory", "time"}}]}, each block entry {"flops", "peak_mem_bytes", "time_ms",
"times_ms", "repeats"}; ratios are non-local / APNB.
"""

from __future__ import annotations

import json
import re
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from anncli.errors import UserError
from anncli.paths import write_result
from anncli.interop.flops import count_forward_flops
from anncli.models.attention import APNBAttention, NonLocalBlock
from anncli.data.sizes import parse_hw

KEY_CHANNELS = VALUE_CHANNELS = 256
ANCHOR_SIZES = (1, 3, 6, 8)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SLOW_CPU_SECONDS = 1.0


def make_block(name: str, channels: int) -> nn.Module:
    if name == "identity":
        return nn.Identity()
    if name == "apnb":
        return APNBAttention(channels, channels, KEY_CHANNELS, VALUE_CHANNELS, ANCHOR_SIZES)
    if name == "nonlocal":
        return NonLocalBlock(channels, channels, KEY_CHANNELS, VALUE_CHANNELS)
    raise ValueError(f"unknown block {name!r}")


def _prepare(name: str, channels: int, size: tuple[int, int], device: str, dtype: torch.dtype):
    torch.manual_seed(0)
    block = make_block(name, channels).to(device=device, dtype=dtype).eval()
    x = torch.randn(1, channels, *size, device=device, dtype=dtype)
    return block, x


def parse_sizes(text: str) -> list[tuple[int, int]]:
    """`96x96,128x256` → [(96, 96), (128, 256)]."""
    return [parse_hw(part, "--sizes", "128x256") for part in text.split(",")]


def count_flops(name: str, channels: int, size: tuple[int, int]) -> int:
    """FLOPs of one forward of the block on a 1xCxHxW feature map (built on the meta device)."""
    with torch.device("meta"):
        block = make_block(name, channels)
        x = torch.empty(1, channels, *size)
    return count_forward_flops(block, x)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_forwards(block: nn.Module, x: torch.Tensor, device: str, repeats: int | None) -> list[float]:
    """Seconds of each timed forward, after warm-up (three forwards, or one when a forward is slow)."""

    def forward_seconds() -> float:
        start = time.perf_counter()
        block(x)
        _sync(device)
        return time.perf_counter() - start

    with torch.no_grad():
        slow = forward_seconds() > SLOW_CPU_SECONDS
        if not slow:
            forward_seconds(), forward_seconds()
        if repeats is None:
            repeats = 3 if device == "cpu" and slow else 10
        return [forward_seconds() for _ in range(repeats)]


def cuda_peak_bytes(name: str, channels: int, size: tuple[int, int], dtype: torch.dtype) -> int:
    block, x = _prepare(name, channels, size, "cuda", dtype)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        block(x)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    del block, x
    torch.cuda.empty_cache()
    return peak


def _proc_status_bytes(key: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{key}:\s+(\d+) kB", text, re.M).group(1)) * 1024


def child_peak_rss(name: str, channels: int, size: tuple[int, int], dtype: str) -> None:
    """Runs in a child process: print how far one forward raises the RSS above its level before it.

    A tiny warm-up forward first initialises the kernels' one-time state; then the kernel's peak-RSS
    mark is reset (/proc/self/clear_refs) so that the import and set-up peaks do not count.
    """
    block, x = _prepare(name, channels, size, "cpu", DTYPES[dtype])
    with torch.no_grad():
        block(x[..., :8, :8].contiguous())
        Path("/proc/self/clear_refs").write_text("5")
        before = _proc_status_bytes("VmRSS")
        block(x)
    print(max(0, _proc_status_bytes("VmHWM") - before))


def cpu_peak_bytes(name: str, channels: int, size: tuple[int, int], dtype: str) -> int:
    code = f"from anncli.interop.bench import child_peak_rss; child_peak_rss({name!r}, {channels}, {tuple(size)!r}, {dtype!r})"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"memory measurement of {name} at {size} failed: {tail}")
    return int(done.stdout.strip().splitlines()[-1])


def time_block(name: str, channels: int, size, device: str, dtype: str, repeats: int | None) -> dict:
    block, x = _prepare(name, channels, size, device, DTYPES[dtype])
    times = time_forwards(block, x, device, repeats)
    return {"flops": count_flops(name, channels, size), "time_ms": 1e3 * statistics.median(times),
            "times_ms": [1e3 * t for t in times], "repeats": len(times)}


def peak_memory(jobs: list[tuple[str, tuple[int, int]]], channels: int, device: str, dtype: str) -> list[int]:
    """Peak bytes of each (block, size) job; CPU jobs run in child processes, two at a time."""
    if device == "cuda":
        base = {size: cuda_peak_bytes("identity", channels, size, DTYPES[dtype]) for _, size in jobs}
        return [max(0, cuda_peak_bytes(name, channels, size, DTYPES[dtype]) - base[size]) for name, size in jobs]
    with ThreadPoolExecutor(max_workers=2) as pool:
        return list(pool.map(lambda job: cpu_peak_bytes(job[0], channels, job[1], dtype), jobs))


def measure(sizes: list[tuple[int, int]], channels: int, device: str, dtype: str, repeats: int | None) -> list[dict]:
    results = []
    for size in sizes:
        entry = {"size": f"{size[0]}x{size[1]}", "n": size[0] * size[1]}
        for name in ("apnb", "nonlocal"):
            entry[name] = time_block(name, channels, size, device, dtype, repeats)
        results.append(entry)
    jobs = [(name, size) for size in sizes for name in ("apnb", "nonlocal")]
    for (name, size), peak in zip(jobs, peak_memory(jobs, channels, device, dtype)):
        results[sizes.index(size)][name]["peak_mem_bytes"] = peak
    for entry in results:
        nl, ap = entry["nonlocal"], entry["apnb"]
        entry["ratios"] = {label: (nl[key] / ap[key] if ap[key] else None)
                           for label, key in (("flops", "flops"), ("memory", "peak_mem_bytes"), ("time", "time_ms"))}
    return results


def _check_options(device: str, dtype: str) -> None:
    if device not in ("cpu", "cuda"):
        raise UserError(f"--device {device!r}: expected cpu or cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is visible to this process")
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")


def _pair(nl: float, ap: float, ratio: float | None, fmt: str) -> str:
    return f"{nl:{fmt}} / {ap:{fmt}}  ({'-' if ratio is None else f'{ratio:.1f}'}x)"


def _print_table(report: dict) -> None:
    table = Table(title=f"Non-local (NL) vs APNB attention: C={report['channels']}, {report['device_name']}, "
                        f"{report['dtype']}")
    for col in ("feature map", "GFLOPs NL / APNB", "peak MiB NL / APNB", "ms NL / APNB"):
        table.add_column(col, justify="right")
    for r in report["results"]:
        nl, ap, q = r["nonlocal"], r["apnb"], r["ratios"]
        table.add_row(r["size"], _pair(nl["flops"] / 1e9, ap["flops"] / 1e9, q["flops"], ".2f"),
                      _pair(nl["peak_mem_bytes"] / 2**20, ap["peak_mem_bytes"] / 2**20, q["memory"], ".1f"),
                      _pair(nl["time_ms"], ap["time_ms"], q["time"], ".1f"))
    Console().print(table)


def run_attention_bench(sizes: str, device: str, dtype: str, channels: int, repeats: int | None,
                        json_out: Path | None) -> dict:
    parsed = parse_sizes(sizes)
    _check_options(device, dtype)
    name = torch.cuda.get_device_name() if device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    report = {"device": device, "device_name": name, "dtype": dtype, "channels": channels,
              "key_channels": KEY_CHANNELS, "value_channels": VALUE_CHANNELS, "anchor_sizes": list(ANCHOR_SIZES),
              "torch": torch.__version__, "threads": torch.get_num_threads(),
              "results": measure(parsed, channels, device, dtype, repeats)}
    _print_table(report)
    if json_out is not None:
        write_result(json_out, json.dumps(report, indent=2) + "\n")
        Console().print(f"wrote {json_out}")
    return report
