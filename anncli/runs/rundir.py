"""Run-directory housekeeping: the checkpoint layout, where a run starts from (moving superseded
checkpoints aside, never deleting them), which launch a restarted worker belongs to, and which recipe
changes a resume may accept. The run lock is locks.lock_run_dir.

Paths only: what is inside a checkpoint is checkpoint.py's business.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

from anncli.errors import UserError
from anncli.paths import write_text_whole
from anncli.runs.integrity import MARKER, DamagedCheckpoint, verify

# Recipe keys whose change keeps a resume meaningful: bookkeeping, evaluation, where the data lies, the
# worker count (workers read the world-free global order, data/global_stream.py), and the batch split: a
# resume keeps the checkpoint's effective batch (plan.run_split; load refuses another), so the per-rank
# batch only caps the split, unless train.lr_scaling=linear scales the LR by it. Other keys change what
# the next steps compute: refused without --allow-recipe-change. Keys the schema dropped are harmless.
# `train.iters` stretches the poly LR schedule from the resumed step on (the usual way to train longer).
RESUME_SAFE_KEYS = (
    "name", "train.iters", "train.checkpoint_every", "train.keep_last", "train.val_every", "train.log_every",
    "train.max_bad_steps", "train.tensorboard", "train.trace_samples", "train.batch_size", "train.accum_steps",
    "data.root", "data.val", "data.num_workers", "data.max_skip_fraction", "data.max_member_mb",
    "data.max_pixels", "data.retries", "model.pretrained", "eval.", "logging.",
    # how the same maths runs (memory layout, compiled or not, algorithm choice): float rounding only
    "model.channels_last", "model.compile", "model.compile_backend", "train.deterministic",
)
LAUNCH_FILE = ".launch"
TRACKERS_FILE = "trackers.json"  # the W&B / MLflow run ids of this run (train/trackers/)


def superseded_dir(run_dir: Path) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    path, n = Path(run_dir) / f"superseded-{stamp}", 1
    while path.exists():
        path, n = Path(run_dir) / f"superseded-{stamp}-{n}", n + 1
    return path


def move_aside(run_dir: Path, paths: list[Path], why: str) -> Path | None:
    """Move `paths` (checkpoints, events.jsonl, …) into <run>/superseded-<UTC time>/, keeping their layout."""
    paths = [Path(p) for p in paths if Path(p).exists()]
    if not paths:
        return None
    dest = superseded_dir(run_dir)
    for p in paths:
        target = dest / p.relative_to(run_dir)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(p), str(target))
    print(f"[ann] {why}: moved {', '.join(str(p.relative_to(run_dir)) for p in paths)} aside into {dest}",
          file=sys.stderr, flush=True)
    return dest


# --- layout, and where a run starts from -------------------------------------------------------

STEP_PREFIX = "step-"


def checkpoints_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def checkpoint_path(run_dir: Path, step: int) -> Path:
    return checkpoints_dir(run_dir) / f"{STEP_PREFIX}{step:06d}"


def is_complete(path: Path) -> bool:
    return (Path(path) / MARKER).is_file()


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith(STEP_PREFIX) and _marked(p)]
    return sorted(found, key=lambda p: int(p.name[len(STEP_PREFIX) :]))


def _marked(path: Path) -> bool:
    try:
        return is_complete(path)
    except OSError:  # a step directory this user cannot enter is none of its run's checkpoints
        return False


def latest_checkpoint(run_dir: Path) -> Path | None:
    done = complete_checkpoints(run_dir)
    return done[-1] if done else None


def _step_of(path: Path) -> int:
    return int(Path(path).name[len(STEP_PREFIX) :])


def newest_verified(run_dir: Path) -> Path | None:
    """The newest complete checkpoint whose files match their checksums; damaged ones are named and skipped."""
    done = complete_checkpoints(run_dir)
    damaged = []
    for path in reversed(done):
        try:
            verify(path)
            return path
        except DamagedCheckpoint as e:
            damaged.append(str(e))
            print(f"[ann] warning: {e}; trying an older checkpoint", file=sys.stderr, flush=True)
    if damaged:
        raise UserError(f"every checkpoint under {checkpoints_dir(run_dir)} is damaged ({damaged[0]}); "
                        "pass --fresh to start over or --resume PATH")
    return None


def resolve_resume(resume: str, run_dir: Path) -> Path | None:
    """`auto` → newest verified checkpoint or None; `never` → None; otherwise a verified checkpoint path."""
    if resume == "never":
        return None
    if resume == "auto":
        return newest_verified(run_dir)
    return require_checkpoint(Path(resume))


def require_checkpoint(path: Path) -> Path:
    """A complete checkpoint whose files match their checksums, or one line saying what is wrong."""
    path = Path(path)
    if path.is_file():
        raise UserError(f"checkpoint {path}: is a file; a checkpoint is its directory, e.g. {path.parent}")
    if not path.is_dir():
        raise UserError(f"checkpoint {path}: no such directory")
    if not is_complete(path) and (path / "checkpoints").is_dir():
        newest = latest_checkpoint(path)
        hint = f" (its newest complete one: {newest})" if newest else " (it holds no complete checkpoint yet)"
        raise UserError(f"checkpoint {path}: is a run directory; give one of its checkpoints{hint}")
    if not is_complete(path):
        raise UserError(f"checkpoint {path}: incomplete (no {MARKER} marker); it was interrupted while saving")
    verify(path)
    return path


def check_start_flags(resume: str, fresh: bool = False, init_from: bool = False) -> None:
    """`--fresh` and `--init-from` start a new run: either with `--resume PATH` is refused, never ignored."""
    if resume in ("auto", "never"):
        return
    if fresh:
        raise UserError("--fresh starts a new run at step 0; it excludes --resume PATH")
    if init_from:
        raise UserError(f"--init-from loads weights into a new run at step 0; it excludes --resume {resume} "
                        "(resume that checkpoint without --init-from, or start from its weights without --resume)")


def decide_start(run_dir: Path, resume: str, fresh: bool = False, init_from: bool = False) -> Path | None:
    """Rank 0: the checkpoint this launch continues from (None: step 0).

    `--resume never` never mixes two runs in one directory: with checkpoints there it is refused, and
    `--fresh` moves them (and events.jsonl) aside. `--resume PATH` to an older point moves nothing yet:
    once the checkpoint is loaded and accepted, `supersede_newer` moves the newer ones aside, so that a
    later `--resume auto` (a requeue) does not jump back to them, and a refused resume leaves the run as
    it was. A restarted worker of a launch that already did this continues from the run's newest checkpoint."""
    if is_continuation(run_dir):
        found = newest_verified(run_dir)
        if found is not None or resume in ("auto", "never"):
            return found
    check_start_flags(resume, fresh, init_from)
    done = complete_checkpoints(run_dir)
    if fresh or resume == "never" or (init_from and resume == "auto"):
        if done and not fresh:
            how = "--init-from" if init_from and resume == "auto" else "--resume never"
            raise UserError(f"{run_dir} already holds checkpoints (newest {done[-1]}); {how} would mix two runs "
                            f"in it. Pass another --work-dir, or --fresh to move them and events.jsonl aside "
                            f"into {run_dir}/superseded-<time>/")
        move_aside(run_dir, [checkpoints_dir(run_dir), *(Path(run_dir) / n for n in ("events.jsonl", "tb", TRACKERS_FILE))],
                   "--fresh")
        record_launch(run_dir)
        return None
    if resume == "auto":
        return newest_verified(run_dir)
    return require_checkpoint(Path(resume))


def supersede_newer(run_dir: Path, path: Path) -> None:
    """After a `--resume PATH` was accepted: move the run's checkpoints at or after PATH's step aside."""
    newer = [p for p in complete_checkpoints(run_dir)
             if _step_of(p) >= _step_of(path) and p.resolve() != Path(path).resolve()]
    move_aside(run_dir, newer, f"resuming from the older {path}")
    record_launch(run_dir)


# --- restarts of one launch -------------------------------------------------------------------------


def _launch_key() -> str | None:
    """What stays the same across torchrun restarts and SLURM requeues of one launch, if anything."""
    parts = [os.environ.get("SLURM_JOB_ID", ""), os.environ.get("TORCHELASTIC_RUN_ID", "")]
    return ":".join(parts) if any(parts) else None


def _restarted() -> bool:
    return any(int(os.environ.get(v, "0") or 0) > 0 for v in ("TORCHELASTIC_RESTART_COUNT", "SLURM_RESTART_COUNT"))


def is_continuation(run_dir: Path) -> bool:
    """True in a restarted or requeued worker whose launch already applied its start decision here
    (--fresh, --resume never/PATH, --init-from): it continues from the run's newest checkpoint instead."""
    key, record = _launch_key(), Path(run_dir) / LAUNCH_FILE
    return bool(key and _restarted() and record.is_file() and record.read_text().strip() == key)


def record_launch(run_dir: Path) -> None:
    key = _launch_key()
    if key:
        write_text_whole(Path(run_dir) / LAUNCH_FILE, key + "\n")


# --- recipe changes at resume ---------------------------------------------------------------------


def flatten(tree, prefix: str = "") -> dict:
    if not isinstance(tree, dict):
        return {prefix[:-1]: tree}
    return {k: v for key, sub in tree.items() for k, v in flatten(sub, f"{prefix}{key}.").items()}


def recipe_changes(saved_yaml: str, current_yaml: str) -> tuple[list[str], list[str]]:
    """(harmless, breaking) differences between a checkpoint's recipe and the current one, as
    'key: old -> new' lines."""
    import yaml

    old, new = flatten(yaml.safe_load(saved_yaml) or {}), flatten(yaml.safe_load(current_yaml) or {})
    same_lr = new.get("train.lr_scaling") != "linear" or _effective_batch(old) == _effective_batch(new)
    harmless, breaking = [], []
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            line = f"{key}: {old.get(key)!r} -> {new.get(key)!r}"
            safe = any(key == s or (s.endswith(".") and key.startswith(s)) for s in RESUME_SAFE_KEYS)
            if key in ("train.batch_size", "train.accum_steps") and not same_lr:
                safe, line = False, f"{line} (the linearly scaled LR changes)"
            elif _removed(new, key):
                safe, line = True, f"{key}: {old[key]!r} (no longer a recipe key)"
            (harmless if safe else breaking).append(line)
    return harmless, breaking


def _effective_batch(flat: dict) -> int:
    b, w, a = (flat.get(f"train.{k}") or 0 for k in ("batch_size", "world_size", "accum_steps"))
    return b * w * a


def _removed(flat: dict, key: str) -> bool:
    """Not in the full dump `flat`, neither under a section now null nor a leaf that became a section."""
    parts = key.split(".")
    return (key not in flat and not any(".".join(parts[:n]) in flat for n in range(1, len(parts)))
            and not any(k.startswith(key + ".") for k in flat))


def check_recipe_change(path: Path, saved_yaml: str, current_yaml: str, allow: bool, announce: bool) -> None:
    """Print what changed since the checkpoint; refuse changes that break exact resume unless allowed."""
    harmless, breaking = recipe_changes(saved_yaml, current_yaml)
    if breaking and not allow:
        raise UserError(f"the recipe differs from checkpoint {path}'s in a way that breaks exact resume: "
                        f"{'; '.join(breaking)}. Pass --allow-recipe-change if that is intended, or --fresh "
                        "/ another --work-dir to start a new run")
    if announce and (harmless or breaking):
        listed = "; ".join(harmless + [f"{b} (allowed by --allow-recipe-change)" for b in breaking])
        print(f"[ann] the recipe differs from checkpoint {path}'s: {listed}", file=sys.stderr, flush=True)
