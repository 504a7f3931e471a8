"""A pod of a Kubeflow PyTorchJob: the variables the training operator sets, read into one rendezvous.

What kubeflow/training-operator (pkg/controller.v1/pytorch) sets in every pod:
    elastic (spec.elasticPolicy)   PET_RDZV_ENDPOINT=<job>-worker-0:<pytorchjob-port>, PET_RDZV_BACKEND,
                                   PET_NNODES=N or MIN:MAX, and when given PET_NPROC_PER_NODE,
                                   PET_MAX_RESTARTS, PET_RDZV_ID, PET_RDZV_CONF
    with a Master replica          MASTER_ADDR=<job>-master-0, MASTER_PORT, WORLD_SIZE=<pods>, RANK=<pod index>
Both become a c10d rendezvous (node ranks follow arrival) of this pod's torchrun agent (`pod_plan`).
Kubernetes itself sets KUBERNETES_SERVICE_HOST.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import Callable, Mapping, Optional

from anncli.cluster.command import (ELASTIC_WORLD_ENV, LaunchPlan, LaunchRequest, child_env, describe, split_endpoint,
                                    torchrun_command)
from anncli.errors import UserError


@dataclass
class PodJob:
    endpoint: str
    nnodes: str  # torchrun's --nnodes: "N" or "MIN:MAX"
    least: int  # the smallest number of pods
    most: int  # the largest number of pods
    nproc: Optional[int]  # PET_NPROC_PER_NODE, when a number
    max_restarts: int
    rdzv_id: str
    rdzv_conf: str


def in_pytorchjob(env: Mapping[str, str]) -> bool:
    """A pod that the Kubeflow training operator started: Kubernetes plus its rendezvous variables."""
    return bool(env.get("KUBERNETES_SERVICE_HOST")) and bool(
        env.get("PET_RDZV_ENDPOINT") or env.get("PET_NNODES") or (env.get("MASTER_ADDR") and env.get("WORLD_SIZE")))


def _nnodes(env: Mapping[str, str], nodes: Optional[int]) -> tuple[str, int, int]:
    text = (env.get("PET_NNODES") or env.get("WORLD_SIZE") or "").strip()
    parts = text.split(":")
    if not text or len(parts) > 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise UserError(f"PET_NNODES/WORLD_SIZE={text!r}: expected the number of pods, N or MIN:MAX, as the "
                        "PyTorchJob operator sets it")
    least, most = int(parts[0]), int(parts[-1])
    if least > most:
        raise UserError(f"PET_NNODES={text!r}: the smallest number of pods is above the largest "
                        "(elasticPolicy.minReplicas > maxReplicas)")
    if nodes is not None and not least <= nodes <= most:
        raise UserError(f"--nodes {nodes} but this PyTorchJob has {text} pod(s)")
    return text, least, most


def read_pytorchjob(env: Mapping[str, str], nodes: Optional[int] = None) -> PodJob:
    """The rendezvous of this pod's job; a variable that makes no sense is one UserError line."""
    if env.get("PET_RDZV_ENDPOINT"):
        endpoint = env["PET_RDZV_ENDPOINT"]
    elif env.get("MASTER_ADDR") and env.get("MASTER_PORT"):
        endpoint = f"{env['MASTER_ADDR']}:{env['MASTER_PORT']}"
    else:
        raise UserError("inside a Kubernetes pod with PET_NNODES but neither PET_RDZV_ENDPOINT nor MASTER_ADDR/"
                        "MASTER_PORT: run `ann train` in a PyTorchJob (k8s/pytorchjob.yaml) or pass --rdzv-endpoint")
    if env.get("PET_RDZV_BACKEND", "c10d") != "c10d":
        raise UserError(f"PET_RDZV_BACKEND={env['PET_RDZV_BACKEND']!r}: ann rendezvous with c10d; set "
                        "elasticPolicy.rdzvBackend: c10d")
    nnodes, least, most = _nnodes(env, nodes)
    per_pod = env.get("PET_NPROC_PER_NODE", "")  # may be "auto", "gpu" or "cpu": then ann counts the GPUs
    restarts = env.get("PET_MAX_RESTARTS", "0").strip() or "0"
    if not restarts.isdigit():
        raise UserError(f"PET_MAX_RESTARTS={restarts!r}: expected a whole number (elasticPolicy.maxRestarts)")
    return PodJob(endpoint=endpoint, nnodes=nnodes, least=least, most=most,
                  nproc=int(per_pod) if per_pod.isdigit() else None, max_restarts=int(restarts),
                  rdzv_id=env.get("PET_RDZV_ID") or env.get("ANN_RDZV_ID") or "ann", rdzv_conf=env.get("PET_RDZV_CONF", ""))


def pod_plan(req: LaunchRequest, env: Mapping[str, str], gpus: Callable[[], int]) -> LaunchPlan:
    """A pod of a Kubeflow PyTorchJob: this pod's torchrun agent. The PET_* variables are not passed on:
    torchrun reads PET_* as its options' defaults, and PET_STANDALONE would override the rendezvous."""
    job = read_pytorchjob(env, req.nodes)
    endpoint = req.rdzv_endpoint or job.endpoint
    split_endpoint(endpoint)
    nproc = req.nproc_per_node or job.nproc or max(1, gpus())
    restarts = req.max_restarts or job.max_restarts  # --max-restarts wins over elasticPolicy.maxRestarts
    cmd = torchrun_command(req.argv, env, job.nnodes, nproc, restarts, endpoint, job.rdzv_id, job.rdzv_conf)
    passed = child_env({k: v for k, v in env.items() if not k.startswith("PET_")}, nproc)
    if job.least < job.most:
        passed[ELASTIC_WORLD_ENV] = str(job.most * nproc)
    source = f"PET_NNODES={job.nnodes}" if env.get("PET_NNODES") else f"WORLD_SIZE={job.nnodes}"
    plan = LaunchPlan("torchrun-node", cmd, passed, job.most * nproc, job.most, nproc, endpoint,
                      min_nnodes=job.least, nnodes_source=source)
    return describe(plan, f"torchrun agent in Kubernetes pod {env.get('HOSTNAME', socket.gethostname())}, c10d "
                          f"rendezvous at {endpoint} (id {job.rdzv_id}, {job.nnodes} pod(s), max restarts {restarts})")
