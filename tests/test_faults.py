"""Faults off the happy path, with real processes: a killed rank's children, full or read-only disks, ..."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from anncli import checkpoint as ck
from anncli.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_a_forked_child_does_not_keep_the_run_lock_of_its_dead_parent(tmp_path):
    """A DataLoader worker is a fork of its rank: when the rank is SIGKILLed, the restarted rank must get
    the run directory although the orphaned child still lives."""
    holder = subprocess.Popen([sys.executable, "-c", (
        "import os, sys, time; from anncli.checkpoint import lock_run_dir\n"
        f"h = lock_run_dir({str(tmp_path)!r}, 5)\n"
        "child = os.fork()\n"
        "if child == 0:\n"
        "    time.sleep(120); os._exit(0)\n"
        "print(child, flush=True); time.sleep(120)\n")], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    child = int(holder.stdout.readline())
    try:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
        assert _alive(child)
        ck.lock_run_dir(tmp_path, 2).close()
    finally:
        os.kill(child, signal.SIGKILL)
