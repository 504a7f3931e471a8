"""Which run `ann eval` and `ann predict` mean when the user leaves the recipe or the checkpoint out.

- a checkpoint given: that one (it must be complete); its recipe is the one saved with it, unless given;
- a recipe given: the newest complete checkpoint of `--work-dir` (default runs/<recipe name>);
- `--work-dir` alone: its newest complete checkpoint and the recipe saved with it;
- nothing: the run directory under runs/ whose newest complete checkpoint was finished last. Two runs
  that finished at the same moment are ambiguous: the user has to name one.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import NamedTuple, Optional, Sequence

from anncli.errors import UserError
from anncli.recipe import Recipe, load_recipe
from anncli.runs.checkpoint import checkpoint_recipe, default_work_dir
from anncli.runs.integrity import MARKER
from anncli.runs.rundir import latest_checkpoint, require_checkpoint

RUNS_ROOT = Path("runs")


class Chosen(NamedTuple):
    recipe: Recipe
    recipe_path: Path
    checkpoint: Path


def newest_run(runs_root: Path = RUNS_ROOT) -> Path:
    """The newest complete checkpoint among the run directories under `runs_root` (by its COMPLETE marker)."""
    finished = []
    for run_dir in sorted(p for p in Path(runs_root).glob("*") if p.is_dir()):
        found = latest_checkpoint(run_dir)
        if found is not None:
            finished.append(((found / MARKER).stat().st_mtime_ns, found))
    if not finished:
        raise UserError(f"no recipe given and no run directory under {runs_root}/ holds a complete checkpoint; "
                        "pass a recipe or --checkpoint DIR")
    finished.sort(key=lambda item: item[0])
    newest = [path for mtime, path in finished if mtime == finished[-1][0]]
    if len(newest) > 1:
        names = " and ".join(str(p) for p in newest)
        raise UserError(f"no recipe given and the newest checkpoints under {runs_root}/ tie ({names} finished at "
                        "the same time); pass --checkpoint DIR")
    return newest[0]


def choose_run(recipe: Optional[Path], checkpoint: Optional[Path], work_dir: Optional[Path],
               overrides: Sequence[str] = (), runs_root: Path = RUNS_ROOT) -> Chosen:
    """The recipe (overrides applied) and the complete checkpoint a command means; says what it chose."""
    guessed = None
    if checkpoint is not None:
        checkpoint = require_checkpoint(Path(checkpoint))
    elif recipe is not None:
        run_dir = Path(work_dir) if work_dir else default_work_dir(load_recipe(recipe, list(overrides)))
        checkpoint = latest_checkpoint(run_dir)
        if checkpoint is None:
            raise UserError(f"no complete checkpoint under {run_dir}/checkpoints; pass --checkpoint PATH")
        guessed = f"the newest complete one of {run_dir}"
    elif work_dir is not None:
        checkpoint = latest_checkpoint(Path(work_dir))
        if checkpoint is None:
            raise UserError(f"no complete checkpoint under {work_dir}/checkpoints; pass --checkpoint PATH")
        guessed = f"the newest complete one of {work_dir}"
    else:
        checkpoint = newest_run(runs_root)
        guessed = f"the newest complete checkpoint under {runs_root}/"
    recipe_path = Path(recipe) if recipe is not None else checkpoint_recipe(checkpoint)
    if os.environ.get("RANK", "0") == "0" and (guessed or recipe is None):
        why = f" ({guessed})" if guessed else ""
        source = "" if recipe is not None else f", recipe {recipe_path}"
        print(f"[ann] checkpoint {checkpoint}{why}{source}", file=sys.stderr, flush=True)
    return Chosen(load_recipe(recipe_path, list(overrides)), recipe_path, checkpoint)
