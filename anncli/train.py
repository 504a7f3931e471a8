"""The training loop: iteration-based, exact resume, preemption-safe.

Everything that decides what the next step computes (weights, optimizer and scaler state, the step,
per-rank RNG and data-stream position) is saved in a checkpoint, so that a resumed run continues
bit for bit where an uninterrupted one would have been. `_set_up` builds a run once; `_loop` runs it.
"""

from __future__ import annotations

import faulthandler
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, NamedTuple

from anncli.errors import EXIT_PREEMPTED, UserError
from anncli.plan import lr_at, scaled_lr
from anncli.recipe import Recipe


@dataclass
class TrainOptions:
    recipe_path: str
    work_dir: Path | None = None
    resume: str = "auto"
    init_from: Path | None = None
    init_skip: tuple[str, ...] = ()
    fresh: bool = False  # move the run's checkpoints and events.jsonl aside and start at step 0
    allow_recipe_change: bool = False  # resume across recipe changes that break exact resume


class StopFlag:
    """SIGTERM/SIGUSR1 only set a flag; ranks agree on it at the end of a step, then save and exit."""

    def __init__(self):
        self.signum = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame) -> None:
        self.signum = signum


class StepResult(NamedTuple):
    """One optimizer step: the losses of its last micro-batch (means over ranks) and what it consumed."""
    total: float
    loss: float
    aux: float
    images: int  # over all ranks, skipped micro-batches included
    skipped: int  # micro-batches skipped for a non-finite loss


class _Meter:
    """Images seen since the last logged step, for img/s."""

    def __init__(self):
        self.start, self.images = time.perf_counter(), 0

    def record(self, result: StepResult, lr: float, scale: float | None, device) -> dict:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        record = {"loss": result.loss, "aux_loss": result.aux, "total_loss": result.total, "lr": lr,
                  "img_per_s": self.images / elapsed, "mem_mb": _memory_mb(device)}
        if scale is not None:
            record["scale"] = scale
        self.start, self.images = time.perf_counter(), 0
        return record


@dataclass
class _Run:
    """Everything the loop works with, built once by `_set_up`."""
    recipe: Recipe
    info: Any
    engine: Any
    stream: Any
    batches: Iterator[dict]
    criterion: Any
    checkpointer: Any
    events: Any
    tb: Any
    progress: Any
    meter: _Meter
    stop: StopFlag
    base_lr: float
    start: int
    bad_steps_total: int

    def close(self) -> None:
        self.progress.close()
        self.tb.close()
        self.events.close()
        self.checkpointer.close()


def run_training(recipe: Recipe, opts: TrainOptions) -> int:
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))
    from anncli.distributed import init_distributed, teardown

    faulthandler.enable()
    stop = StopFlag()
    info = init_distributed()
    try:
        run = _set_up(recipe, opts, info, stop)
        try:
            return _loop(run)
        finally:
            run.close()
    finally:
        teardown()


# --- the loop -------------------------------------------------------------------------------------


def _loop(run: _Run) -> int:
    """Until train.iters: next batches → step → log → checkpoint → validate → stop if preempted."""
    from anncli.distributed import any_rank, set_train_timeout

    t = run.recipe.train
    step = run.start
    while step < t.iters:
        lr = lr_at(step, run.base_lr, run.recipe)
        run.engine.set_lr(lr)
        result = _train_step(run, step)
        run.bad_steps_total += result.skipped
        step += 1
        if step == run.start + 1:
            set_train_timeout()
        _log(run, step, result, lr)
        preempted = any_rank(run.stop.signum is not None, run.info.device)
        if step % t.checkpoint_every == 0 or step == t.iters or preempted:
            path = run.checkpointer.save(step, run.engine, run.stream, bad_steps_total=run.bad_steps_total)
            run.events.write("checkpoint", step=step, path=str(path))
        if t.val_every and step % t.val_every == 0 and not preempted:
            _validate(run, step)
        if preempted:
            run.progress.message(f"[ann] preempted at step {step}: checkpoint saved; exiting with {EXIT_PREEMPTED} to be requeued")
            run.events.write("preempted", step=step, signal=run.stop.signum)
            return EXIT_PREEMPTED
    run.events.write("done", step=step)
    return 0


def _train_step(run: _Run, step: int) -> StepResult:
    """One optimizer step over `train.accum_steps` micro-batches with a finite loss.

    A micro-batch whose loss is non-finite on any rank is skipped on every rank and counted;
    `train.max_bad_steps` of them in a row stop the run.
    """
    from anncli.data.transforms import normalize_batch

    t, info, a = run.recipe.train, run.info, run.recipe.augment
    good = images = skipped = bad_in_row = 0
    while good < t.accum_steps:
        batch = next(run.batches)
        # uint8 crops travel to the device; normalising there moves a quarter of the bytes.
        x = normalize_batch(batch["image"].to(info.device, non_blocking=True), a.mean, a.std, a.bgr,
                            run.recipe.model.channels_last)
        y = batch["label"].to(info.device, non_blocking=True).long()
        stats, finite = run.engine.micro_step(x, y, run.criterion, boundary=good + 1 == t.accum_steps)
        images += x.shape[0] * info.world_size
        if finite:
            good, bad_in_row = good + 1, 0
            continue
        skipped, bad_in_row = skipped + 1, bad_in_row + 1
        run.events.write("bad_step", step=step, loss=float(stats[0]))
        run.progress.message(f"[ann] step {step}: non-finite loss, step skipped ({bad_in_row} in a row)")
        if bad_in_row >= t.max_bad_steps:
            raise UserError(
                f"{bad_in_row} non-finite losses in a row at step {step}; stopping. Last good checkpoint: "
                f"{run.checkpointer.latest() or 'none'}. Lower optim.lr or use train.precision=fp32/bf16."
            )
    run.engine.optimizer_step()
    total, loss, aux = stats.tolist()
    return StepResult(total=total, loss=loss, aux=aux, images=images, skipped=skipped)


def _log(run: _Run, step: int, result: StepResult, lr: float) -> None:
    t = run.recipe.train
    run.meter.images += result.images
    if step % t.log_every == 0 or step == t.iters:
        record = run.meter.record(result, lr, run.engine.scale(), run.info.device)
        run.events.write("step", step=step, **record)
        run.tb.scalars(step, {f"train/{k}": v for k, v in record.items()})
        run.progress.update(step, {k: record[k] for k in ("loss", "lr", "img_per_s")}, log_line=True)
    else:
        run.progress.update(step, {"loss": result.loss, "lr": lr}, log_line=False)


def _validate(run: _Run, step: int) -> None:
    from anncli.evaluate import validate

    model = run.engine.module
    model.eval()
    metrics = validate(model, run.recipe, run.info)
    if run.info.is_main:
        run.events.write("val", step=step, mIoU=metrics["mIoU"], aAcc=metrics["aAcc"], mAcc=metrics["mAcc"])
        run.tb.scalars(step, {"val/mIoU": metrics["mIoU"], "val/aAcc": metrics["aAcc"]})
        run.progress.message(f"[ann] step {step}: val mIoU {metrics['mIoU'] * 100:.2f}")
    model.train()


def _memory_mb(device) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --- set-up ---------------------------------------------------------------------------------------


def _set_up(recipe: Recipe, opts: TrainOptions, info, stop: StopFlag) -> _Run:
    """Open the run directory, build model, engine, data and logs, resume or seed: everything the loop uses."""
    import torch

    from anncli.checkpoint import Checkpointer, default_work_dir, restore_rng
    from anncli.distributed import describe_rank
    from anncli.engine import build_engine
    from anncli.losses import SegLoss
    from anncli.report import EventLog, TensorBoard, TrainProgress

    t = recipe.train
    checkpointer = Checkpointer(opts.work_dir or default_work_dir(recipe), recipe, info)
    checkpointer.open()
    resume_from = checkpointer.find(opts.resume, fresh=opts.fresh, init_from=opts.init_from is not None)
    urls = _prepare_data(recipe, info)
    model = _build_model(recipe, info)
    if opts.init_from is not None and resume_from is None:  # a restarted worker resumes instead
        from anncli.weights import init_from
        init_from(model, opts.init_from, recipe, opts.init_skip)
    engine = build_engine(model, recipe, info)
    criterion = SegLoss(recipe.loss, recipe.model.num_classes).to(info.device)
    stream = _build_stream(recipe, urls, info)
    events = EventLog(checkpointer.run_dir / "events.jsonl" if info.is_main else None)
    print(f"[ann] {describe_rank(info)}; run directory {checkpointer.run_dir}", file=sys.stderr, flush=True)
    resumed = None
    if resume_from is not None:
        resumed = checkpointer.load(resume_from, engine, stream, allow_recipe_change=opts.allow_recipe_change)
        events.write("resume", step=resumed.step, checkpoint=str(resume_from), restart=os.environ.get("SLURM_RESTART_COUNT"))
        if info.is_main:
            print(f"[ann] resumed from {resume_from} at step {resumed.step}", file=sys.stderr, flush=True)
    else:
        events.write("start", step=0, world_size=info.world_size, recipe=recipe.name)
    tb = TensorBoard(checkpointer.run_dir / "tb" if (t.tensorboard and info.is_main) else None)
    start = resumed.step if resumed else 0
    progress = TrainProgress(t.iters, start, enabled=info.is_main)
    model.train()
    batches = iter(stream)
    # Seed or restore only now: starting the data iterator may draw from the global RNG.
    if resumed is not None:
        restore_rng(resumed.rng)
    else:
        torch.manual_seed(t.seed + 1000 * info.rank)  # dropout differs per rank, reproducibly
    return _Run(recipe=recipe, info=info, engine=engine, stream=stream, batches=batches, criterion=criterion,
                checkpointer=checkpointer, events=events, tb=tb, progress=progress, meter=_Meter(), stop=stop,
                base_lr=scaled_lr(recipe, info.world_size)[0], start=start,
                bad_steps_total=resumed.bad_steps_total if resumed else 0)


def _prepare_data(recipe: Recipe, info) -> list[str]:
    from anncli.data.manifest import resolve_urls
    from anncli.data.synth import prepare_synth

    prepare_synth(recipe.data, info.is_main)
    return resolve_urls(recipe.data.root, recipe.data.dataset, recipe.data.train)


def _build_model(recipe: Recipe, info):
    import torch

    from anncli.distributed import convert_sync_batchnorm
    from anncli.models.ann import build_model

    torch.manual_seed(recipe.train.seed)  # the same initial weights on every rank and every run
    model = build_model(recipe.model)
    if recipe.model.norm == "syncbn" and info.distributed:
        model = convert_sync_batchnorm(model, info.device)
    model = model.to(info.device)
    # DeepSpeed broadcasts and flattens parameters as plain contiguous buffers, which channels_last
    # weights are not; under it only the inputs go channels_last.
    if recipe.model.channels_last and recipe.engine != "deepspeed":
        model = model.to(memory_format=torch.channels_last)
    return model


def _build_stream(recipe: Recipe, urls: list[str], info):
    from anncli.data.stream import TrainStream

    t = recipe.train
    return TrainStream(
        urls, augment=recipe.augment, batch_size=t.batch_size, seed=t.seed, rank=info.rank,
        world_size=info.world_size, num_workers=recipe.data.num_workers,
        shuffle_buffer=recipe.data.shuffle_buffer, max_skip_fraction=recipe.data.max_skip_fraction,
        pin_memory=info.device.type == "cuda",
    )
