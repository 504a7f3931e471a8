"""`ann env`: the block users paste into bug reports, run through the real CLI."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from anncli.cluster.command import NETWORK_PREFIXES


def ann_env(**extra: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", *NETWORK_PREFIXES))}
    done = subprocess.run([sys.executable, "-m", "anncli", "env"], env={**env, **extra},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_env_prints_versions_gpus_and_network_variables():
    import torch

    out = ann_env(NCCL_SOCKET_IFNAME="^lo,docker0", GLOO_SOCKET_IFNAME="eth7")
    assert f"torch: {torch.__version__}" in out
    assert f"python: {sys.version.split()[0]}" in out
    for name in ("CUDA:", "NCCL:", "deepspeed:", "webdataset:", "GPUs:"):
        assert name in out
    assert "NCCL_SOCKET_IFNAME=^lo,docker0" in out and "GLOO_SOCKET_IFNAME=eth7" in out
    assert "SLURM: not inside a SLURM job" in out and "launch context: shell" in out


def test_env_detects_a_slurm_step():
    out = ann_env(SLURM_JOB_ID="77", SLURM_STEP_ID="0", SLURM_JOB_NODELIST="node[1-2]", SLURMD_NODENAME="node2")
    assert "launch context: slurm-step" in out
    assert "SLURM_JOB_ID=77" in out and "SLURM_JOB_NODELIST=node[1-2]" in out and "SLURMD_NODENAME=node2" in out
    assert "(none set)" in out  # no NCCL_/GLOO_ variables in this environment


def test_env_adds_cpus_threads_libraries_and_the_checkout_commit(tmp_path):
    from importlib.metadata import version

    out = ann_env(OMP_NUM_THREADS="1")
    assert f"CPUs: {os.cpu_count()} (usable by this process: " in out
    assert "torch threads: 1 (OMP_NUM_THREADS=1)" in out
    for name, dist in (("Pillow", "pillow"), ("typer", "typer"), ("pydantic", "pydantic")):
        assert f"{name}: {version(dist)}" in out
    import cv2

    assert re.search(rf"^opencv: {re.escape(cv2.__version__)}", out, re.M), out
    root = Path(__file__).resolve().parents[2]
    head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert re.search(rf"^ann: \S+ \(git {head[:12]}(-dirty)?\)$", out, re.M), out
    from anncli.cluster.env import git_commit

    assert git_commit(tmp_path) is None  # not a checkout: no commit line
