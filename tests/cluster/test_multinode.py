"""Several nodes by hand on one machine: real `ann train` processes, torchrun agents and gloo ranks."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    """A small synthetic set shared by the tests of this file."""
    root = tmp_path_factory.mktemp("synth")
    subprocess.run([sys.executable, "-m", "anncli", "data", "synth", str(root), "--train", "64", "--val", "16",
                    "--size", "64x128"], check=True, capture_output=True, timeout=300)
    return root


def train_cmd(synth: Path, work_dir: Path, iters: int, every: int, *extra: str) -> list[str]:
    sets = [f"train.iters={iters}", f"train.checkpoint_every={every}", "train.batch_size=2", "train.log_every=1",
            "data.synth.train=64", "data.synth.val=16", f"data.root={synth}"]
    return [sys.executable, "-m", "anncli", "train", "recipes/demo.yaml", "--work-dir", str(work_dir),
            *[a for s in sets for a in ("--set", s)], *extra]


def env(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", **extra}


def start(cmd: list[str], log: Path, **extra: str) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=ROOT, env=env(**extra), stdout=log.open("w"), stderr=subprocess.STDOUT)


def wait_for(predicate, what: str, timeout: float = 300, procs=()) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if any(p.poll() is not None for p in procs):
            raise AssertionError(f"a process ended before {what}")
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def checkpoints(work_dir: Path) -> list[str]:
    return sorted(p.parent.name for p in (work_dir / "checkpoints").glob("step-*/COMPLETE"))


def worker_pid(log: Path, rank: int) -> int | None:
    m = re.search(rf"\[ann\] rank {rank}/\d+ on \S+ \(pid (\d+)", log.read_text(errors="replace"))
    return int(m.group(1)) if m else None


def test_two_nodes_by_hand_form_one_world_and_write_one_checkpoint(synth, tmp_path):
    port, work = free_port(), tmp_path / "run"
    procs = [start(train_cmd(synth, work, 2, 100, "--nodes", "2", "--node-rank", str(r),
                             "--rdzv-endpoint", f"127.0.0.1:{port}"), tmp_path / f"node{r}.log", ANN_RDZV_TIMEOUT="300")
             for r in (0, 1)]
    codes = [p.wait(timeout=600) for p in procs]
    logs = "\n".join((tmp_path / f"node{r}.log").read_text() for r in (0, 1))
    assert codes == [0, 0], logs
    assert checkpoints(work) == ["step-000002"]
    state = json.loads((work / "checkpoints" / "step-000002" / "state.json").read_text())
    assert state["world_size"] == 2 and state["step"] == 2
    assert "rank 0/2" in logs and "rank 1/2" in logs


def test_lone_node_fails_with_a_rendezvous_timeout_instead_of_hanging(synth, tmp_path):
    cmd = train_cmd(synth, tmp_path / "run", 2, 100, "--nodes", "2", "--rdzv-endpoint", f"127.0.0.1:{free_port()}")
    done = subprocess.run(cmd, cwd=ROOT, env=env(ANN_RDZV_TIMEOUT="10"), capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "RendezvousTimeoutError" in done.stderr
    assert "ANN_RDZV_TIMEOUT=10" in done.stderr and "not all 2 nodes reached" in done.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow
def test_killed_worker_ends_the_job_with_a_message_naming_the_rank(synth, tmp_path):
    log, work = tmp_path / "train.log", tmp_path / "run"
    proc = start(train_cmd(synth, work, 400, 400, "--nproc-per-node", "2"), log)
    wait_for(lambda: "step 1 " in log.read_text() and worker_pid(log, 1), "the first step", procs=[proc])
    os.kill(worker_pid(log, 1), signal.SIGKILL)
    code = proc.wait(timeout=60)
    out = log.read_text()
    assert code not in (0, None)
    assert re.search(r"ann: rank 1 \(local rank 1, pid \d+\) on \S+ failed first", out), out[-3000:]
    assert "exited with code" in out and "on " + socket.gethostname() in out


@pytest.mark.slow
def test_max_restarts_restarts_the_workers_from_the_last_checkpoint(synth, tmp_path, busy_cpus):
    """With every core busy in another process, as on a node whose data workers are busy."""
    log, work = tmp_path / "train.log", tmp_path / "run"
    proc = start(train_cmd(synth, work, 16, 4, "--nproc-per-node", "2", "--max-restarts", "1"), log)
    wait_for(lambda: checkpoints(work) and worker_pid(log, 1), "the first checkpoint", procs=[proc])
    os.kill(worker_pid(log, 1), signal.SIGKILL)
    code = proc.wait(timeout=900)
    out = log.read_text()
    assert code == 0, out[-3000:]
    assert re.search(r"\[ann\] resumed from \S+step-0000(0[4-9]|1[0-2]) at step", out), out[-3000:]
    assert checkpoints(work)[-1] == "step-000016"


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError):
            pass
    return out


def _rank_of(pid: int) -> str | None:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return next((e[5:].decode() for e in env if e.startswith(b"RANK=")), None)


@pytest.mark.slow
def test_restarted_ranks_that_start_seconds_apart_still_form_the_world(synth, tmp_path, busy_cpus):
    """A busy node deschedules one restarted rank for seconds; the other must wait for it, not read
    the dead previous rank's address (gloo "connectFullMesh failed … Connection refused")."""
    log, work = tmp_path / "train.log", tmp_path / "run"
    proc = start(train_cmd(synth, work, 12, 4, "--nproc-per-node", "2", "--max-restarts", "1"), log)
    wait_for(lambda: checkpoints(work) and worker_pid(log, 1), "the first checkpoint", procs=[proc])
    agent = _children(proc.pid)[0]
    first = set(_children(agent))
    os.kill(worker_pid(log, 1), signal.SIGKILL)
    late: list[int] = []

    def restarted_rank1() -> bool:
        late[:] = [p for p in _children(agent) if p not in first and _rank_of(p) == "1"]
        return bool(late)

    wait_for(restarted_rank1, "the restarted rank 1", procs=[proc], timeout=120)
    os.kill(late[0], signal.SIGSTOP)  # as if the scheduler gave it no time for 15 s
    time.sleep(15)
    os.kill(late[0], signal.SIGCONT)
    code = proc.wait(timeout=900)
    out = log.read_text()
    assert code == 0, out[-3000:]
    assert "connectFullMesh failed" not in out
    assert re.search(r"\[ann\] resumed from \S+step-0000(0[4-9]|1[0-1]) at step", out), out[-3000:]
    assert checkpoints(work)[-1] == "step-000012"


@pytest.mark.slow
def test_killed_rank_0_takes_its_data_workers_and_leaves_the_run_lock(synth, tmp_path, busy_cpus):
    """The dead rank's DataLoader workers die with it and do not hold the run lock it had, so the
    restarted rank 0 gets the run directory at once."""
    log, work = tmp_path / "train.log", tmp_path / "run"
    cmd = train_cmd(synth, work, 12, 4, "--nproc-per-node", "2", "--max-restarts", "1",
                    "--set", "data.num_workers=2")
    proc = start(cmd, log, ANN_LOCK_TIMEOUT="30")
    wait_for(lambda: checkpoints(work) and worker_pid(log, 0), "the first checkpoint", procs=[proc])
    rank0 = worker_pid(log, 0)
    wait_for(lambda: len(_children(rank0)) >= 2, "rank 0's data workers", procs=[proc])
    workers = _children(rank0)
    for w in workers:  # busy in a long shard read when their rank dies: no chance to notice it themselves
        os.kill(w, signal.SIGSTOP)
    try:
        os.kill(rank0, signal.SIGKILL)
        wait_for(lambda: not any(_alive(w) for w in workers), "the dead rank's data workers to end", timeout=60)
    finally:
        for w in workers:
            if _alive(w):
                os.kill(w, signal.SIGKILL)
    code = proc.wait(timeout=900)
    out = log.read_text()
    assert code == 0, out[-3000:]
    assert "is in use by" not in out
    assert checkpoints(work)[-1] == "step-000012"


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.slow
def test_ctrl_c_stops_a_two_process_run_quietly_naming_the_last_checkpoint(synth, tmp_path):
    log, work = tmp_path / "train.log", tmp_path / "run"
    proc = start(train_cmd(synth, work, 400, 2, "--nproc-per-node", "2"), log)
    wait_for(lambda: checkpoints(work) and worker_pid(log, 1), "the first checkpoint", procs=[proc])
    agent = _children(proc.pid)[0]
    group = [agent, *_children(agent)]
    group += [w for r in group[1:] for w in _children(r)]
    os.kill(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C sends to `ann`, the foreground process
    code = proc.wait(timeout=120)
    out = log.read_text()
    tail = out[out.index("ann: interrupted"):] if "ann: interrupted" in out else out[-3000:]
    assert code == 130, tail
    m = re.search(r"ann: interrupted; last complete checkpoint: (\S+) \(--resume auto continues from it\)", out)
    assert m and Path(m.group(1)).name in checkpoints(work), tail
    assert "SignalException" not in out and "Traceback" not in out and "KeyboardInterrupt" not in out
    wait_for(lambda: not any(_alive(p) for p in group), "torchrun, its ranks and their workers to end", timeout=30)
    assert checkpoints(work)[-1] == Path(m.group(1)).name  # nothing trained on after the message


def test_a_two_process_run_prints_no_omp_banner_and_no_deprecation_warnings(synth, tmp_path):
    log, work = tmp_path / "train.log", tmp_path / "run"
    environ = {k: v for k, v in env().items() if k != "OMP_NUM_THREADS"}  # as a user's shell has it
    proc = subprocess.Popen(train_cmd(synth, work, 2, 100, "--nproc-per-node", "2", "--set", "model.norm=syncbn"),
                            cwd=ROOT, env=environ, stdout=log.open("w"), stderr=subprocess.STDOUT)
    assert proc.wait(timeout=600) == 0, log.read_text()[-3000:]
    out = log.read_text()
    assert "Setting OMP_NUM_THREADS" not in out and "FutureWarning" not in out, out[-3000:]
