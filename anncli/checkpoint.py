"""The run directory: layout, atomic checkpoints, resume, retention.

    runs/<name>/recipe.yaml  events.jsonl  tb/
    runs/<name>/checkpoints/step-000400/{model.pt, optim.pt, state.json, recipe.yaml,
                                         rng-rank00000.pt, data-rank00000.json, …, COMPLETE}

A checkpoint is written into a temporary sibling directory, every file is fsynced, the directory is
renamed into place, and the COMPLETE marker is written last. Only directories with the marker count,
so a process killed during a write leaves the previous checkpoint in use.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from anncli.errors import UserError
from anncli.recipe import Recipe

COMPLETE = "COMPLETE"
STEP_PREFIX = "step-"
# Model settings that do not change the weights' meaning, so a checkpoint may be loaded across them.
_MODEL_KEYS_IGNORED = {"norm", "pretrained", "channels_last"}


def default_work_dir(recipe: Recipe) -> Path:
    return Path("runs") / recipe.name


def checkpoints_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def step_dir_name(step: int) -> str:
    return f"{STEP_PREFIX}{step:06d}"


def is_complete(path: Path) -> bool:
    return (Path(path) / COMPLETE).is_file()


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith(STEP_PREFIX) and is_complete(p)]
    return sorted(found, key=lambda p: int(p.name[len(STEP_PREFIX) :]))


def latest_checkpoint(run_dir: Path) -> Path | None:
    done = complete_checkpoints(run_dir)
    return done[-1] if done else None


def resolve_resume(resume: str, run_dir: Path) -> Path | None:
    """`auto` → newest complete checkpoint or None; `never` → None; otherwise a checkpoint path."""
    if resume == "never":
        return None
    if resume == "auto":
        return latest_checkpoint(run_dir)
    return require_checkpoint(Path(resume))


def require_checkpoint(path: Path) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"checkpoint {path}: no such directory")
    if not is_complete(path):
        raise UserError(f"checkpoint {path}: incomplete (no {COMPLETE} marker); it was interrupted while saving")
    return path


def read_state(path: Path) -> dict:
    return json.loads((Path(path) / "state.json").read_text())


def checkpoint_recipe(path: Path) -> Path:
    recipe = require_checkpoint(path) / "recipe.yaml"
    if not recipe.is_file():
        raise UserError(f"checkpoint {path}: has no recipe.yaml; pass --recipe")
    return recipe


def _model_signature(model_section: dict) -> dict:
    return {k: v for k, v in model_section.items() if k not in _MODEL_KEYS_IGNORED}


def check_compatible(path: Path, recipe: Recipe) -> None:
    """One line saying what differs when the checkpoint's model is not the recipe's."""
    saved = _model_signature(read_state(path).get("model", {}))
    wanted = _model_signature(recipe.model.model_dump(mode="json"))
    diffs = [f"model.{k}={saved.get(k)!r} (recipe: {wanted.get(k)!r})" for k in wanted if saved.get(k) != wanted.get(k)]
    if diffs:
        raise UserError(f"checkpoint {path} was trained with a different model: " + ", ".join(diffs))


def load_model_for_inference(path: Path, recipe: Recipe) -> dict:
    path = require_checkpoint(path)
    check_compatible(path, recipe)
    return torch.load(path / "model.pt", map_location="cpu", weights_only=True)


# --- writing ---------------------------------------------------------------------------------------


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_torch(obj, path: Path) -> None:
    torch.save(obj, path)
    _fsync_path(path)


def save_json(obj, path: Path) -> None:
    path.write_text(json.dumps(obj, indent=1, sort_keys=True))
    _fsync_path(path)


def staging_dir(run_dir: Path, step: int) -> Path:
    return checkpoints_dir(run_dir) / f".tmp-{step_dir_name(step)}"


def begin_save(run_dir: Path, step: int) -> Path:
    """Rank 0: a fresh, empty staging directory for this step."""
    tmp = staging_dir(run_dir, step)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def finish_save(run_dir: Path, step: int, keep_last: int) -> Path:
    """Rank 0, after every rank wrote its files: fsync, rename into place, mark COMPLETE, prune."""
    tmp = staging_dir(run_dir, step)
    for f in tmp.rglob("*"):
        if f.is_file():
            _fsync_path(f)
    final = checkpoints_dir(run_dir) / step_dir_name(step)
    if final.exists():  # an incomplete leftover of an earlier, killed save of this step
        shutil.rmtree(final)
    os.replace(tmp, final)
    (final / COMPLETE).write_text(f"{step}\n")
    _fsync_path(final / COMPLETE)
    _fsync_path(final)
    _fsync_path(final.parent)
    prune(run_dir, keep_last)
    return final


def prune(run_dir: Path, keep_last: int) -> None:
    """Keep the newest `keep_last` complete checkpoints; drop older ones and stale staging dirs."""
    done = complete_checkpoints(run_dir)
    for old in done[: max(0, len(done) - keep_last)]:
        shutil.rmtree(old, ignore_errors=True)
    for p in checkpoints_dir(run_dir).iterdir():
        incomplete = p.name.startswith(STEP_PREFIX) and not is_complete(p)
        if p.name.startswith(".tmp-") or incomplete:
            shutil.rmtree(p, ignore_errors=True)


def rank_file(directory: Path, stem: str, rank: int, suffix: str) -> Path:
    return Path(directory) / f"{stem}-rank{rank:05d}{suffix}"


def capture_rng() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --- one run per directory --------------------------------------------------------------------------


_HELD_LOCKS: list = []  # open lock files of this process, released in every forked child


def _release_locks_in_child() -> None:
    """In a forked child (a DataLoader worker): point the inherited lock descriptors at /dev/null.

    flock belongs to the open file: a child that kept its copy of the descriptor would hold the run
    lock after its rank died, and the restarted rank would wait for it. dup2 closes the child's copy
    while the descriptor number stays valid, so nothing in the child can close an unrelated file.
    """
    for handle in list(_HELD_LOCKS):
        try:
            null = os.open(os.devnull, os.O_RDONLY)
            os.dup2(null, handle.fileno())
            os.close(null)
        except (OSError, ValueError):
            pass
    _HELD_LOCKS.clear()


os.register_at_fork(after_in_child=_release_locks_in_child)


def lock_run_dir(run_dir: Path, timeout_s: float):
    """Hold `<run>/.lock` for this process's lifetime, so that two trainings never share a run directory.

    A run that was just killed may still be saving (its workers got SIGTERM); wait for it up to
    `timeout_s`, then fail with a line naming the holder. The kernel drops the lock when the holder dies;
    forked children do not keep it (see _release_locks_in_child).
    """
    import fcntl
    import time

    path = Path(run_dir) / ".lock"
    handle = open(path, "a+")
    deadline = time.monotonic() + timeout_s
    announced = False
    while True:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            holder = path.read_text().strip() or "another process"
            if time.monotonic() >= deadline:
                handle.close()
                raise UserError(f"run directory {run_dir} is in use by {holder}; wait for it to finish or "
                                "pass another --work-dir") from None
            if not announced:
                print(f"[ann] run directory {run_dir} is in use by {holder}; waiting up to {timeout_s:.0f} s",
                      flush=True)
                announced = True
            time.sleep(0.5)
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {os.uname().nodename}\n")
    handle.flush()
    _HELD_LOCKS.append(handle)
    return handle
