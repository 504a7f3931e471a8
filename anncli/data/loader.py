"""DataLoader plumbing shared by the training stream and the evaluation reader.

Workers leave the preemption signals to the training process and die with their rank; a loader's workers stop when its iteration
ends or the process exits; a UserError raised in a worker arrives as its own one-line message.
"""

from __future__ import annotations

import atexit
import signal
import weakref
from typing import Iterator

from anncli.errors import UserError


def worker_init(_worker_id: int = 0) -> None:
    """DataLoader workers leave SIGTERM/SIGUSR1 to the training process, use one torch thread, and die
    with their rank (Linux: SIGKILL when the parent dies, even by SIGKILL; they ignore SIGTERM).

    (cv2's thread count is left alone: calling cv2.setNumThreads in a forked child can deadlock.)
    """
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    import multiprocessing

    from anncli.cluster.lifetime import die_with_parent

    rank = multiprocessing.parent_process()
    die_with_parent(signal.SIGKILL, rank.pid if rank is not None else None)
    import torch

    torch.set_num_threads(1)


def identity(x):
    return x


_LIVE_LOADERS: "weakref.WeakSet" = weakref.WeakSet()


@atexit.register
def _stop_live_loaders() -> None:
    # Workers ignore SIGTERM, so multiprocessing's exit hook could not stop them; stop them first.
    for it in list(_LIVE_LOADERS):
        it._shutdown_workers()


def loader_items(loader) -> Iterator:
    """Iterate a DataLoader; its workers stop when this generator ends, is closed, or the process exits.
    A UserError from a worker comes back as the same type with its own one-line message."""
    it = iter(loader)
    _LIVE_LOADERS.add(it)
    try:
        yield from it
    except UserError as e:
        raise reraise_worker_error(e) from None
    finally:
        _LIVE_LOADERS.discard(it)
        it._shutdown_workers()


def reraise_worker_error(exc: Exception) -> Exception:
    """A UserError raised in a DataLoader worker arrives with a traceback text; keep its own one line."""
    msg = str(exc)
    if isinstance(exc, UserError) and "Original Traceback" in msg:
        last = msg.strip().splitlines()[-1]
        return type(exc)(last.split(": ", 1)[1] if ": " in last else last)
    return exc
