"""Which checkpoints a run keeps, and reading one without it being deleted underneath.

`prune` keeps the newest `train.keep_last` checkpoints that verify, and always the one just written; a
damaged one is moved aside into `superseded-<time>/` (never counted, never deleted), one that cannot be
read (EACCES, EIO) is left where it is, uncounted, with one warning, and one that a reader holds is kept
until a later prune. Nothing an older checkpoint does stops the run whose new checkpoint is complete. Readers (`ann eval`, `ann predict`, `--init-from`, `load_model`) hold
`<checkpoint>/.readers` shared for as long as they read (`reading`); prune takes it exclusive without
waiting, renames the checkpoint out of sight and deletes it (locks.py: flock, or O_EXCL files on NFS).
"""

from __future__ import annotations

import shutil
import sys
from contextlib import contextmanager
from pathlib import Path

from anncli.errors import UserError
from anncli.runs import locks
from anncli.runs.integrity import READERS, DamagedCheckpoint, verify
from anncli.runs.rundir import STEP_PREFIX, checkpoints_dir, complete_checkpoints, is_complete, move_aside

_READ_WAIT_S = 0.05


_unreadable_said: set[str] = set()


def prune(run_dir: Path, keep_last: int, written: Path | None = None) -> None:
    """Keep the newest `keep_last` verified checkpoints and `written` (hashed just now); move damaged ones
    aside; leave unreadable ones; delete the rest unless being read; drop stale staging dirs."""
    kept = 0
    for path in reversed(complete_checkpoints(run_dir)):
        if written is not None and path == Path(written):
            kept += 1
            continue
        try:
            kept += _keep_or_delete(run_dir, path, keep=kept < keep_last)
        except (OSError, UserError) as e:  # not DamagedCheckpoint: _keep_or_delete handles that
            _say_unreadable(path, e)
    remove_staging(run_dir)


def _keep_or_delete(run_dir: Path, path: Path, keep: bool) -> int:
    """1 when `path` is kept and counted by train.keep_last, 0 otherwise."""
    if not keep:
        _delete_unless_read(path)
        return 0
    try:
        verify(path)
        return 1
    except DamagedCheckpoint as e:
        move_aside(run_dir, [path], f"{e}; not counted by train.keep_last")
        return 0


def _say_unreadable(path: Path, error: Exception) -> None:
    if str(path) in _unreadable_said:
        return
    _unreadable_said.add(str(path))
    why = f"{error.strerror} ({error.filename or path})" if isinstance(error, OSError) else str(error)
    print(f"[ann] warning: cannot check or prune the older checkpoint {path}: {why}; it is left as it is and not "
          "counted by train.keep_last; training goes on", file=sys.stderr, flush=True)


def remove_staging(run_dir: Path) -> None:
    """Remove what failed or killed saves left: staging dirs, half-deleted and unmarked step dirs."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return
    for p in root.iterdir():
        try:
            stale = p.name.startswith(".tmp-") or (p.name.startswith(STEP_PREFIX) and not is_complete(p))
        except OSError:  # an unreadable step dir may be complete: never delete what cannot be checked
            continue
        if stale:
            shutil.rmtree(p, ignore_errors=True)


def _delete_unless_read(path: Path) -> None:
    try:
        lock = locks.try_lock(path / READERS, shared=False)
    except OSError:  # no lock file can be made there, so no reader holds one either
        shutil.rmtree(path, ignore_errors=True)
        return
    if lock is None:
        print(f"[ann] keeping {path} beyond train.keep_last for now: it is being read", file=sys.stderr, flush=True)
        return
    with lock:
        gone = path.with_name(f".tmp-pruned-{path.name}")  # out of sight of readers before any file goes
        path.rename(gone)
        shutil.rmtree(gone, ignore_errors=True)


@contextmanager
def reading(checkpoint: Path):
    """Hold `checkpoint` shared while the block reads it, so that a training's prune keeps it; a prune under
    way is waited for up to ANN_LOCK_TIMEOUT seconds (default 60). A checkpoint where no lock file can be
    made (read-only: nothing prunes it there) is read without one."""
    import os
    import time

    wait_s = float(os.environ.get("ANN_LOCK_TIMEOUT", "60"))
    checkpoint, deadline = Path(checkpoint), time.monotonic() + wait_s
    if not is_complete(checkpoint):  # nothing to protect: the caller says what is wrong with it
        yield checkpoint
        return
    try:
        while (lock := locks.try_lock(checkpoint / READERS, shared=True)) is None:
            if time.monotonic() >= deadline:
                raise UserError(f"checkpoint {checkpoint} is being deleted by {locks.holder(checkpoint / READERS)}")
            time.sleep(_READ_WAIT_S)
    except OSError:
        lock = None
    try:
        if lock is not None and not is_complete(checkpoint):
            raise UserError(f"checkpoint {checkpoint} was pruned by its training (train.keep_last) while being "
                            "opened; name a newer checkpoint, or run again to take the newest")
        yield checkpoint
    finally:
        if lock is not None:
            lock.close()
