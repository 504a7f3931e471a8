"""Shared test helpers: run the real `ann` CLI in a subprocess on a tiny synthetic set."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def ann_env(**extra) -> dict:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", DS_ACCELERATOR="cpu", GLOO_SOCKET_IFNAME="lo")
    env.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))
    env.update(extra)
    return env


def ann_cmd(*args) -> list[str]:
    return [sys.executable, "-m", "anncli", *map(str, args)]


def run_ann(*args, timeout=600, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(ann_cmd(*args), capture_output=True, text=True, cwd=ROOT, env=ann_env(), timeout=timeout,
                          **kwargs)


def tiny_overrides(data_root: Path, **changes) -> list[str]:
    """`--set` arguments that shrink recipes/demo.yaml to seconds: 32x64 images, batch 2."""
    values = {
        "data.root": str(data_root),
        "data.synth.train": 48,
        "data.synth.val": 12,
        "data.synth.size": "[32, 64]",
        "data.synth.max_samples": 16,
        "augment.crop": "[32, 64]",
        "train.batch_size": 2,
        "train.iters": 6,
        "train.checkpoint_every": 3,
        "train.log_every": 1,
        **changes,
    }
    out = []
    for key, value in values.items():
        out += ["--set", f"{key}={value}"]
    return out


@pytest.fixture
def synth_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("synth")


@pytest.fixture
def busy_cpus():
    """Keep every core busy with another process for the duration of the test (restarts under load)."""
    spin = "import os, signal; signal.signal(signal.SIGTERM, lambda *a: os._exit(0))\nwhile True: pass"
    procs = [subprocess.Popen([sys.executable, "-c", spin]) for _ in range(os.cpu_count() or 2)]
    try:
        yield procs
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=30)
