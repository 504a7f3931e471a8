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
The SLURM rows are in `slurm.py`, the pod row in `pytorchjob.py`, the pieces every row uses (the plan,
torchrun's command line, the child's environment) in `command.py`.

Environment variables read here:
    ANN_RDZV_ID            rendezvous id outside SLURM (default "ann"; inside SLURM: the job id)
"""

from __future__ import annotations

import os
import socket
import sys
from typing import Callable, Mapping, Optional, Sequence

from anncli.cluster.command import LaunchPlan, LaunchRequest, child_env, describe, split_endpoint, torchrun_command
from anncli.cluster.pytorchjob import in_pytorchjob, pod_plan
from anncli.cluster.slurm import Scontrol, run_scontrol, slurm_alloc_plan, slurm_step_plan
from anncli.errors import UserError


def request_for(verb: str, argv: Optional[Sequence[str]] = None, **options) -> LaunchRequest:
    """The request of `ann VERB …`: the verb and everything after it on the command line (`sys.argv` unless
    given), which torchrun and srun run again on every node, and the launch options."""
    argv = list(sys.argv if argv is None else argv)
    rest = argv[argv.index(verb) + 1 :] if verb in argv else []
    return LaunchRequest(argv=[verb, *rest], **options)


def visible_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _worker_plan(env: Mapping[str, str]) -> LaunchPlan:
    world = int(env["WORLD_SIZE"])
    local = int(env.get("LOCAL_WORLD_SIZE", world))
    nnodes = int(env.get("GROUP_WORLD_SIZE", max(1, world // max(local, 1))))
    plan = LaunchPlan("worker", None, dict(env), world, nnodes, local)
    return describe(plan, f"torchrun worker rank {env['RANK']} (local rank {env['LOCAL_RANK']}) on {socket.gethostname()}")


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
        split_endpoint(req.rdzv_endpoint)
        rdzv_id = env.get("ANN_RDZV_ID") or "ann"
        # No --node-rank for torchrun: c10d assigns node ranks by arrival (torchrun ignores it and warns).
        cmd = torchrun_command(req.argv, env, nnodes, nproc, req.max_restarts, req.rdzv_endpoint, rdzv_id)
        plan = LaunchPlan("torchrun-node", cmd, child_env(env, nproc), nnodes * nproc, nnodes, nproc, req.rdzv_endpoint)
        return describe(plan, f"torchrun agent, c10d rendezvous at {req.rdzv_endpoint} (id {rdzv_id}, node ranks "
                              "assigned by the rendezvous)")
    if nproc > 1:
        cmd = torchrun_command(req.argv, env, 1, nproc, req.max_restarts)
        return describe(LaunchPlan("torchrun-standalone", cmd, child_env(env, nproc), nproc, 1, nproc), "torchrun --standalone")
    return describe(LaunchPlan("in-process", None, dict(env), 1, 1, 1), "in this process")


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
        return pod_plan(req, env, gpus)
    nproc = req.nproc_per_node or max(1, gpus())
    if where == "slurm-step":
        return slurm_step_plan(req, env, scontrol, nproc)
    if where == "slurm-allocation" and not req.rdzv_endpoint:
        return slurm_alloc_plan(req, env, nproc)
    return _plain_plan(req, env, nproc)
