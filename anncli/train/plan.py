"""The plan of a training run: how a step's batch is split over this world (and over every world of an
elastic node range), the LR for it, its schedule, and the `--dry-run` summary."""

from __future__ import annotations

import math
import os
from typing import NamedTuple

from anncli.cluster.command import elastic_world_size
from anncli.errors import UserError
from anncli.recipe import Recipe, recipe_to_yaml


class Split(NamedTuple):
    """Per-rank batch x world size x accumulation steps = the effective batch of every optimizer step."""
    batch_size: int
    accum_steps: int
    effective_batch: int
    why: str
    bn_note: str = ""  # on a resume that changes the images per batch-norm batch: what changed, how to keep it


def run_split(recipe: Recipe, world_size: int, saved=None, planned_world: int | None = None) -> Split:
    """A fresh run splits as the recipe says on `planned_world` ranks (default: this world, or in a worker of
    an elastic node range the range's largest world, ANN_ELASTIC_WORLD_SIZE) and keeps that effective batch
    on this world; a resumed one (`saved`: checkpoint.SavedSplit) keeps its checkpoint's effective batch on
    this world, starting where the checkpoint's data stream stopped. Both use `order.choose_split` (the
    recipe's per-rank batch is the largest allowed) and fail in one line."""
    from anncli.data.order import choose_split

    t = recipe.train
    if saved is None:
        return _fresh_split(recipe, world_size, planned_world or elastic_world_size(os.environ) or world_size)
    try:
        b, a, why = choose_split(saved.effective_batch, world_size, t.batch_size, saved.next_sample)
    except ValueError as e:
        raise UserError(f"cannot resume on {world_size} rank(s): {e} (the checkpoint's effective batch "
                        f"{saved.effective_batch}); use a world size that divides it, or start a new run: "
                        "--fresh, or another --work-dir") from None
    return Split(b, a, saved.effective_batch, f"{why}, the checkpoint's effective batch",
                 _bn_note(recipe, saved, b, world_size))


def _fresh_split(recipe: Recipe, world_size: int, planned_world: int) -> Split:
    from anncli.data.order import choose_split

    t = recipe.train
    e = t.batch_size * planned_world * t.accum_steps
    if planned_world == world_size:
        return Split(t.batch_size, t.accum_steps, e,
                     f"{t.batch_size} x {world_size} ranks x {t.accum_steps} accumulation step(s) = {e}")
    whose = f"the effective batch of the node range's largest world ({planned_world} ranks)"
    try:
        b, a, why = choose_split(e, world_size, t.batch_size)
    except ValueError as err:
        raise UserError(f"cannot start on {world_size} rank(s): {err} ({whose})") from None
    return Split(b, a, e, f"{why}, {whose}")


def range_splits(recipe: Recipe, plan, saved=None) -> dict[int, Split]:
    """{nodes: split} for every number of nodes of an elastic launch plan (cluster.command.LaunchPlan), all
    keeping one effective batch; a range in which some size cannot is refused in one line naming those that can."""
    splits, refused = {}, []
    for n in plan.node_counts():
        try:
            splits[n] = run_split(recipe, n * plan.nproc_per_node, saved, planned_world=plan.world_size)
        except UserError:
            refused.append(n)
    if refused:
        raise UserError(_range_refusal(recipe, plan, saved, list(splits), refused))
    return splits


def _range_refusal(recipe: Recipe, plan, saved, can: list[int], cannot: list[int]) -> str:
    t, p = recipe.train, plan.nproc_per_node
    if saved is not None:
        batch = f"{saved.effective_batch}, the checkpoint's effective batch"
        fix = "start a new run (--fresh, or another --work-dir)"
    else:
        # n nodes split b x largest x P x A when n divides b x largest x A: the smallest A for every n
        lcm = math.lcm(*plan.node_counts())
        accum = lcm // math.gcd(lcm, t.batch_size * plan.nnodes)
        batch = (f"{t.batch_size * plan.world_size * t.accum_steps}, the effective batch of its largest world "
                 f"({plan.world_size} ranks)")
        fix = (f"set train.accum_steps={accum} (effective batch {t.batch_size * plan.world_size * accum}, which "
               "every size splits)")
    good = f"the sizes that can: {_either(can)} node(s) ({_either(can, p)} ranks)" if can else "no size in it can"
    return (f"{plan.nnodes_source or 'the node range'} ({plan.nodes_text()} x {p} process(es)) cannot keep one "
            f"effective batch: {_either(cannot, p)} ranks ({_either(cannot)} node(s)) cannot split {batch}; {good}. "
            f"Use a range of those sizes (or min == max), or {fix}")


def _either(node_counts: list[int], per_node: int = 1) -> str:
    """'2 or 4' (nodes), or with `per_node` the ranks of those nodes."""
    return " or ".join(str(n * per_node) for n in node_counts)


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
    saved = saved_split(resume) if resume else None
    if plan.elastic:
        range_splits(recipe, plan, saved)
    return run_split(recipe, plan.world_size, saved, planned_world=plan.world_size), resume


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
        *(_range_rows(recipe, plan, resume) if plan.elastic else []),
        (f"{'per-GPU' if visible_gpus() else 'per-process'} batch", f"{split.batch_size} x {split.accum_steps} accumulation step(s)"),
        ("effective batch", f"{split.effective_batch} (recipe: {recipe.effective_batch})"),
        ("split", split.why + (f"; resuming {resume}" if resume else "")),
        *([("batch norm", split.bn_note)] if split.bn_note else []),
        ("learning rate", how),
        ("iterations", f"{t.iters} ({recipe.optim.name}, poly {recipe.optim.poly_power}, warm-up {recipe.optim.warmup_iters})"),
        ("engine", recipe.engine + deepspeed),
        ("work dir", str(opts.work_dir or default_work_dir(recipe))),
        *[("weights", line) for line in _weights_lines(recipe, opts)],
        *_plan_rows(plan.lines),
    ]
    print("\n".join([recipe_to_yaml(recipe).rstrip(), "---", *(f"{k + ':':<16} {v}".rstrip() for k, v in rows)]))


def _range_rows(recipe: Recipe, plan, resume) -> list[tuple[str, str]]:
    """What the plan of an elastic node range assumes, and the split at every size of it."""
    from anncli.runs.checkpoint import saved_split

    splits = range_splits(recipe, plan, saved_split(resume) if resume else None)
    p = plan.nproc_per_node
    effective = next(iter(splits.values())).effective_batch
    assumed = (f"{plan.nnodes_source}: the job may start, and restart, on {plan.nodes_text()}; the plan assumes "
               f"the largest, {plan.nnodes} node(s) ({plan.world_size} ranks), and keeps the effective batch "
               f"{effective} at every size")
    per_size = "; ".join(f"{n} node(s): {s.batch_size} x {n * p} ranks x {s.accum_steps} accumulation step(s)"
                         for n, s in splits.items())
    return [("node range", assumed), ("at each size", per_size)]


def _weights_lines(recipe: Recipe, opts) -> list[str]:
    """What the run will fetch, or found in the weights cache, for model.pretrained and --init-from."""
    from anncli.interop.sources import is_remote, plan_line

    sources = [("model.pretrained", recipe.model.pretrained), ("--init-from", opts.init_from)]
    return [plan_line(what, str(source)) for what, source in sources if is_remote(str(source or ""))]


def _plan_rows(plan_lines: list[str]) -> list[tuple[str, str]]:
    """The launch plan's lines, each with its own label: where it runs, the command, its environment."""
    rows = []
    for i, line in enumerate(plan_lines):
        if line.startswith("environment: "):
            rows.append(("environment", line[len("environment: "):]))
        else:
            rows.append(("runs" if i == 0 else "command", line))
    return rows
