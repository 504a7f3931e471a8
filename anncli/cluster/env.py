"""`ann env`: versions, GPUs, the launch context, SLURM and NCCL/GLOO settings, for bug reports."""

from __future__ import annotations

import os
import platform
import socket
import subprocess
import sys
from pathlib import Path
from typing import Mapping, Optional

from anncli.cluster.command import NETWORK_PREFIXES
from anncli.cluster.launch import visible_gpus, where_am_i

K8S_KEYS = ("HOSTNAME", "KUBERNETES_SERVICE_HOST", "MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK")
SLURM_KEYS = ("SLURM_JOB_ID", "SLURM_JOB_NAME", "SLURM_JOB_NODELIST", "SLURM_JOB_NUM_NODES", "SLURM_STEP_ID",
              "SLURM_NODEID", "SLURMD_NODENAME", "SLURM_CPUS_PER_TASK", "SLURM_GPUS_ON_NODE", "SLURM_RESTART_COUNT")


# Libraries whose version changes what users see: image decoding, the command line, recipe validation.
LIBRARIES = (("Pillow", ("pillow",)), ("opencv", ("opencv-python-headless", "opencv-python", "opencv-contrib-python",
                                                 "opencv-contrib-python-headless")),
             ("typer", ("typer",)), ("pydantic", ("pydantic",)))


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def git_commit(start: Optional[Path] = None) -> Optional[str]:
    """The checkout's commit (with `-dirty` when files changed) when the package runs from a git checkout."""
    root = Path(start or Path(__file__).resolve().parents[2])
    if not (root / ".git").exists():
        return None
    try:
        done = subprocess.run(["git", "-C", str(root), "describe", "--always", "--dirty", "--abbrev=12"],
                              capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode != 0:
        return None
    return done.stdout.strip() or None


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "not installed"


def _first_version(dists) -> str:
    """The version of the first of these distributions that is installed (opencv ships under several names)."""
    found = [v for v in map(_version, dists) if v != "not installed"]
    return found[0] if found else "not installed"


def _torch_lines(env: Mapping[str, str]) -> list[str]:
    import torch

    lines = [
        f"torch: {torch.__version__}",
        f"CUDA: {torch.version.cuda or 'none (CPU build)'}; available: {torch.cuda.is_available()}",
    ]
    try:
        nccl = ".".join(map(str, torch.cuda.nccl.version())) if torch.cuda.is_available() else "n/a (no CUDA)"
    except Exception as e:  # a build without NCCL
        nccl = f"n/a ({type(e).__name__})"
    lines.append(f"NCCL: {nccl}")
    lines.append(f"CPUs: {os.cpu_count()} (usable by this process: {_usable_cpus()}); torch threads: "
                 f"{torch.get_num_threads()} (OMP_NUM_THREADS={env.get('OMP_NUM_THREADS', '(unset)')})")
    lines += [f"{name}: {_version(name)}" for name in ("deepspeed", "webdataset", "numpy")]
    lines += [f"{name}: {_first_version(dists)}" for name, dists in LIBRARIES]
    gpus = visible_gpus()
    lines.append(f"GPUs: {gpus} (CUDA_VISIBLE_DEVICES={env.get('CUDA_VISIBLE_DEVICES', '(unset)')})")
    for i in range(gpus):
        props = torch.cuda.get_device_properties(i)
        lines.append(f"  cuda:{i}: {props.name}, {props.total_memory / 2**30:.1f} GiB")
    return lines


def environment_lines(env: Mapping[str, str]) -> list[str]:
    from anncli.version import __version__

    commit = git_commit()
    lines = [
        f"ann: {__version__}" + (f" (git {commit})" if commit else ""),
        f"python: {platform.python_version()} ({sys.executable})",
        f"platform: {platform.platform()}",
        f"host: {socket.gethostname()}",
        *_torch_lines(env),
        f"launch context: {where_am_i(env)}",
    ]
    if env.get("SLURM_JOB_ID"):
        lines.append("SLURM: " + " ".join(f"{k}={env[k]}" for k in SLURM_KEYS if k in env))
    else:
        lines.append("SLURM: not inside a SLURM job")
    if env.get("KUBERNETES_SERVICE_HOST"):
        pod = [f"{k}={env[k]}" for k in K8S_KEYS if k in env] + [f"{k}={v}" for k, v in sorted(env.items())
                                                                   if k.startswith("PET_")]
        lines.append("Kubernetes: " + " ".join(pod))
    else:
        lines.append("Kubernetes: not inside a pod")
    net = [f"  {k}={v}" for k, v in sorted(env.items()) if k.startswith(NETWORK_PREFIXES)]
    lines.append("NCCL/GLOO/distributed variables:" + ("" if net else " (none set)"))
    return lines + net


def version_line() -> str:
    """`ann --version`: the package and the torch and CUDA (or ROCm) it runs on, in one line."""
    from anncli.version import __version__

    try:
        import torch
    except ImportError as e:
        return f"ann {__version__} (torch cannot be imported: {str(e).splitlines()[0]})"
    if torch.version.cuda:
        accelerator = f"CUDA {torch.version.cuda}"
    elif getattr(torch.version, "hip", None):
        accelerator = f"ROCm {torch.version.hip}"
    else:
        return f"ann {__version__} (torch {torch.__version__}, CUDA none)"
    gpus = visible_gpus()
    return f"ann {__version__} (torch {torch.__version__}, {accelerator}, {gpus} GPU{'s' * (gpus != 1)} visible)"


def print_env(env: Optional[Mapping[str, str]] = None) -> None:
    """Versions, GPUs, SLURM and network settings: the block to paste into a bug report."""
    print("\n".join(environment_lines(dict(os.environ if env is None else env))))
