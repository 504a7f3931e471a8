"""The training loop: iteration-based, exact resume, preemption-safe.

Everything that decides what the next step computes (weights, optimizer and scaler state, the step,
per-rank RNG and data-stream position) is saved in a checkpoint, so that a resumed run continues
bit for bit where an uninterrupted one would have been.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from anncli.errors import EXIT_PREEMPTED, UserError
from anncli.recipe import Recipe, recipe_to_yaml


@dataclass
class TrainOptions:
    recipe_path: str
    work_dir: Path | None = None
    resume: str = "auto"
    init_from: Path | None = None


# --- the plan ------------------------------------------------------------------------------------


def scaled_lr(recipe: Recipe, world_size: int) -> tuple[float, str]:
    """The base LR for this world, and a sentence saying how it was chosen."""
    t = recipe.train
    want = recipe.effective_batch
    have = t.batch_size * world_size * t.accum_steps
    if have == want:
        return recipe.optim.lr, f"{recipe.optim.lr:g} (the recipe's; effective batch matches)"
    if t.lr_scaling == "linear":
        lr = recipe.optim.lr * have / want
        return lr, f"{lr:g} (linear scaling {recipe.optim.lr:g} x {have}/{want}: effective batch differs from the recipe's)"
    return recipe.optim.lr, (
        f"{recipe.optim.lr:g} (NOT scaled although the effective batch is {have}, not the recipe's {want}; "
        "set train.lr_scaling=linear or match the world size)"
    )


def lr_at(step: int, base_lr: float, recipe: Recipe) -> float:
    """Poly decay over train.iters with an optional linear warm-up; a pure function of the step."""
    o = recipe.optim
    lr = (base_lr - o.min_lr) * (1 - step / recipe.train.iters) ** o.poly_power + o.min_lr
    if step < o.warmup_iters:
        lr *= (step + 1) / o.warmup_iters
    return lr


def describe_plan(recipe: Recipe, opts: TrainOptions, plan) -> None:
    from anncli.checkpoint import default_work_dir

    t = recipe.train
    world = plan.world_size
    _, how = scaled_lr(recipe, world)
    lines = [
        recipe_to_yaml(recipe).rstrip(),
        "---",
        f"launch:          {plan.kind}",
        f"world size:      {world} ({plan.nnodes} node(s) x {plan.nproc_per_node} process(es))",
        f"per-GPU batch:   {t.batch_size} x {t.accum_steps} accumulation step(s)",
        f"effective batch: {t.batch_size * world * t.accum_steps} (recipe: {recipe.effective_batch})",
        f"learning rate:   {how}",
        f"iterations:      {t.iters} ({recipe.optim.name}, poly {recipe.optim.poly_power}, warm-up {recipe.optim.warmup_iters})",
        f"engine:          {recipe.engine}" + (f" (ZeRO stage {recipe.deepspeed.zero_stage})" if recipe.engine == "deepspeed" else ""),
        f"work dir:        {opts.work_dir or default_work_dir(recipe)}",
    ]
    lines += [f"command:         {line}" for line in plan.lines]
    print("\n".join(lines))


# --- set-up ---------------------------------------------------------------------------------------


class StopFlag:
    """SIGTERM/SIGUSR1 only set a flag; ranks agree on it at the end of a step, then save and exit."""

    def __init__(self):
        self.signal = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame) -> None:
        self.signal = signum


def _prepare_data(recipe: Recipe, info) -> list[str]:
    from anncli.data.shards import resolve_urls
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


def _load_weights_only(model, path: Path, recipe: Recipe) -> None:
    from anncli.checkpoint import load_model_for_inference

    model.load_state_dict(load_model_for_inference(path, recipe))


# --- checkpoints ----------------------------------------------------------------------------------


def _save(run_dir: Path, step: int, recipe: Recipe, engine, stream, info, counters: dict) -> Path:
    from anncli import checkpoint as ck
    from anncli.distributed import barrier

    tmp = ck.staging_dir(run_dir, step)
    if info.is_main:
        ck.begin_save(run_dir, step)
    barrier()
    engine.save(tmp)
    ck.save_torch(ck.capture_rng(), ck.rank_file(tmp, "rng", info.rank, ".pt"))
    ck.save_json(stream.state_dict(), ck.rank_file(tmp, "data", info.rank, ".json"))
    if info.is_main:
        state = {
            "step": step,
            "recipe": recipe.name,
            "engine": recipe.engine,
            "model": recipe.model.model_dump(mode="json"),
            "world_size": info.world_size,
            "effective_batch": recipe.train.batch_size * info.world_size * recipe.train.accum_steps,
            **counters,
        }
        ck.save_json(state, tmp / "state.json")
        (tmp / "recipe.yaml").write_text(recipe_to_yaml(recipe))
    barrier()
    final = ck.checkpoints_dir(run_dir) / ck.step_dir_name(step)
    if info.is_main:
        final = ck.finish_save(run_dir, step, recipe.train.keep_last)
    barrier()
    return final


def _resume(path: Path, recipe: Recipe, engine, stream, info) -> dict:
    import json

    import torch

    from anncli import checkpoint as ck

    ck.check_compatible(path, recipe)
    state = ck.read_state(path)
    if state.get("engine", recipe.engine) != recipe.engine:
        raise UserError(f"checkpoint {path} was written by engine {state['engine']}, the recipe uses {recipe.engine}")
    if state["world_size"] != info.world_size:
        raise UserError(
            f"checkpoint {path} was written by {state['world_size']} ranks, this run has {info.world_size}: "
            "exact resume needs the same world size (use --init-from to start a new run from its weights)"
        )
    engine.load(path)
    stream.load_state_dict(json.loads(ck.rank_file(path, "data", info.rank, ".json").read_text()))
    state["rng"] = torch.load(ck.rank_file(path, "rng", info.rank, ".pt"), weights_only=True)
    return state


# --- the loop -------------------------------------------------------------------------------------


def run_training(recipe: Recipe, opts: TrainOptions) -> int:
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))
    import faulthandler

    from anncli.checkpoint import default_work_dir
    from anncli.distributed import init_distributed, rank_session

    faulthandler.enable()
    stop = StopFlag()
    info = init_distributed()
    with rank_session(info):  # a rank that raises stops every rank within seconds, never a barrier
        run_dir = Path(opts.work_dir or default_work_dir(recipe))
        return _train(recipe, opts, info, run_dir, stop)


def _train(recipe: Recipe, opts: TrainOptions, info, run_dir: Path, stop: StopFlag) -> int:
    import torch

    from anncli import checkpoint as ck
    from anncli.data.stream import TrainStream
    from anncli.distributed import any_rank, barrier, describe_rank, set_train_timeout
    from anncli.engine import build_engine
    from anncli.losses import SegLoss
    from anncli.report import EventLog, TensorBoard, TrainProgress

    t = recipe.train
    lock = None
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        lock = ck.lock_run_dir(run_dir, float(os.environ.get("ANN_LOCK_TIMEOUT", "300")))
        (run_dir / "recipe.yaml").write_text(recipe_to_yaml(recipe))
    barrier()  # every rank looks for the checkpoint to resume only once the run directory is ours
    resume_from = ck.resolve_resume(opts.resume, run_dir)
    if resume_from is not None and opts.init_from is not None:
        raise UserError(f"--init-from {opts.init_from} and resuming from {resume_from} exclude each other; pass --resume never")
    urls = _prepare_data(recipe, info)
    model = _build_model(recipe, info)
    if opts.init_from is not None and resume_from is None:
        _load_weights_only(model, ck.require_checkpoint(opts.init_from), recipe)
    engine = build_engine(model, recipe, info)
    criterion = SegLoss(recipe.loss, recipe.model.num_classes).to(info.device)
    stream = TrainStream(
        urls, augment=recipe.augment, batch_size=t.batch_size, seed=t.seed, rank=info.rank,
        world_size=info.world_size, num_workers=recipe.data.num_workers,
        shuffle_buffer=recipe.data.shuffle_buffer, max_skip_fraction=recipe.data.max_skip_fraction,
    )
    counters = {"bad_steps_total": 0}
    start = 0
    events = EventLog(run_dir / "events.jsonl" if info.is_main else None)
    print(f"[ann] {describe_rank(info)}; run directory {run_dir}", file=sys.stderr, flush=True)
    rng_state = None
    if resume_from is not None:
        state = _resume(resume_from, recipe, engine, stream, info)
        rng_state = state.pop("rng")
        start = state["step"]
        counters["bad_steps_total"] = state.get("bad_steps_total", 0)
        events.write("resume", step=start, checkpoint=str(resume_from), restart=os.environ.get("SLURM_RESTART_COUNT"))
        if info.is_main:
            print(f"[ann] resumed from {resume_from} at step {start}", file=sys.stderr, flush=True)
    else:
        events.write("start", step=0, world_size=info.world_size, recipe=recipe.name)
    tb = TensorBoard(run_dir / "tb" if (t.tensorboard and info.is_main) else None)
    base_lr, _ = scaled_lr(recipe, info.world_size)
    progress = TrainProgress(t.iters, start, enabled=info.is_main)
    model.train()
    batches = iter(stream)
    # Seed or restore only now: starting the data iterator may draw from the global RNG.
    if rng_state is not None:
        ck.restore_rng(rng_state)
    else:
        torch.manual_seed(t.seed + 1000 * info.rank)  # dropout differs per rank, reproducibly
    meter = _Meter()
    step = start
    try:
        while step < t.iters:
            lr = lr_at(step, base_lr, recipe)
            engine.set_lr(lr)
            stats = _train_step(engine, batches, criterion, recipe, info, step, meter, counters, events, progress,
                                run_dir)
            step += 1
            if step == start + 1:
                set_train_timeout()
            if step % t.log_every == 0 or step == t.iters:
                record = meter.record(stats, lr, engine.scale(), info.device)
                events.write("step", step=step, **record)
                tb.scalars(step, {f"train/{k}": v for k, v in record.items()})
                progress.update(step, {k: record[k] for k in ("loss", "lr", "img_per_s")}, log_line=True)
            else:
                progress.update(step, {"loss": float(stats[1]), "lr": lr}, log_line=False)
            preempted = any_rank(stop.signal is not None, info.device)
            if step % t.checkpoint_every == 0 or step == t.iters or preempted:
                path = _save(run_dir, step, recipe, engine, stream, info, counters)
                events.write("checkpoint", step=step, path=str(path))
            if t.val_every and step % t.val_every == 0 and not preempted:
                _validate(recipe, model, info, step, events, tb, progress)
                model.train()
            if preempted:
                progress.message(f"[ann] preempted at step {step}: checkpoint saved; exiting with {EXIT_PREEMPTED} to be requeued")
                events.write("preempted", step=step, signal=stop.signal)
                return EXIT_PREEMPTED
        events.write("done", step=step)
        return 0
    finally:
        progress.close()
        tb.close()
        events.close()
        if lock is not None:
            lock.close()


class _Meter:
    """Images seen since the last logged step, for img/s, and non-finite losses in a row."""

    def __init__(self):
        self.start, self.images, self.bad_in_row = time.perf_counter(), 0, 0

    def record(self, stats, lr: float, scale: float | None, device) -> dict:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        record = {"loss": float(stats[1]), "aux_loss": float(stats[2]), "total_loss": float(stats[0]), "lr": lr,
                  "img_per_s": self.images / elapsed, "mem_mb": _memory_mb(device)}
        if scale is not None:
            record["scale"] = scale
        self.start, self.images = time.perf_counter(), 0
        return record


def _train_step(engine, batches, criterion, recipe: Recipe, info, step: int, meter: _Meter, counters: dict,
                events, progress, run_dir: Path):
    """One optimizer step over `train.accum_steps` micro-batches with a finite loss; returns the last stats.

    A micro-batch whose loss is non-finite on any rank is skipped on every rank and counted;
    `train.max_bad_steps` of them in a row stop the run.
    """
    import torch

    from anncli.checkpoint import latest_checkpoint

    t = recipe.train
    good = 0
    while good < t.accum_steps:
        batch = next(batches)
        images = batch["image"].to(info.device, non_blocking=True)
        if recipe.model.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        labels = batch["label"].to(info.device, non_blocking=True)
        stats, finite = engine.micro_step(images, labels, criterion, boundary=good + 1 == t.accum_steps)
        meter.images += images.shape[0] * info.world_size
        if finite:
            good += 1
            meter.bad_in_row = 0
            continue
        counters["bad_steps_total"] += 1
        meter.bad_in_row += 1
        events.write("bad_step", step=step, loss=float(stats[0]))
        progress.message(f"[ann] step {step}: non-finite loss, step skipped ({meter.bad_in_row} in a row)")
        if meter.bad_in_row >= t.max_bad_steps:
            raise UserError(
                f"{meter.bad_in_row} non-finite losses in a row at step {step}; stopping. Last good checkpoint: "
                f"{latest_checkpoint(run_dir) or 'none'}. Lower optim.lr or use train.precision=fp32/bf16."
            )
    engine.optimizer_step()
    return stats


def _validate(recipe: Recipe, model, info, step: int, events, tb, progress) -> None:
    from anncli.evaluate import validate

    model.eval()
    metrics = validate(model, recipe, info)
    if info.is_main:
        events.write("val", step=step, mIoU=metrics["mIoU"], aAcc=metrics["aAcc"], mAcc=metrics["mAcc"])
        tb.scalars(step, {"val/mIoU": metrics["mIoU"], "val/aAcc": metrics["aAcc"]})
        progress.message(f"[ann] step {step}: val mIoU {metrics['mIoU'] * 100:.2f}")


def _memory_mb(device) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
