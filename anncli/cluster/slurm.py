"""The SLURM rows of the launch matrix: inside an allocation without a step (`srun` one agent per node) and
inside an srun step (this node's torchrun agent, its rendezvous at the first node of the step).

Environment variables read here:
    ANN_RDZV_PORT          rendezvous port inside SLURM (default 20000 + job id % 10000)
"""

from __future__ import annotations

import socket
import subprocess
import sys
from typing import Callable, Mapping

from anncli.cluster.command import LaunchPlan, LaunchRequest, child_env, describe, int_env, split_endpoint, torchrun_command
from anncli.errors import UserError

Scontrol = Callable[[list[str]], str]


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


def slurm_step_plan(req: LaunchRequest, env: Mapping[str, str], scontrol: Scontrol, nproc: int) -> LaunchPlan:
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
        split_endpoint(req.rdzv_endpoint)
        endpoint, where = req.rdzv_endpoint, "given by --rdzv-endpoint"
    else:
        head, addr = _slurm_head(env, scontrol)
        port = int_env(env, "ANN_RDZV_PORT", 20000 + int(job) % 10000 if job.isdigit() else 29500)
        endpoint, where = f"{addr}:{port}", f"head node {head}"
    cmd = torchrun_command(req.argv, env, nnodes, nproc, req.max_restarts, endpoint, rdzv_id=job)
    plan = LaunchPlan("torchrun-node", cmd, child_env(env, nproc), nnodes * nproc, nnodes, nproc, endpoint)
    node = env.get("SLURMD_NODENAME", socket.gethostname())
    return describe(plan, f"torchrun agent on SLURM node {node}, c10d rendezvous at {endpoint} ({where}), id {job}")


def slurm_alloc_plan(req: LaunchRequest, env: Mapping[str, str], nproc: int) -> LaunchPlan:
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
    return describe(plan, f"srun: one torchrun agent on each of {nnodes} node(s) of SLURM job {env.get('SLURM_JOB_ID')}")
