"""The plan of a training run: the LR for this world size, its schedule, and the `--dry-run` summary."""

from __future__ import annotations

from anncli.recipe import Recipe, recipe_to_yaml


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


def describe_plan(recipe: Recipe, opts, plan) -> None:
    """Print the resolved recipe and what `ann train` would do with it (`opts`: train.TrainOptions)."""
    from anncli.checkpoint import default_work_dir
    from anncli.launch import visible_gpus

    t = recipe.train
    world = plan.world_size
    _, how = scaled_lr(recipe, world)
    deepspeed = f" (ZeRO stage {recipe.deepspeed.zero_stage})" if recipe.engine == "deepspeed" else ""
    rows = [
        ("launch", plan.kind),
        ("world size", f"{world} ({plan.nnodes} node(s) x {plan.nproc_per_node} process(es))"),
        (f"{'per-GPU' if visible_gpus() else 'per-process'} batch", f"{t.batch_size} x {t.accum_steps} accumulation step(s)"),
        ("effective batch", f"{t.batch_size * world * t.accum_steps} (recipe: {recipe.effective_batch})"),
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
