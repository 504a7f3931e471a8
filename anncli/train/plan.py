"""The plan of a training run: how a step's batch is split over this world, the LR for it, its schedule,
and the `--dry-run` summary."""

from __future__ import annotations

from typing import NamedTuple

from anncli.errors import UserError
from anncli.recipe import Recipe, recipe_to_yaml


class Split(NamedTuple):
    """Per-rank batch x world size x accumulation steps = the effective batch of every optimizer step."""
    batch_size: int
    accum_steps: int
    effective_batch: int
    why: str
    bn_note: str = ""  # on a resume that changes the images per batch-norm batch: what changed, how to keep it


def run_split(recipe: Recipe, world_size: int, saved=None) -> Split:
    """A fresh run splits as the recipe says; a resumed one (`saved`: checkpoint.SavedSplit) keeps its
    checkpoint's effective batch on this world (`order.choose_split`: the recipe's per-rank batch is the
    largest allowed), starting where the checkpoint's data stream stopped, or fails in one line."""
    from anncli.data.order import choose_split

    t = recipe.train
    if saved is None:
        e = t.batch_size * world_size * t.accum_steps
        return Split(t.batch_size, t.accum_steps, e,
                     f"{t.batch_size} x {world_size} ranks x {t.accum_steps} accumulation step(s) = {e}")
    try:
        b, a, why = choose_split(saved.effective_batch, world_size, t.batch_size, saved.next_sample)
    except ValueError as e:
        raise UserError(f"cannot resume on {world_size} rank(s): {e} (the checkpoint's effective batch "
                        f"{saved.effective_batch}); use a world size that divides it, or --resume never") from None
    return Split(b, a, saved.effective_batch, f"{why}, the checkpoint's effective batch",
                 _bn_note(recipe, saved, b, world_size))


def bn_images(recipe: Recipe, batch_size: int, world_size: int) -> int:
    """Images behind one batch-norm statistic: the global micro-batch with sync-BN, a rank's without."""
    return batch_size * world_size if recipe.model.norm == "syncbn" else batch_size


def _bn_note(recipe: Recipe, saved, batch_size: int, world_size: int) -> str:
    """'' when this split normalises over as many images as the checkpoint's run did; else one sentence."""
    if not saved.batch_size or not saved.world_size:
        return ""
    before, now = bn_images(recipe, saved.batch_size, saved.world_size), bn_images(recipe, batch_size, world_size)
    if before == now:
        return ""
    keep = before // world_size if recipe.model.norm == "syncbn" else before
    micro = keep * world_size
    fits = keep >= 1 and bn_images(recipe, keep, world_size) == before and \
        saved.effective_batch % micro == 0 and saved.next_sample % micro == 0
    how = f"set train.batch_size={keep} to keep {before}" if fits else f"{world_size} rank(s) cannot keep {before}"
    return (f"batch-norm statistics over {now} images per batch instead of the checkpoint's {before} "
            f"({recipe.model.norm}); {how}")


def scaled_lr(recipe: Recipe, world_size: int, effective: int | None = None) -> tuple[float, str]:
    """The base LR for this world (or for the effective batch `effective` of a resumed run), and a sentence
    saying how it was chosen."""
    t = recipe.train
    want = recipe.effective_batch
    have = effective or t.batch_size * world_size * t.accum_steps
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


def plan_split(recipe: Recipe, opts, plan):
    """(split, checkpoint to resume or None) of a launch plan, before any process starts: a world that
    cannot keep the checkpoint's effective batch, or continue its data stream, is refused here in one line
    (`opts`: train.TrainOptions). `--fresh` and `--init-from` start new runs: nothing is resumed."""
    from anncli.runs.checkpoint import default_work_dir, saved_split
    from anncli.runs.rundir import resolve_resume

    new_run = opts.fresh or (opts.init_from is not None and opts.resume == "auto")
    resume = None if new_run else resolve_resume(opts.resume, opts.work_dir or default_work_dir(recipe))
    return run_split(recipe, plan.world_size, saved_split(resume) if resume else None), resume


def describe_plan(recipe: Recipe, opts, plan) -> None:
    """Print the resolved recipe and what `ann train` would do with it (`opts`: train.TrainOptions)."""
    from anncli.runs.checkpoint import default_work_dir
    from anncli.cluster.launch import visible_gpus

    t = recipe.train
    world = plan.world_size
    split, resume = plan_split(recipe, opts, plan)
    _, how = scaled_lr(recipe, world, split.effective_batch)
    deepspeed = f" (ZeRO stage {recipe.deepspeed.zero_stage})" if recipe.engine == "deepspeed" else ""
    rows = [
        ("launch", plan.kind),
        ("world size", f"{world} ({plan.nnodes} node(s) x {plan.nproc_per_node} process(es))"),
        (f"{'per-GPU' if visible_gpus() else 'per-process'} batch", f"{split.batch_size} x {split.accum_steps} accumulation step(s)"),
        ("effective batch", f"{split.effective_batch} (recipe: {recipe.effective_batch})"),
        ("split", split.why + (f"; resuming {resume}" if resume else "")),
        *([("batch norm", split.bn_note)] if split.bn_note else []),
        ("learning rate", how),
        ("iterations", f"{t.iters} ({recipe.optim.name}, poly {recipe.optim.poly_power}, warm-up {recipe.optim.warmup_iters})"),
        ("engine", recipe.engine + deepspeed),
        ("work dir", str(opts.work_dir or default_work_dir(recipe))),
        *_plan_rows(plan.lines),
    ]
    print("\n".join([recipe_to_yaml(recipe).rstrip(), "---", *(f"{k + ':':<16} {v}".rstrip() for k, v in rows)]))


def _plan_rows(plan_lines: list[str]) -> list[tuple[str, str]]:
    """The launch plan's lines, each with its own label: where it runs, the command, its environment."""
    rows = []
    for i, line in enumerate(plan_lines):
        if line.startswith("environment: "):
            rows.append(("environment", line[len("environment: "):]))
        else:
            rows.append(("runs" if i == 0 else "command", line))
    return rows
