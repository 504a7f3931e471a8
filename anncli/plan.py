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
