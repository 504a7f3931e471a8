"""Chaos, as the acceptance test of "nothing is lost": 2 gloo ranks under `--max-restarts 3`, with both
cores kept busy by another process, lose a random worker three times (once while a checkpoint is being
written) and still end with exit 0 and final weights bitwise equal to an undisturbed run.

Slow (minutes): run with `make test-chaos` (pytest -m chaos)."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT, ann_cmd, ann_env, run_ann, tiny_overrides

DEADLINE_S = 2400  # DeepSpeed restarts take minutes each on 2 busy cores
pytestmark = [pytest.mark.slow, pytest.mark.chaos, pytest.mark.timeout(2 * DEADLINE_S)]
ITERS, EVERY = 24, 4


def _busy_cores(n: int = 2) -> subprocess.Popen:
    """Another process that keeps `n` cores busy for as long as it lives."""
    code = ("import multiprocessing as mp\n"
            "def spin():\n    while True: pass\n"
            f"ps = [mp.Process(target=spin, daemon=True) for _ in range({n})]\n"
            "[p.start() for p in ps]\n[p.join() for p in ps]\n")
    return subprocess.Popen([sys.executable, "-c", code], start_new_session=True)


def _environ(pid: int) -> dict:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)


def _parent(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return 0


def _workers(run: Path) -> list[int]:
    """Training ranks of this run: torchrun's workers (RANK set), not their DataLoader children."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        pid = int(cmdline.parent.name)
        try:
            if str(run) not in cmdline.read_bytes().decode(errors="replace"):
                continue
        except OSError:
            continue
        if "RANK" in _environ(pid) and "RANK" not in _environ(_parent(pid)):
            found.append(pid)
    return found


def _events(run: Path) -> list[dict]:
    path = run / "events.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _attempts(run: Path) -> int:
    """Attempts that got as far as setting up (rank 0 writes `start` or `resume`)."""
    return sum(e["event"] in ("start", "resume") for e in _events(run))


def _last_step(run: Path) -> int:
    return max([e["step"] for e in _events(run) if e["event"] == "step"] or [0])


def _kill_one(run: Path, proc: subprocess.Popen) -> int:
    while True:
        workers = _workers(run)
        if len(workers) == 2:
            victim = random.choice(workers)
            os.kill(victim, signal.SIGKILL)
            return victim
        assert proc.poll() is None, "training ended before the kill"
        time.sleep(0.01)


def _wait(condition, proc: subprocess.Popen, deadline: float, what: str) -> None:
    while not condition():
        assert proc.poll() is None, f"training ended while waiting for {what}"
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def _staging(run: Path) -> list[str]:
    try:
        return [e.name for e in os.scandir(run / "checkpoints") if e.name.startswith(".tmp-")]
    except OSError:
        return []


@pytest.mark.parametrize("engine", ["ddp", "deepspeed"])
def test_three_random_worker_kills_under_load_end_bitwise_equal(tmp_path, synth_root, engine):
    overrides = tiny_overrides(synth_root, **{"train.iters": ITERS, "train.checkpoint_every": EVERY,
                                              "train.val_every": EVERY, "data.num_workers": 2,
                                              "train.keep_last": 2, "engine": engine})
    base = ["train", "recipes/demo.yaml", "--nproc-per-node", 2, "--max-restarts", 3, *overrides]
    ref = run_ann(*base, "--work-dir", tmp_path / "ref", timeout=DEADLINE_S)
    assert ref.returncode == 0, ref.stderr[-3000:]

    run, log = tmp_path / "chaos", tmp_path / "chaos.log"
    load = _busy_cores()
    started = time.time()
    deadline = started + DEADLINE_S
    proc = subprocess.Popen(ann_cmd(*base, "--work-dir", run), cwd=ROOT, env=ann_env(), stdout=subprocess.DEVNULL,
                            stderr=open(log, "w"), start_new_session=True)
    kills = []
    try:
        # 1: a random moment of the first attempt, before or after its first checkpoint.
        target = random.randint(2, 7)
        _wait(lambda: _last_step(run) >= target, proc, deadline, f"step {target}")
        time.sleep(random.uniform(0, 0.5))
        kills.append(("random", _last_step(run), _kill_one(run, proc)))
        # 2: while rank 0's staging directory exists, i.e. during a checkpoint write of the next attempt.
        _wait(lambda: _attempts(run) >= 2 and not _staging(run), proc, deadline, "the second attempt")
        _wait(lambda: bool(_staging(run)), proc, deadline, "a checkpoint write")
        staged = _staging(run)
        kills.append(("during checkpoint write " + ",".join(staged), _last_step(run), _kill_one(run, proc)))
        # 3: a random moment of the third attempt, some steps after it resumed.
        _wait(lambda: _attempts(run) >= 3, proc, deadline, "the third attempt")
        target = random.randint(min(_last_step(run) + 1, ITERS - 2), ITERS - 2)
        _wait(lambda: _last_step(run) >= target, proc, deadline, f"step {target}")
        time.sleep(random.uniform(0, 0.5))
        kills.append(("random", _last_step(run), _kill_one(run, proc)))
        code = proc.wait(timeout=max(1, deadline - time.time()))
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        os.killpg(load.pid, signal.SIGKILL)
        load.wait()
    elapsed = time.time() - started
    report = {"engine": engine, "kills": kills, "exit": code, "seconds": round(elapsed, 1),
              "attempts": _attempts(run), "resumed_at": [e["step"] for e in _events(run) if e["event"] == "resume"]}
    print(json.dumps(report))
    assert code == 0, f"{report}\n{log.read_text()[-4000:]}"
    assert len(kills) == 3 and _attempts(run) == 4, report
    final = f"checkpoints/step-{ITERS:06d}/model.pt"
    want = torch.load(tmp_path / "ref" / final, weights_only=True)
    got = torch.load(run / final, weights_only=True)
    assert want.keys() == got.keys()
    for k in want:
        assert torch.equal(want[k], got[k]), f"{k} differs after {report}"
