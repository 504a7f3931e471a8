"""Start a launch plan's command (torchrun or srun) and supervise it until it ends.

The child runs in its own process group and dies with `ann`; SIGTERM/SIGUSR1/SIGINT sent to `ann` are
forwarded to it (except inside an srun step, where slurmstepd signals every process itself). Its exit
becomes `ann`'s exit code; a run stopped by a preemption signal exits with EXIT_PREEMPTED, which the
SLURM template requeues on. Ctrl-C stops the whole tree at once and names the last complete checkpoint.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

from typing import Callable, Optional

from anncli.errors import EXIT_PREEMPTED, UserError
from anncli.cluster.command import DEFAULT_RDZV_TIMEOUT, LaunchPlan
from anncli.cluster.lifetime import die_with_parent

FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def _terminate_with_parent() -> None:
    """In the child, before exec: if `ann` itself dies (even by SIGKILL), the child gets SIGTERM.

    torchrun then stops its workers the graceful way (they save a checkpoint), instead of training on
    as orphans beside a restarted run.
    """
    die_with_parent(signal.SIGTERM)


def execute(plan: LaunchPlan, checkpoint_note: Optional[Callable[[], str]] = None) -> int:
    """Start the planned command, forward SIGTERM/SIGUSR1 to it, return the exit code for `ann`.

    The child runs in its own process group, so a Ctrl-C at the terminal reaches it only through here.
    Ctrl-C (SIGINT) stops torchrun and every process below it at once with SIGKILL, which prints nothing
    (torchrun would print a 30-line SignalException and every rank a KeyboardInterrupt); checkpoints are
    atomic, so the newest complete one is intact: `ann` names it (`checkpoint_note()`, given by the caller,
    which knows the run directory) and exits with 130.

    A run stopped by SIGTERM/SIGUSR1 returns EXIT_PREEMPTED, so the SLURM template requeues it and
    `--resume auto` continues from the newest complete checkpoint.
    """
    assert plan.command is not None, "an in-process plan has nothing to execute"
    host = socket.gethostname()
    print(f"ann: {plan.lines[0]} on {host}: {plan.nodes_text()} x {plan.nproc_per_node} process(es) "
          f"= world size {plan.worlds_text()}", file=sys.stderr, flush=True)
    try:
        child = subprocess.Popen(plan.command, env=plan.env, start_new_session=True,
                                 preexec_fn=_terminate_with_parent)
    except FileNotFoundError:
        raise UserError(f"cannot start {plan.command[0]!r}: not found on PATH") from None
    received: list[int] = []

    # In an srun step slurmstepd signals every process of the step itself; forwarding as well would hit
    # the torchrun agent twice, and a second signal aborts its graceful shutdown of the workers.
    in_step = bool(plan.env.get("SLURM_STEP_ID"))

    def forward(signum, _frame):
        received.append(signum)
        if not in_step:
            if signum == signal.SIGINT:
                kill_tree(child.pid)
                return
            try:
                os.killpg(child.pid, signum)
            except ProcessLookupError:
                pass

    previous = {s: signal.signal(s, forward) for s in FORWARDED_SIGNALS}
    try:
        rc = child.wait()
    finally:
        # After a preemption, a late SIGTERM (srun ending the step once another node exited first) must
        # not turn the requeue exit code into 143: keep ignoring the preemption signals until we exit.
        preempted = any(s in PREEMPTION_SIGNALS for s in received)
        for s, handler in previous.items():
            signal.signal(s, signal.SIG_IGN if preempted and s in PREEMPTION_SIGNALS else handler)
    return _exit_code(plan, rc, received, host, checkpoint_note)


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (Linux /proc), found before any of them is killed and reparented."""
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for t in tasks:
            try:
                with open(f"/proc/{p}/task/{t}/children") as f:
                    kids = [int(k) for k in f.read().split()]
            except OSError:
                continue
            found += kids
            todo += kids
    return found


def kill_tree(pid: int) -> None:
    """SIGKILL `pid` (torchrun) and everything below it: its workers run in sessions of their own, out of
    reach of a process-group kill."""
    for p in [pid, *descendants(pid)]:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def interrupted(checkpoint_note: Optional[Callable[[], str]]) -> int:
    """The line a Ctrl-C ends with, naming where `--resume auto` continues; the exit code 130."""
    line = "ann: interrupted"
    if checkpoint_note is not None:
        line += f"; {checkpoint_note()}"
    print(line, file=sys.stderr, flush=True)
    return 130


def _exit_code(plan: LaunchPlan, rc: int, received: list[int], host: str,
               checkpoint_note: Optional[Callable[[], str]] = None) -> int:
    if rc < 0:
        rc = 128 - rc
    if rc == 0:
        return 0
    if any(s in PREEMPTION_SIGNALS for s in received) or rc == EXIT_PREEMPTED:
        name = signal.Signals(received[0]).name if received else "a preemption signal"
        print(f"ann: {plan.kind} on {host} stopped by {name}; exit code {EXIT_PREEMPTED} "
              "(requeue; --resume auto continues from the newest complete checkpoint)", file=sys.stderr, flush=True)
        return EXIT_PREEMPTED
    if signal.SIGINT in received:
        return interrupted(checkpoint_note)
    hint = "the rank that failed first and its host are named above"
    if plan.kind == "srun":
        hint = "srun names the failing task and node above"
    elif plan.nnodes > 1:
        timeout = plan.env.get("ANN_RDZV_TIMEOUT", DEFAULT_RDZV_TIMEOUT)
        needed = f"at least {plan.min_nnodes}" if plan.elastic else f"all {plan.nnodes}"
        hint += (f"; a RendezvousTimeoutError means not {needed} nodes reached {plan.rdzv_endpoint} "
                 f"within ANN_RDZV_TIMEOUT={timeout} s (same command on every node? head node reachable?)")
    print(f"ann: error: {plan.kind} on {host} exited with code {rc}; {hint}", file=sys.stderr, flush=True)
    return rc
