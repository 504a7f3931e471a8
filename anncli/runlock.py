"""The run lock: `<run>/.lock`, held by one training at a time, never by the processes it forks.

flock belongs to the open file, so the kernel drops the lock when its holder dies, unless a forked child
(a DataLoader worker) still holds a copy of the descriptor; every fork here gives up that copy.
"""

from __future__ import annotations

import os
from pathlib import Path

from anncli.errors import UserError

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
