"""A run's weights as local files before its model is built: `model.pretrained` and `--init-from` given as
URLs or names (anncli/interop/sources.py) are fetched into the cache and replaced by its paths.

A launcher does it before it starts its ranks (`check_then_fetch`, the launch preflight), so that the
node's download is done once, before any rank reads it; each rank then resolves the same names to the
cached files (`train`). Ranks started some other way (torchrun by hand, a Kubernetes pod each) meet at
the cache's file lock: one downloads, the others wait and read it.
"""

from __future__ import annotations

import dataclasses
import os
import sys

from anncli.recipe import Recipe


def with_local_weights(recipe: Recipe, opts):
    """(recipe, opts) with model.pretrained a local file and opts.init_from a local checkpoint directory
    (`opts`: loop.TrainOptions)."""
    from anncli.interop.sources import checkpoint_dir, is_remote, weights_file

    source = recipe.model.pretrained
    if is_remote(source):
        path = weights_file(source)
        _say(f"model.pretrained {source}: {path}")
        recipe = recipe.model_copy(update={"model": recipe.model.model_copy(update={"pretrained": str(path)})})
    if opts.init_from is not None:
        path = checkpoint_dir(str(opts.init_from), recipe)  # a local directory: as it is
        if is_remote(str(opts.init_from)):
            _say(f"--init-from {opts.init_from}: {path}")
        opts = dataclasses.replace(opts, init_from=path)
    return recipe, opts


def _say(line: str) -> None:
    if os.environ.get("RANK", "0") == "0":
        print(f"[ann] {line}", file=sys.stderr, flush=True)


def train(recipe: Recipe, opts):
    """Run the training (in this process or as a rank) once its weights are local files."""
    from anncli.train.loop import run_training

    return run_training(*with_local_weights(recipe, opts))


def check_then_fetch(recipe: Recipe, opts, plan) -> None:
    """The launch preflight: refuse a world that cannot continue the run, then fetch the weights, before any
    rank starts."""
    from anncli.train.plan import plan_split

    plan_split(recipe, opts, plan)
    with_local_weights(recipe, opts)
