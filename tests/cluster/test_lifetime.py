"""Ranks end with their torchrun agent: a real `kill -9` of the agent of a real 2-rank training."""

import os
import signal
import time

import pytest
from conftest import ann_cmd, start_until_checkpoint, tiny_overrides

from anncli.runs.locks import lock_run_dir


def _children(pid: int) -> list[int]:
    kids = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            kids += [int(k) for k in f.read().split()]
    return kids


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has ended
    except FileNotFoundError:
        return False


@pytest.mark.slow  # about 40 s: a 2-rank training to its first checkpoint
def test_ranks_exit_when_their_torchrun_agent_is_killed(tmp_path, synth_root):
    run = tmp_path / "run"
    cmd = ann_cmd("train", "recipes/demo.yaml", "--nproc-per-node", 2, "--work-dir", run,
                  *tiny_overrides(synth_root, **{"train.iters": 100000, "train.checkpoint_every": 1}))
    ann = start_until_checkpoint(cmd, run, 1, tmp_path / "train.log")
    workers = []
    try:
        (agent,) = _children(ann.pid)
        workers = _children(agent)
        assert len(workers) == 2, workers
        os.kill(agent, signal.SIGKILL)
        deadline = time.monotonic() + 120
        while any(_alive(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [w for w in workers if _alive(w)], (tmp_path / "train.log").read_text()[-3000:]
        lock_run_dir(run, 0).close()  # the run lock went with them
    finally:
        for pid in [ann.pid, *workers]:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        ann.wait(timeout=60)
