"""What both training benchmarks measure with: the training step built directly (model + DDPEngine + SegLoss
on device tensors, with its FLOPs per image) and the summary of a run's `step` events.

train_throughput.py (the CPU settings, the GPU part) and train_cli.py (`--cli`: `ann train` beside the
model-only step) import it; neither imports the other's measurements.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path


def summarize_steps(records: list[dict], warmup: int) -> dict:
    """Median img/s over the records after the first `warmup`, and the peak memory over all of them."""
    steady = records[warmup:]
    out = {"records": len(records), "records_used": len(steady),
           "last_step": records[-1]["step"] if records else 0,
           "peak_mem_mb_rank0": round(max((r["mem_mb"] for r in records), default=0.0), 1)}
    if steady:
        rates = [r["img_per_s"] for r in steady]
        out.update(img_per_s_median=round(statistics.median(rates), 3),
                   img_per_s_min=round(min(rates), 3), img_per_s_max=round(max(rates), 3))
    else:
        out["img_per_s_median"] = None
    return out


def read_steps(events: Path) -> list[dict]:
    if not events.is_file():
        return []
    rows = [json.loads(line) for line in events.read_text().splitlines() if line.strip()]
    return [r for r in rows if r.get("event") == "step"]


def bench_recipe(backbone: str, num_classes: int, precision: str, channels_last: bool, batch: int):
    from anncli.recipe import ModelConfig, Recipe, TrainConfig

    return Recipe(name="bench", model=ModelConfig(backbone=backbone, num_classes=num_classes, channels_last=channels_last,
                                                  norm="bn"),
                  train=TrainConfig(precision=precision, batch_size=batch, world_size=1))


def model_flops_per_image(model_cfg, crop: tuple[int, int]) -> float:
    """FLOPs of the network's forward + backward for one image (torch's counter: 2 per multiply-add).

    Counted on the meta device, so it costs no compute and does not depend on the device or precision;
    the loss is left out (a plain sum of the logits starts the backward pass).
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from anncli.models.ann import build_model

    with torch.device("meta"):
        model = build_model(model_cfg).train()
        images = torch.empty(1, 3, *crop)
    counter = FlopCounterMode(display=False)
    with counter:
        main, aux = model(images)
        (main.sum() + (aux.sum() if aux is not None else 0)).backward()
    return float(counter.get_total_flops())


def measure_training(backbone: str, num_classes: int, crop: tuple[int, int], batch: int, precision: str,
                     channels_last: bool, steps: int, warmup: int, device, recipe=None) -> dict:
    """img/s, peak memory and FLOPs/image of the training step (DDPEngine, one process) on random tensors.
    `recipe`: a whole recipe to take the network, loss and optimizer from (train_cli.py), else bench_recipe."""
    import torch

    from anncli.cluster.distributed import DistInfo
    from anncli.train.engine import DDPEngine
    from anncli.train.losses import SegLoss
    from anncli.models.ann import build_model

    recipe = recipe or bench_recipe(backbone, num_classes, precision, channels_last, batch)
    torch.manual_seed(0)
    model = build_model(recipe.model).to(device).train()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    engine = DDPEngine(model, recipe, DistInfo(rank=0, world_size=1, local_rank=0, device=device))
    criterion = SegLoss(recipe.loss, num_classes, check=False).to(device)  # as in the loop: labels checked on the host
    images = torch.randn(batch, 3, *crop, device=device).contiguous(memory_format=fmt)
    labels = torch.randint(0, num_classes, (batch, *crop), device=device)
    flops = model_flops_per_image(recipe.model, crop)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for i in range(warmup + steps):
        if i == warmup:
            sync()
            start = time.perf_counter()
        engine.micro_step(images, labels, criterion, boundary=True)
        engine.optimizer_step()
    sync()
    seconds = time.perf_counter() - start
    out = {"precision": precision, "channels_last": channels_last, "batch": batch, "crop": list(crop),
           "steps_timed": steps, "seconds_timed": seconds, "s_per_step": round(seconds / steps, 4),
           "img_per_s": round(batch * steps / seconds, 3), "flops_per_image": flops,
           "achieved_tflops": round(flops * batch * steps / seconds / 1e12, 6)}
    if device.type == "cuda":
        out["peak_mem_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return out
