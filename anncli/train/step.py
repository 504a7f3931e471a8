"""One optimizer step of the training loop, and the one host read of the steps since the last log step.

`train_step` runs the split's micro-batches through the engine and leaves every result on the device;
`read_back` reads the results of several steps at once (a log or checkpoint step), counts the skipped
ones (`train.max_bad_steps` in a row stop the run) and writes the log step's `step` event.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

from anncli.errors import UserError
from anncli.train.trackers.history import train_series

class StepResult(NamedTuple):
    """One optimizer step, on the device until a log step reads it: `losses`, one row per micro-batch of
    (total, loss, aux) as means over ranks; `finite`, per micro-batch; `applied`, whether the step changed
    the weights (a non-finite micro-batch or gradient skips it whole)."""
    losses: Any
    finite: Any
    applied: Any
    images: int  # over all ranks, skipped micro-batches included
    indices: list  # this rank's global sample indices and keys in the step (for the sample trace)
    keys: list

    def row(self):
        """(applied, finite..., losses...) as one flat tensor: the read-back stacks one per step."""
        import torch

        return torch.cat([self.applied.float().reshape(1), self.finite.float(), self.losses.flatten()])


class StepLosses(NamedTuple):
    """What a log step reads back: the losses of the step's last kept micro-batch."""
    total: float
    loss: float
    aux: float


def read_back(run, unread: list) -> None:
    """One host read of the flags of every step since the last read: skipped steps are counted and reported
    (`train.max_bad_steps` in a row stop the run), and a log step gets its `step` event."""
    import torch

    if not unread:
        return
    t = run.recipe.train
    rows = torch.stack([r.row() for _, _, r in unread]).tolist()
    for (step, lr, result), row in zip(unread, rows):
        micro = result.losses.shape[0]
        applied, finite, losses = row[0], row[1:1 + micro], row[1 + micro:]
        if applied:
            run.bad_in_row, run.last = 0, StepLosses(*losses[-3:])
        else:
            run.bad_steps_total += 1
            run.bad_in_row += 1
            bad = [i for i, ok in enumerate(finite) if not ok]
            cause = f"non-finite loss in micro-batch {bad[0] + 1} of {micro}" if bad else "non-finite gradients"
            run.events.write("bad_step", step=step, loss=losses[3 * bad[0]] if bad else losses[-3], cause=cause)
            run.progress.message(f"[ann] step {step}: {cause}, step skipped ({run.bad_in_row} in a row)")
            if run.bad_in_row >= t.max_bad_steps:
                raise UserError(
                    f"{run.bad_in_row} skipped steps in a row at step {step} ({cause}); stopping. Last good "
                    f"checkpoint: {run.checkpointer.latest() or 'none'}. Lower optim.lr or use train.precision=fp32/bf16."
                )
        if step % t.log_every == 0 or step == t.iters:
            _log(run, step, result, lr)


def train_step(run, step: int) -> StepResult:
    """One optimizer step over the split's accumulation steps; nothing in it reads the device.

    A step with a non-finite loss, batch-norm statistic or gradient on any rank is skipped on every rank
    (train.skip: it changes no weight, optimizer state or batch-norm buffer); `_read_back` counts it. `loss.normalize: global` divides by the pixel count of the step's micro-batches, read ahead.
    """
    import torch

    from anncli.data.transforms import normalize_batch
    from anncli.models.tuning import use_channels_last

    t, info, accum, a = run.recipe.train, run.info, run.stream.accum_steps, run.recipe.augment
    torch.manual_seed(step_seed(t.seed, step, info.rank))  # dropout: a function of (seed, step, rank)
    batches = [next(run.batches) for _ in range(accum)]
    criterion = run.criterion
    if run.recipe.loss.normalize == "global":
        denominator = run.criterion.global_denominator([b["label"] for b in batches], info.world_size, info.device)
        criterion = functools.partial(run.criterion, denominator=denominator)
    images, losses, finite, indices, keys = 0, [], [], [], []
    for i, batch in enumerate(batches):  # labels were checked by the data stream
        # uint8 crops travel to the device; normalising there moves a quarter of the bytes.
        x = normalize_batch(batch["image"].to(info.device, non_blocking=True), a.mean, a.std, a.bgr,
                            use_channels_last(run.recipe.model.channels_last, info.device))
        y = batch["label"].to(info.device, non_blocking=True).long()
        stats, ok = run.engine.micro_step(x, y, criterion, boundary=i + 1 == accum)
        losses.append(stats)
        finite.append(ok)
        images += x.shape[0] * info.world_size
        indices += batch["indices"]
        keys += batch["keys"]
    applied = run.engine.optimizer_step()
    return StepResult(losses=torch.stack(losses), finite=torch.stack(finite), applied=applied, images=images,
                      indices=indices, keys=keys)


def step_seed(seed: int, step: int, rank: int) -> int:
    """The torch RNG seed of one rank's optimizer step: nothing of it needs saving, on any world size."""
    import numpy as np

    state = int(np.random.SeedSequence([seed & (2**63 - 1), step, rank]).generate_state(1, np.uint64)[0])
    return state >> 1  # shifted as a Python int: numpy 1.x refuses uint64 >> int


def _log(run, step: int, result: StepResult, lr: float) -> None:
    """The `step` event of a log step, from the losses `_read_back` read."""
    t = run.recipe.train
    record = run.meter.record(run.last, lr, run.engine.scale(), run.info.device)
    record["samples_skipped"] = run.stream.samples_skipped  # this rank's unreadable samples so far
    if t.trace_samples:  # collective: every rank logs the same steps
        from anncli.data.order import gather_samples_sha256

        record["samples_sha256"] = gather_samples_sha256(result.indices, result.keys)
    run.events.write("step", step=step, **record)
    series = train_series(record)
    run.tb.scalars(step, series)
    run.trackers.scalars(step, series)
    run.progress.update(step, {k: record[k] for k in ("loss", "lr", "img_per_s")}, log_line=True)
