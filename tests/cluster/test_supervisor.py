"""`execute` on real processes: exit codes, the environment, signal forwarding and the requeue code."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

from anncli.cluster import command
from anncli.cluster import supervisor
from anncli.errors import EXIT_PREEMPTED


def _plan(code: str) -> command.LaunchPlan:
    cmd = [sys.executable, "-c", textwrap.dedent(code)]
    return command.LaunchPlan("torchrun-standalone", cmd, dict(os.environ), 1, 1, 1, lines=["test child"])


def test_execute_returns_the_exit_code_and_names_the_host(capfd):
    assert supervisor.execute(_plan("import sys; sys.exit(3)")) == 3
    err = capfd.readouterr().err
    assert "exited with code 3" in err and os.uname().nodename.split(".")[0] in err


def test_execute_passes_the_environment():
    plan = _plan("import os, sys; sys.exit(0 if os.environ['PYTHONFAULTHANDLER'] == '1' else 1)")
    plan.env = command.child_env({**os.environ})
    assert supervisor.execute(plan) == 0


def test_execute_forwards_sigterm_and_reports_preemption(tmp_path, capfd):
    """SIGTERM to `ann` reaches the child's process group; the result is the requeue exit code."""
    ready, got = tmp_path / "ready", tmp_path / "got"
    script = f"""
        import pathlib, signal, sys, time
        signal.signal(signal.SIGTERM, lambda s, f: (pathlib.Path({str(got)!r}).write_text(str(s)), sys.exit(1)))
        pathlib.Path({str(ready)!r}).write_text("1")
        time.sleep(60)
    """
    runner = f"""
        import sys
        sys.path.insert(0, {os.getcwd()!r})
        from anncli.cluster import command
        from anncli.cluster import supervisor
        plan = command.LaunchPlan("torchrun-node", [sys.executable, "-c", {textwrap.dedent(script)!r}], {{}}, 2, 2, 1,
                                 lines=["test agent"])
        import os; plan.env = dict(os.environ)
        sys.exit(supervisor.execute(plan))
    """
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(runner)], stderr=subprocess.PIPE, text=True)
    for _ in range(300):
        if ready.exists():
            break
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert got.read_text() == str(int(signal.SIGTERM))
    assert proc.returncode == EXIT_PREEMPTED
    assert "stopped by SIGTERM" in err
