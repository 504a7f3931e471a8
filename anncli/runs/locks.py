"""File locks: flock where the file system has it, O_EXCL lock files where it does not.

Two uses: the run lock (exclusive, a training's for its lifetime: lock_run_dir) and checkpoint read
locks (shared while `ann eval`, `ann predict`, `--init-from` or `load_model` read a checkpoint; pruning takes
them exclusive without waiting and keeps a checkpoint that is being read: checkpoint.reading, prune).

NFS and Lustre mounted without lock support raise ENOLCK from flock. Then, after one line saying so, a lock
is a file created with O_EXCL beside the lock file: `<lock>.held` (exclusive, holding "pid P on HOST") or
`<lock>.reader-HOST-PID-N` (shared). An exclusive lock waits for no reader file, a reader for no `.held`.
The kernel does not drop these when the holder dies: a file of a dead process of this host is removed by
the next taker; one of another host stays until its holder removes it (the message names it).
"""

from __future__ import annotations

import errno
import fcntl
import itertools
import os
import socket
import sys
import time
from pathlib import Path

from anncli.errors import UserError

_fallback_said: set[str] = set()
_readers = itertools.count()


def flock(fd, operation: int) -> None:
    """The one call of flock(2): a test replaces it with one that raises ENOLCK, as NFS does."""
    fcntl.flock(fd, operation)


def holder_line() -> str:
    return f"pid {os.getpid()} on {socket.gethostname()}"


class Lock:
    """A held lock: a flock'ed open file, or an O_EXCL lock file that `close` removes."""

    def __init__(self, path: Path, handle=None, marker: Path | None = None):
        self.path, self.handle, self.marker = path, handle, marker

    def close(self) -> None:
        if self.handle is not None:
            self.handle.close()
        if self.marker is not None:
            try:
                self.marker.unlink()
            except FileNotFoundError:  # pruned together with its checkpoint
                pass

    def __enter__(self) -> "Lock":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def try_lock(path: Path, shared: bool) -> Lock | None:
    """Take the lock at `path` without waiting; None while another process holds it (exclusive: or any
    reader). An exclusive taker writes `holder_line()` into it. OSError when `path` cannot be opened."""
    path = Path(path)
    handle = open(path, "a+")
    try:
        flock(handle.fileno(), (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    except OSError as e:
        handle.close()
        if e.errno != errno.ENOLCK:
            raise
        _say_fallback(path)
        return _try_file_lock(path, shared)
    if not shared:
        handle.seek(0)
        handle.truncate()
        handle.write(holder_line() + "\n")
        handle.flush()
    return Lock(path, handle=handle)


def holder(path: Path) -> str:
    """Who holds the exclusive lock at `path`, as its holder wrote it."""
    for p in (_held_file(Path(path)), Path(path)):
        try:
            text = p.read_text().strip()
        except OSError:
            continue
        if text:
            return text + (f" (lock file {p})" if p != Path(path) else "")
    return "another process"


def _say_fallback(path: Path) -> None:
    where = str(path.parent)
    if where not in _fallback_said:
        _fallback_said.add(where)
        print(f"[ann] note: {where} does not support flock (ENOLCK: NFS/Lustre without locking); using O_EXCL "
              "lock files there instead", file=sys.stderr, flush=True)


def _held_file(path: Path) -> Path:
    return path.with_name(path.name + ".held")


def _reader_files(path: Path) -> list[Path]:
    return list(path.parent.glob(path.name + ".reader-*"))


def _create(marker: Path) -> bool:
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        f.write(holder_line() + "\n")
    return True


def _live(marker: Path) -> bool:
    """False for a lock file of a dead process of this host (it is removed); True otherwise."""
    try:
        words = marker.read_text().split()  # "pid P on HOST"
    except FileNotFoundError:
        return False
    if len(words) == 4 and words[3] == socket.gethostname() and words[1].isdigit():
        try:
            os.kill(int(words[1]), 0)
        except ProcessLookupError:
            marker.unlink(missing_ok=True)
            return False
        except PermissionError:
            pass
    return True


def _try_file_lock(path: Path, shared: bool) -> Lock | None:
    held = _held_file(path)
    if shared:
        mine = path.with_name(f"{path.name}.reader-{socket.gethostname()}-{os.getpid()}-{next(_readers)}")
        _create(mine)
        if held.exists() and _live(held):
            mine.unlink(missing_ok=True)
            return None
        return Lock(path, marker=mine)
    if not _create(held):
        if _live(held) or not _create(held):
            return None
    if any(_live(r) for r in _reader_files(path)):
        held.unlink(missing_ok=True)
        return None
    return Lock(path, marker=held)


# --- the run lock ---------------------------------------------------------------------------------


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
    forked children do not keep it (see _release_locks_in_child). Without flock (NFS/Lustre): the O_EXCL
    files above.
    """
    path = Path(run_dir) / ".lock"
    deadline = time.monotonic() + timeout_s
    announced = False
    while (lock := try_lock(path, shared=False)) is None:
        who = holder(path)
        if time.monotonic() >= deadline:
            raise UserError(f"run directory {run_dir} is in use by {who}; wait for it to finish or "
                            "pass another --work-dir")
        if not announced:
            print(f"[ann] run directory {run_dir} is in use by {who}; waiting up to {timeout_s:.0f} s", flush=True)
            announced = True
        time.sleep(0.5)
    if lock.handle is not None:
        _HELD_LOCKS.append(lock.handle)
    return lock
