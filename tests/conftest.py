"""Shared test helpers: run the real `ann` CLI in a subprocess on a tiny synthetic set."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Tests are grouped in folders named like the package's wings; a test module may reuse another's data
# builders by module name (`from test_eval_run import write_checkpoint`), whichever folder it lives in.
for _folder in sorted(p for p in Path(__file__).parent.iterdir() if p.is_dir() and any(p.glob("test_*.py"))):
    if str(_folder) not in sys.path:
        sys.path.append(str(_folder))


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


def start_until_checkpoint(cmd: list, run: Path, step: int, log: Path, timeout: float = 600) -> subprocess.Popen:
    """Start `cmd` in a process group of its own (stderr to `log`, a file: nobody reads a pipe once the test
    moves on) and return it once checkpoint `step` of the run directory `run` is complete."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ann_env(), stdout=subprocess.DEVNULL, stderr=open(log, "w"),
                            start_new_session=True)
    marker = run / "checkpoints" / f"step-{step:06d}" / "COMPLETE"
    deadline = time.time() + timeout
    while not marker.exists():
        assert proc.poll() is None, f"training ended early: {log.read_text()[-3000:]}"
        assert time.time() < deadline, f"no checkpoint {step} after {timeout} s: {log.read_text()[-3000:]}"
        time.sleep(0.05)
    return proc


def file_size_limit(limit: int):
    """A preexec_fn putting the child under a real file-size limit (`ulimit -f`, RLIMIT_FSIZE, in bytes).
    SIGXFSZ stays as a shell leaves it: CPython ignores it, so a write over the limit fails with EFBIG."""
    import resource

    def apply():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def run_ann_limited(*args, limit: int, timeout=600) -> subprocess.CompletedProcess:
    """`run_ann` under a file-size limit of `limit` bytes (no .pyc written: those would count too)."""
    return subprocess.run(ann_cmd(*args), capture_output=True, text=True, cwd=ROOT, timeout=timeout,
                          env=ann_env(PYTHONDONTWRITEBYTECODE="1"), preexec_fn=file_size_limit(limit))


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


def assert_close_to_reference(actual, expected, *, what: str = "output", max_abs: float = 5e-3,
                              rel_l2: float = 1e-3, argmax_agree: float = 0.99) -> None:
    """`actual` (computed here) is `expected` (computed elsewhere: a fixture, a published figure) up to the
    float drift between CPUs; the rule is in tests/README.md. For logits (N, C, ...) the class each
    position picks must also agree on `argmax_agree` of the positions."""
    import torch

    actual, expected = actual.detach().double(), expected.detach().double()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} vs {tuple(expected.shape)}"
    diff = (actual - expected).abs().max().item()
    rel = ((actual - expected).norm() / expected.norm().clamp_min(1e-12)).item()
    assert rel <= rel_l2 and diff <= max_abs, (
        f"{what}: relative L2 {rel:.2e} (bound {rel_l2:.0e}), max abs {diff:.2e} (bound {max_abs:.0e})")
    if actual.dim() >= 2 and actual.shape[1] > 1:
        agree = (actual.argmax(1) == expected.argmax(1)).double().mean().item()
        assert agree >= argmax_agree, f"{what}: argmax agrees on {agree:.2%} of positions (bound {argmax_agree:.0%})"
