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


def run_split(recipe: Recipe, world_size: int, saved_effective: int | None = None) -> Split:
    """A fresh run splits as the recipe says; a resumed one keeps its checkpoint's effective batch on this
    world (`order.choose_split`: the recipe's per-rank batch is the largest allowed) or fails in one line."""
    from anncli.data.order import choose_split

    t = recipe.train
    if saved_effective is None:
        e = t.batch_size * world_size * t.accum_steps
        return Split(t.batch_size, t.accum_steps, e,
                     f"{t.batch_size} x {world_size} ranks x {t.accum_steps} accumulation step(s) = {e}")
    try:
        b, a, why = choose_split(saved_effective, world_size, t.batch_size)
    except ValueError as e:
        raise UserError(f"cannot resume on {world_size} rank(s): {e} (the checkpoint's effective batch); "
                        "use a world size that divides it, or --resume never") from None
    return Split(b, a, saved_effective, f"{why}, the checkpoint's effective batch")


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
    cannot keep the checkpoint's effective batch is refused here in one line (`opts`: train.TrainOptions)."""
    from anncli.runs.checkpoint import default_work_dir, resolve_resume, saved_effective_batch

    resume = resolve_resume(opts.resume, opts.work_dir or default_work_dir(recipe))
    return run_split(recipe, plan.world_size, saved_effective_batch(resume) if resume else None), resume


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
