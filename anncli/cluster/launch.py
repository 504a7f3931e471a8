"""Where `ann train` / `ann eval` runs, and what to start there.

The launch matrix, checked in this order:

    torchrun worker (RANK, WORLD_SIZE, LOCAL_RANK set)  -> run in this process ("worker")
    inside an srun step (SLURM_STEP_ID set)              -> this node's torchrun agent ("torchrun-node"),
                                                            endpoint = first host of the step, port from the job id
    inside a SLURM allocation without a step             -> `srun` one agent per node ("srun")
    Kubernetes pod of a Kubeflow PyTorchJob              -> this pod's torchrun agent ("torchrun-node"), from
                                                            the operator's PET_* (elastic) or MASTER_ADDR,
                                                            MASTER_PORT, WORLD_SIZE (pods), RANK variables
    plain shell, --nodes N > 1 or --rdzv-endpoint        -> this node's torchrun agent ("torchrun-node")
    plain shell, one node, P > 1 processes               -> `torchrun --standalone` ("torchrun-standalone")
    plain shell, one process                             -> run in this process ("in-process")

`plan_launch` is a pure function of the request and the environment (scontrol and the GPU count are
injectable), so every row is unit-tested; `anncli.cluster.supervisor.execute` starts the planned command.

Environment variables read here:
    ANN_RDZV_TIMEOUT       seconds every node has to join the rendezvous (default 900)
    ANN_RDZV_PORT          rendezvous port inside SLURM (default 20000 + job id % 10000)
    ANN_RDZV_ID            rendezvous id outside SLURM (default "ann"; inside SLURM: the job id)
    ANN_SHUTDOWN_TIMEOUT   seconds workers get to save after SIGTERM/SIGUSR1 before SIGKILL (default 300)
"""

from __future__ import annotations

import os
import shlex
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional, Sequence

from anncli.cluster.pytorchjob import in_pytorchjob, read_pytorchjob
from anncli.errors import UserError

DEFAULT_RDZV_TIMEOUT = 900
DEFAULT_SHUTDOWN_TIMEOUT = 300
# torchrun turns these into a clean shutdown of the workers (SIGUSR1 is not in its default list).
HANDLED_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
NETWORK_PREFIXES = ("NCCL_", "GLOO_", "TORCH_NCCL_", "TORCH_DISTRIBUTED_", "MASTER_", "ANN_")

Scontrol = Callable[[list[str]], str]


@dataclass
class LaunchRequest:
    """What the user asked for on the command line; argv is the verb and everything after it."""

    argv: list[str]
    nodes: Optional[int] = None
    nproc_per_node: Optional[int] = None
    node_rank: Optional[int] = None
    rdzv_endpoint: Optional[str] = None
    max_restarts: int = 0


def request_for(verb: str, argv: Optional[Sequence[str]] = None, **options) -> LaunchRequest:
    """The request of `ann VERB …`: the verb and everything after it on the command line (`sys.argv` unless
    given), which torchrun and srun run again on every node, and the launch options."""
    argv = list(sys.argv if argv is None else argv)
    rest = argv[argv.index(verb) + 1 :] if verb in argv else []
    return LaunchRequest(argv=[verb, *rest], **options)


@dataclass
class LaunchPlan:
    """What to start (command None: run in this process), with the environment to start it with."""

    kind: str  # "in-process" | "torchrun-standalone" | "torchrun-node" | "srun" | "worker"
    command: Optional[list[str]]
    env: dict[str, str]
    world_size: int
    nnodes: int
    nproc_per_node: int
    rdzv_endpoint: Optional[str] = None
    lines: list[str] = field(default_factory=list)


def visible_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def run_scontrol(args: list[str]) -> str:
    """`scontrol ARGS` stdout; a missing or failing scontrol is a UserError, never a guessed address."""
    try:
        done = subprocess.run(["scontrol", *args], capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        raise UserError(
            "inside SLURM but `scontrol` is not on PATH: cannot find the head node; "
            "add SLURM's bin directory to PATH or pass --rdzv-endpoint HOST:PORT"
        ) from None
    except subprocess.TimeoutExpired:
        raise UserError(f"`scontrol {' '.join(args)}` did not answer within 60 s") from None
    if done.returncode != 0:
        why = (done.stderr or done.stdout).strip().splitlines()
        raise UserError(f"`scontrol {' '.join(args)}` failed: {why[-1] if why else f'exit code {done.returncode}'}")
    return done.stdout


def _int_env(env: Mapping[str, str], name: str, default: int) -> int:
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
    out["PYTHONFAULTHANDLER"] = "1"
    out.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))
    out.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    if nproc is not None and not env.get("OMP_NUM_THREADS"):
        out["OMP_NUM_THREADS"] = str(max(1, len(os.sched_getaffinity(0)) // nproc))
    return out


def _split_endpoint(endpoint: str) -> tuple[str, int]:
    host, sep, port = endpoint.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UserError(f"--rdzv-endpoint {endpoint!r}: expected HOST:PORT, e.g. 10.0.0.1:29500")
    return host, int(port)


def _torchrun(
    argv: list[str], env: Mapping[str, str], nnodes: int | str, nproc: int, max_restarts: int,
    endpoint: Optional[str] = None, rdzv_id: str = "ann", rdzv_conf: str = "",
) -> list[str]:
    timeout = _int_env(env, "ANN_RDZV_TIMEOUT", DEFAULT_RDZV_TIMEOUT)
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
        "--shutdown-timeout", str(_int_env(env, "ANN_SHUTDOWN_TIMEOUT", DEFAULT_SHUTDOWN_TIMEOUT)),
        "--signals-to-handle", HANDLED_SIGNALS,
    ]
    return cmd + ["-m", "anncli", *argv]


def _describe(plan: LaunchPlan, what: str) -> LaunchPlan:
    """Lines for --dry-run: what runs where, the exact command, the network variables it inherits."""
    plan.lines = [what]
    if plan.command is not None:
        plan.lines.append(shlex.join(a for a in plan.command if a != "--dry-run"))
        net = [f"{k}={v}" for k, v in sorted(plan.env.items()) if k.startswith(NETWORK_PREFIXES)]
        fixed = [f"{k}={plan.env[k]}" for k in ("PYTHONFAULTHANDLER", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "OMP_NUM_THREADS")
                 if k in plan.env]
        plan.lines.append("environment: " + " ".join(fixed + net))
    return plan


def _worker_plan(env: Mapping[str, str]) -> LaunchPlan:
    world = int(env["WORLD_SIZE"])
    local = int(env.get("LOCAL_WORLD_SIZE", world))
    nnodes = int(env.get("GROUP_WORLD_SIZE", max(1, world // max(local, 1))))
    plan = LaunchPlan("worker", None, dict(env), world, nnodes, local)
    return _describe(plan, f"torchrun worker rank {env['RANK']} (local rank {env['LOCAL_RANK']}) on {socket.gethostname()}")


def _slurm_head(env: Mapping[str, str], scontrol: Scontrol) -> tuple[str, str]:
    """(node name, address) of the first node of this step/job, from scontrol."""
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
        raise UserError("inside SLURM but SLURM_JOB_NODELIST is not set: cannot find the head node")
    hosts = scontrol(["show", "hostnames", nodelist]).split()
    if not hosts:
        raise UserError(f"`scontrol show hostnames {nodelist}` printed no host")
    head = hosts[0]
    for token in scontrol(["show", "node", head]).split():
        if token.startswith("NodeAddr="):
            addr = token.split("=", 1)[1]
            if addr and addr != "(null)":
                return head, addr
    raise UserError(f"`scontrol show node {head}` shows no NodeAddr: cannot find the head node's address")


def _slurm_step_plan(req: LaunchRequest, env: Mapping[str, str], scontrol: Scontrol, nproc: int) -> LaunchPlan:
    nnodes = int(env.get("SLURM_STEP_NUM_NODES") or env.get("SLURM_NNODES") or 1)
    ntasks = int(env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS") or nnodes)
    if ntasks != nnodes:
        raise UserError(
            f"this srun step runs {ntasks} tasks on {nnodes} node(s); ann needs one task per node "
            "(srun --ntasks-per-node 1), it starts the per-GPU processes itself"
        )
    if req.nodes is not None and req.nodes != nnodes:
        raise UserError(f"--nodes {req.nodes} but this srun step has {nnodes} node(s)")
    job = env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID") or "0"
    if req.rdzv_endpoint:
        _split_endpoint(req.rdzv_endpoint)
        endpoint, where = req.rdzv_endpoint, "given by --rdzv-endpoint"
    else:
        head, addr = _slurm_head(env, scontrol)
        port = _int_env(env, "ANN_RDZV_PORT", 20000 + int(job) % 10000 if job.isdigit() else 29500)
        endpoint, where = f"{addr}:{port}", f"head node {head}"
    cmd = _torchrun(req.argv, env, nnodes, nproc, req.max_restarts, endpoint, rdzv_id=job)
    plan = LaunchPlan("torchrun-node", cmd, child_env(env, nproc), nnodes * nproc, nnodes, nproc, endpoint)
    node = env.get("SLURMD_NODENAME", socket.gethostname())
    return _describe(plan, f"torchrun agent on SLURM node {node}, c10d rendezvous at {endpoint} ({where}), id {job}")


def _slurm_alloc_plan(req: LaunchRequest, env: Mapping[str, str], nproc: int) -> LaunchPlan:
    allocated = int(env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES") or 1)
    nnodes = allocated if req.nodes is None else req.nodes
    if nnodes > allocated:
        raise UserError(f"--nodes {nnodes} but this SLURM allocation has {allocated} node(s)")
    cmd = ["srun", "--nodes", str(nnodes), "--ntasks", str(nnodes), "--ntasks-per-node", "1", "--kill-on-bad-exit=1"]
    # Slurm 22.05+ srun does not inherit the job's --cpus-per-task; without it each agent gets one core.
    if env.get("SLURM_CPUS_PER_TASK"):
        cmd.append(f"--cpus-per-task={env['SLURM_CPUS_PER_TASK']}")
    cmd += [sys.executable, "-m", "anncli", *req.argv]
    plan = LaunchPlan("srun", cmd, child_env(env), nnodes * nproc, nnodes, nproc)
    return _describe(plan, f"srun: one torchrun agent on each of {nnodes} node(s) of SLURM job {env.get('SLURM_JOB_ID')}")


def _plain_plan(req: LaunchRequest, env: Mapping[str, str], nproc: int) -> LaunchPlan:
    nnodes = req.nodes or 1
    if nnodes > 1 and not req.rdzv_endpoint:
        raise UserError(
            f"--nodes {nnodes} needs --rdzv-endpoint HOST:PORT: the address of one node that every node can reach "
            "and a free port there, the same on every node (e.g. --rdzv-endpoint 10.0.0.1:29500)"
        )
    if req.node_rank is not None and req.node_rank >= nnodes:
        raise UserError(f"--node-rank {req.node_rank} must be smaller than --nodes {nnodes}")
    if req.rdzv_endpoint:
        _split_endpoint(req.rdzv_endpoint)
        rdzv_id = env.get("ANN_RDZV_ID") or "ann"
        # No --node-rank for torchrun: c10d assigns node ranks by arrival (torchrun ignores it and warns).
        cmd = _torchrun(req.argv, env, nnodes, nproc, req.max_restarts, req.rdzv_endpoint, rdzv_id)
        plan = LaunchPlan("torchrun-node", cmd, child_env(env, nproc), nnodes * nproc, nnodes, nproc, req.rdzv_endpoint)
        return _describe(plan, f"torchrun agent, c10d rendezvous at {req.rdzv_endpoint} (id {rdzv_id}, node ranks "
                               "assigned by the rendezvous)")
    if nproc > 1:
        cmd = _torchrun(req.argv, env, 1, nproc, req.max_restarts)
        return _describe(LaunchPlan("torchrun-standalone", cmd, child_env(env, nproc), nproc, 1, nproc), "torchrun --standalone")
    return _describe(LaunchPlan("in-process", None, dict(env), 1, 1, 1), "in this process")


def _k8s_plan(req: LaunchRequest, env: Mapping[str, str], gpus: Callable[[], int]) -> LaunchPlan:
    """A pod of a Kubeflow PyTorchJob (cluster/pytorchjob.py): this pod's torchrun agent. The PET_* variables
    are not passed on: torchrun reads PET_* as its options' defaults, and PET_STANDALONE would override
    the rendezvous."""
    job = read_pytorchjob(env, req.nodes)
    endpoint = req.rdzv_endpoint or job.endpoint
    _split_endpoint(endpoint)
    nproc = req.nproc_per_node or job.nproc or max(1, gpus())
    restarts = req.max_restarts or job.max_restarts  # --max-restarts wins over elasticPolicy.maxRestarts
    cmd = _torchrun(req.argv, env, job.nnodes, nproc, restarts, endpoint, job.rdzv_id, job.rdzv_conf)
    passed = child_env({k: v for k, v in env.items() if not k.startswith("PET_")}, nproc)
    plan = LaunchPlan("torchrun-node", cmd, passed, job.most * nproc, job.most, nproc, endpoint)
    return _describe(plan, f"torchrun agent in Kubernetes pod {env.get('HOSTNAME', socket.gethostname())}, c10d "
                           f"rendezvous at {endpoint} (id {job.rdzv_id}, {job.nnodes} pod(s), max restarts {restarts})")


def where_am_i(env: Mapping[str, str]) -> str:
    """"worker", "kubernetes-pod", "slurm-step", "slurm-allocation" or "shell"."""
    if all(env.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK")):
        return "worker"
    if in_pytorchjob(env):
        return "kubernetes-pod"
    if env.get("SLURM_JOB_ID") and env.get("SLURM_STEP_ID"):
        return "slurm-step"
    if env.get("SLURM_JOB_ID"):
        return "slurm-allocation"
    return "shell"


def plan_launch(
    req: LaunchRequest,
    env: Optional[Mapping[str, str]] = None,
    scontrol: Scontrol = run_scontrol,
    gpus: Callable[[], int] = visible_gpus,
) -> LaunchPlan:
    """The row of the launch matrix for this request and environment, as a plan to execute."""
    env = dict(os.environ if env is None else env)
    where = where_am_i(env)
    if where == "worker":
        return _worker_plan(env)
    if where == "kubernetes-pod":
        return _k8s_plan(req, env, gpus)
    nproc = req.nproc_per_node or max(1, gpus())
    if where == "slurm-step":
        return _slurm_step_plan(req, env, scontrol, nproc)
    if where == "slurm-allocation" and not req.rdzv_endpoint:
        return _slurm_alloc_plan(req, env, nproc)
    return _plain_plan(req, env, nproc)
