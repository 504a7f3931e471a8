"""Processes that end with their parent: torchrun under `ann`, each rank under its torchrun agent, data
workers under their rank. Linux's PR_SET_PDEATHSIG has the kernel signal a process when its parent dies,
even by SIGKILL; elsewhere nothing is set up.
"""

from __future__ import annotations

import os
import sys

_PR_SET_PDEATHSIG = 1


def die_with_parent(signum: int, parent: int | None = None) -> None:
    """Have the kernel send `signum` to this process when its parent dies. `parent` (the pid it should
    have; default: the one it has now) is checked after the call, for a parent that died before it."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    parent = os.getppid() if parent is None else parent
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signum))
    if os.getppid() != parent:
        os.kill(os.getpid(), signum)


def rank_dies_with_agent() -> None:
    """In a torchrun worker: SIGTERM when the agent dies (`kill -9` of torchrun, its node's `ann` gone), so the
    rank stops the way a preemption does (ranks agree, save, exit) instead of training on as an orphan that
    holds the run lock and the GPU. torchrun sets TORCHELASTIC_RUN_ID for its workers only."""
    import signal

    if os.environ.get("TORCHELASTIC_RUN_ID"):
        die_with_parent(signal.SIGTERM)
