"""What a launch plan starts: the request and the plan, torchrun's command line, and the environment of the
started command. Every row of the launch matrix (`launch.py`, `slurm.py`, `pytorchjob.py`) is built from these.

Environment variables read here:
    ANN_RDZV_TIMEOUT       seconds every node has to join the rendezvous (default 900)
    ANN_SHUTDOWN_TIMEOUT   seconds workers get to save after SIGTERM/SIGUSR1 before SIGKILL (default 300)
Set for the workers of an elastic node range (and read by train/plan.py's run_split):
    ANN_ELASTIC_WORLD_SIZE the range's largest world: a new run's effective batch is the one of that world on
                           any number of nodes, so it does not depend on how many joined first
"""

from __future__ import annotations

import os
import shlex
import sys
from dataclasses import dataclass, field
from typing import Mapping, Optional

from anncli.errors import UserError

DEFAULT_RDZV_TIMEOUT = 900
DEFAULT_SHUTDOWN_TIMEOUT = 300
# torchrun turns these into a clean shutdown of the workers (SIGUSR1 is not in its default list).
HANDLED_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
NETWORK_PREFIXES = ("NCCL_", "GLOO_", "TORCH_NCCL_", "TORCH_DISTRIBUTED_", "MASTER_", "ANN_")


@dataclass
class LaunchRequest:
    """What the user asked for on the command line; argv is the verb and everything after it."""

    argv: list[str]
    nodes: Optional[int] = None
    nproc_per_node: Optional[int] = None
    node_rank: Optional[int] = None
    rdzv_endpoint: Optional[str] = None
    max_restarts: int = 0


@dataclass
class LaunchPlan:
    """What to start (command None: run in this process), with the environment to start it with.

    `nnodes` is the number of nodes the plan assumes. An elastic node range (torchrun's `--nnodes MIN:MAX`,
    named in messages as `nnodes_source`) also sets `min_nnodes`: the job may start, and restart, on any
    number of nodes in between; `nnodes` and `world_size` are then the largest."""

    kind: str  # "in-process" | "torchrun-standalone" | "torchrun-node" | "srun" | "worker"
    command: Optional[list[str]]
    env: dict[str, str]
    world_size: int
    nnodes: int
    nproc_per_node: int
    rdzv_endpoint: Optional[str] = None
    lines: list[str] = field(default_factory=list)
    min_nnodes: Optional[int] = None
    nnodes_source: str = ""

    @property
    def elastic(self) -> bool:
        return self.min_nnodes is not None and self.min_nnodes < self.nnodes

    def node_counts(self) -> list[int]:
        """Every number of nodes this plan may run on, smallest first."""
        return list(range(self.min_nnodes if self.elastic else self.nnodes, self.nnodes + 1))

    def nodes_text(self) -> str:
        """'4 node(s)', or '2 to 4 node(s)' for an elastic range."""
        return f"{self.min_nnodes} to {self.nnodes} node(s)" if self.elastic else f"{self.nnodes} node(s)"

    def worlds_text(self) -> str:
        """'32', or '16 to 32' for an elastic range."""
        return f"{self.min_nnodes * self.nproc_per_node} to {self.world_size}" if self.elastic else str(self.world_size)


ELASTIC_WORLD_ENV = "ANN_ELASTIC_WORLD_SIZE"


def elastic_world_size(env: Mapping[str, str]) -> Optional[int]:
    """The largest world of the elastic node range this worker belongs to (None outside one)."""
    raw = env.get(ELASTIC_WORLD_ENV, "").strip()
    if not raw:
        return None
    if not raw.isdigit() or int(raw) < 1:
        raise UserError(f"{ELASTIC_WORLD_ENV}={raw!r}: expected a number of ranks (ann sets it for the workers "
                        "of an elastic node range)")
    return int(raw)


def int_env(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise UserError(f"{name}={raw!r}: expected a whole number of seconds or a port") from None
    if value <= 0:
        raise UserError(f"{name}={raw!r}: must be positive")
    return value


def child_env(env: Mapping[str, str], nproc: Optional[int] = None) -> dict[str, str]:
    """The full environment of a started command: everything inherited (NCCL_*/GLOO_* included).

    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1: by default torchrun's c10d rendezvous hands its own TCPStore to
    the workers and keeps it across worker-group restarts, while the workers' process group uses the
    same keys in every attempt ("default_pg/0/…"). A restarted rank that reaches connectFullMesh before
    its peer has re-published its address reads the dead peer's address of the previous attempt and
    fails with "Connection refused" (pytorch/pytorch#135712) — likely on a busy machine, where the
    restarted ranks start seconds apart. Unshared, each attempt's rank 0 hosts a fresh store.

    OMP_NUM_THREADS (workers only, when not set): the cores divided among the node's processes;
    torchrun would otherwise pick 1 and print a banner about it.
    """
    out = dict(env)
    out.pop(ELASTIC_WORLD_ENV, None)  # only the plan of an elastic range sets it, for its own workers
    out["PYTHONFAULTHANDLER"] = "1"
    out.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))
    out.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    if nproc is not None and not env.get("OMP_NUM_THREADS"):
        out["OMP_NUM_THREADS"] = str(max(1, len(os.sched_getaffinity(0)) // nproc))
    return out


def split_endpoint(endpoint: str) -> tuple[str, int]:
    host, sep, port = endpoint.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UserError(f"--rdzv-endpoint {endpoint!r}: expected HOST:PORT, e.g. 10.0.0.1:29500")
    return host, int(port)


def torchrun_command(
    argv: list[str], env: Mapping[str, str], nnodes: int | str, nproc: int, max_restarts: int,
    endpoint: Optional[str] = None, rdzv_id: str = "ann", rdzv_conf: str = "",
) -> list[str]:
    """torchrun (standalone without `endpoint`, else a c10d rendezvous there) running `ann ARGV` per process."""
    timeout = int_env(env, "ANN_RDZV_TIMEOUT", DEFAULT_RDZV_TIMEOUT)
    cmd = [sys.executable, "-m", "anncli.cluster.torchrun"]  # torch.distributed.run, exits without tracebacks
    if endpoint is None:
        cmd += ["--standalone"]
    else:
        cmd += ["--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", rdzv_id]
    cmd += [
        "--nnodes", str(nnodes),
        "--nproc-per-node", str(nproc),
        "--rdzv-conf", f"join_timeout={timeout}" + (f",{rdzv_conf}" if rdzv_conf else ""),
        "--max-restarts", str(max_restarts),
        "--shutdown-timeout", str(int_env(env, "ANN_SHUTDOWN_TIMEOUT", DEFAULT_SHUTDOWN_TIMEOUT)),
        "--signals-to-handle", HANDLED_SIGNALS,
    ]
    return cmd + ["-m", "anncli", *argv]


def describe(plan: LaunchPlan, what: str) -> LaunchPlan:
    """Lines for --dry-run: what runs where, the exact command, the network variables it inherits."""
    plan.lines = [what]
    if plan.command is not None:
        plan.lines.append(shlex.join(a for a in plan.command if a != "--dry-run"))
        net = [f"{k}={v}" for k, v in sorted(plan.env.items()) if k.startswith(NETWORK_PREFIXES)]
        fixed = [f"{k}={plan.env[k]}" for k in ("PYTHONFAULTHANDLER", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "OMP_NUM_THREADS")
                 if k in plan.env]
        plan.lines.append("environment: " + " ".join(fixed + net))
    return plan
