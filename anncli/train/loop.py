"""The training loop: iteration-based, exact resume, preemption-safe, elastic.

Everything that decides what the next step computes (weights, optimizer and scaler state, the step, the
data position in the world-size-free global sample order) is saved in a checkpoint, and the dropout RNG is
reseeded every step from (seed, step, rank), so a resumed run continues bit for bit where an uninterrupted
one would have been. On another world size it keeps the effective batch (plan.run_split) and the samples
of every step; only float sums change. `_set_up` builds a run once; `_loop` runs it.
"""

from __future__ import annotations

import faulthandler
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from anncli.errors import EXIT_PREEMPTED
from anncli.train.plan import bn_images, lr_at, run_split, scaled_lr
from anncli.train.step import StepLosses, read_back, train_step
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
    trackers: Any
    progress: Any
    meter: Any
    stop: StopFlag
    base_lr: float
    start: int
    bad_steps_total: int
    bad_in_row: int = 0
    last: StepLosses = StepLosses(float("nan"), float("nan"), float("nan"))

    def close(self, status: str = "FAILED") -> None:
        self.progress.close()
        self.tb.close()
        self.events.close()
        self.checkpointer.close()  # the run lock: released before the trackers' bounded wait
        self.trackers.close(status)


def run_training(recipe: Recipe, opts: TrainOptions) -> int:
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))
    from anncli.cluster.distributed import init_distributed, rank_session
    from anncli.models.tuning import configure_algorithms

    faulthandler.enable()
    if recipe.model.compile:
        from anncli.train.engine import compile_backend

        compile_backend(recipe)  # a misspelt backend fails before any work
    stop = StopFlag()
    info = init_distributed()
    configure_algorithms(info.device, recipe.train.deterministic)  # fixed crops: the shapes repeat
    with rank_session(info):  # a rank that raises stops every rank within seconds, never a barrier
        run = _set_up(recipe, opts, info, stop)
        status = "FAILED"
        try:
            code = _loop(run)
            status = "FINISHED" if code == 0 else "KILLED"
            return code
        finally:
            run.close(status)


# --- the loop -------------------------------------------------------------------------------------


def _loop(run: _Run) -> int:
    """Until train.iters: next batches → step → log → checkpoint → validate → stop if preempted.

    Nothing in a step waits for the device: the losses stay there until a log or checkpoint step reads
    every step since the last one at once (`step.read_back`), and the stop flag is agreed asynchronously
    (cluster.stop.StopVote: one step late, on every rank at the same step)."""
    from anncli.cluster.distributed import set_train_timeout
    from anncli.cluster.stop import StopVote

    t = run.recipe.train
    step = run.start
    vote = StopVote(run.info.device)
    unread: list = []  # (step, lr, step.StepResult) not yet read back
    try:
        while step < t.iters:
            lr = lr_at(step, run.base_lr, run.recipe)
            run.engine.set_lr(lr)
            result = train_step(run, step)
            step += 1
            if step == run.start + 1:
                set_train_timeout()
            run.meter.images += result.images
            unread.append((step, lr, result))
            preempted = vote.agreed(run.stop.signum is not None)
            validating = bool(t.val_every) and step % t.val_every == 0
            if validating and not preempted:  # a signal is honoured before a validation that could outlast its lead
                preempted = vote.now(run.stop.signum is not None)
            save = step % t.checkpoint_every == 0 or step == t.iters or preempted
            if save or step % t.log_every == 0:
                read_back(run, unread)
                unread = []
            else:
                run.progress.update(step, {"loss": run.last.loss, "lr": lr}, log_line=False)
            if save:
                path = run.checkpointer.save(step, run.engine, run.stream, bad_steps_total=run.bad_steps_total)
                run.events.write("checkpoint", step=step, path=str(path))
            if validating and not preempted:
                _validate(run, step)
            if preempted:
                run.progress.message(f"[ann] preempted at step {step}: checkpoint saved; exiting with {EXIT_PREEMPTED} to be requeued")
                run.events.write("preempted", step=step, signal=run.stop.signum)
                return EXIT_PREEMPTED
    finally:
        vote.close()
    run.events.write("done", step=step)
    run.trackers.finish(step)
    return 0


def _validate(run: _Run, step: int) -> None:
    from anncli.eval.evaluate import validate
    from anncli.eval.metrics import json_safe
    from anncli.eval.report import val_scalars

    model = run.engine.module
    model.eval()
    metrics = validate(model, run.recipe, run.info)
    if run.info.is_main:
        run.events.write("val", step=step, mIoU=metrics["mIoU"], aAcc=metrics["aAcc"], mAcc=metrics["mAcc"],
                         IoU={row["name"]: json_safe(row["IoU"]) for row in metrics["per_class"]})
        series = val_scalars(metrics)
        run.tb.scalars(step, series)
        run.trackers.scalars(step, series)
        run.trackers.validation(step, {"recipe": run.recipe.name, "step": step, "split": run.recipe.data.val, **metrics})
        run.progress.message(f"[ann] step {step}: val mIoU {metrics['mIoU'] * 100:.2f}")
    model.train()


# --- set-up ---------------------------------------------------------------------------------------


def _set_up(recipe: Recipe, opts: TrainOptions, info, stop: StopFlag) -> _Run:
    """Open the run directory, build model, engine, data and logs, resume: everything the loop uses."""
    from anncli.runs.checkpoint import Checkpointer, default_work_dir, saved_split
    from anncli.cluster.distributed import describe_rank
    from anncli.train.engine import build_engine
    from anncli.train.losses import SegLoss
    from anncli.eval.report import EventLog, StepMeter, TensorBoard, TrainProgress
    from anncli.train.trackers import Trackers

    t = recipe.train
    checkpointer = Checkpointer(opts.work_dir or default_work_dir(recipe), recipe, info)
    checkpointer.open()
    resume_from = checkpointer.find(opts.resume, fresh=opts.fresh, init_from=opts.init_from is not None)
    split = run_split(recipe, info.world_size, saved_split(resume_from) if resume_from else None)
    urls, counts = _prepare_data(recipe, info)
    model = _build_model(recipe, info)
    if opts.init_from is not None and resume_from is None:  # a restarted worker resumes instead
        from anncli.interop.weights import init_from
        init_from(model, opts.init_from, recipe, opts.init_skip)
    engine = build_engine(model, recipe, info, split)
    criterion = SegLoss(recipe.loss, recipe.model.num_classes, check=False).to(info.device)  # the data stream checks the labels
    stream = _build_stream(recipe, urls, counts, info, split)
    events = EventLog(checkpointer.run_dir / "events.jsonl" if info.is_main else None)
    print(f"[ann] {describe_rank(info)}; run directory {checkpointer.run_dir}; batch split {split.why}",
          file=sys.stderr, flush=True)
    resumed = None
    if resume_from is not None:
        resumed = checkpointer.load(resume_from, engine, stream, allow_recipe_change=opts.allow_recipe_change)
        events.write("resume", step=resumed.step, checkpoint=str(resume_from), restart=os.environ.get("SLURM_RESTART_COUNT"),
                     world_size=info.world_size, saved_world_size=resumed.world_size, batch_size=split.batch_size,
                     accum_steps=split.accum_steps, effective_batch=split.effective_batch,
                     bn_images=bn_images(recipe, split.batch_size, info.world_size), bn_note=split.bn_note)
        if info.is_main:
            change = "" if resumed.world_size == info.world_size else f" (written by {resumed.world_size} ranks; {split.why})"
            change += f"; {split.bn_note}" if split.bn_note else ""
            print(f"[ann] resumed from {resume_from} at step {resumed.step}{change}", file=sys.stderr, flush=True)
    else:
        events.write("start", step=0, world_size=info.world_size, recipe=recipe.name, batch_size=split.batch_size,
                     accum_steps=split.accum_steps, effective_batch=split.effective_batch)
    tb = TensorBoard(checkpointer.run_dir / "tb" if (t.tensorboard and info.is_main) else None,
                     purge_step=(resumed.step if resumed else 0) + 1)
    trackers = Trackers(recipe, checkpointer.run_dir, enabled=info.is_main)
    start = resumed.step if resumed else 0
    progress = TrainProgress(t.iters, start, enabled=info.is_main)
    model.train()
    return _Run(recipe=recipe, info=info, engine=engine, stream=stream, batches=iter(stream), criterion=criterion,
                checkpointer=checkpointer, events=events, tb=tb, trackers=trackers, progress=progress, meter=StepMeter(), stop=stop,
                base_lr=scaled_lr(recipe, info.world_size, split.effective_batch)[0], start=start,
                bad_steps_total=resumed.bad_steps_total if resumed else 0)


def _prepare_data(recipe: Recipe, info) -> tuple[list[str], list[int]]:
    from anncli.data.counts import shard_counts
    from anncli.data.manifest import resolve_urls
    from anncli.data.synth import prepare_synth

    prepare_synth(recipe.data, info.is_main)
    urls = resolve_urls(recipe.data.root, recipe.data.dataset, recipe.data.train)
    return urls, shard_counts(urls, recipe.data.root, announce=info.is_main)


def _build_model(recipe: Recipe, info):
    import torch

    from anncli.cluster.distributed import convert_sync_batchnorm
    from anncli.models.ann import build_model
    from anncli.models.tuning import use_channels_last

    torch.manual_seed(recipe.train.seed)  # the same initial weights on every rank and every run
    model = build_model(recipe.model)
    if recipe.model.norm == "syncbn" and info.distributed:
        model = convert_sync_batchnorm(model, info.device)
    model = model.to(info.device)
    # DeepSpeed broadcasts and flattens parameters as plain contiguous buffers, which channels_last
    # weights are not; under it only the inputs go channels_last.
    if use_channels_last(recipe.model.channels_last, info.device) and recipe.engine != "deepspeed":
        model = model.to(memory_format=torch.channels_last)
    return model


def _build_stream(recipe: Recipe, urls: list[str], counts: list[int], info, split):
    from anncli.data.global_stream import GlobalStream
    from anncli.data.shards import Limits

    d = recipe.data
    return GlobalStream(urls, counts, augment=recipe.augment, batch_size=split.batch_size,
                        effective_batch=split.effective_batch, seed=recipe.train.seed, rank=info.rank,
                        world_size=info.world_size, num_workers=d.num_workers, lanes=d.lanes,
                        max_skip_fraction=d.max_skip_fraction, pin_memory=info.device.type == "cuda",
                        limits=Limits.of(d), num_classes=recipe.model.num_classes,
                        retries=d.retries)
