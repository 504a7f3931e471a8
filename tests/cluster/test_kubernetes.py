"""Kubernetes: the PyTorchJob template, the launch row of a pod, and two "pods" (local processes with the
environment the Kubeflow training operator sets) training the demo bitwise like `--nproc-per-node 2`."""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from anncli.cluster.env import environment_lines
from anncli.cluster.command import LaunchRequest
from anncli.cluster.launch import plan_launch
from anncli.errors import UserError
from test_multinode import ROOT, checkpoints, env, free_port, start, synth, train_cmd  # noqa: F401 (synth: fixture)

# What the operator (kubeflow/training-operator, pkg/controller.v1/pytorch) sets in a pod of an elastic
# PyTorchJob (elasticPolicy) and of one with a Master replica.
ELASTIC = {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "HOSTNAME": "ann-worker-1", "PYTHONUNBUFFERED": "0",
           "PET_RDZV_ENDPOINT": "ann-worker-0:23456", "PET_RDZV_BACKEND": "c10d", "PET_NNODES": "2:4",
           "PET_MAX_RESTARTS": "10", "PET_NPROC_PER_NODE": "8"}
MASTER = {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "HOSTNAME": "ann-worker-0", "PYTHONUNBUFFERED": "0",
          "MASTER_ADDR": "ann-master-0", "MASTER_PORT": "23456", "WORLD_SIZE": "3", "RANK": "1"}


def _option(cmd: list[str], name: str) -> str:
    return cmd[cmd.index(name) + 1]


def test_an_elastic_pytorchjob_pod_runs_a_torchrun_agent_from_the_operator_variables():
    plan = plan_launch(LaunchRequest(argv=["train", "r.yaml"]), ELASTIC, gpus=lambda: 0)
    assert plan.kind == "torchrun-node" and plan.world_size == 32 and plan.nproc_per_node == 8
    cmd = plan.command
    assert _option(cmd, "--rdzv-endpoint") == "ann-worker-0:23456" and _option(cmd, "--rdzv-backend") == "c10d"
    assert _option(cmd, "--nnodes") == "2:4" and _option(cmd, "--nproc-per-node") == "8"
    assert _option(cmd, "--max-restarts") == "10"
    assert cmd[-3:] == ["anncli", "train", "r.yaml"]
    assert not any(k.startswith("PET_") for k in plan.env)  # torchrun would read them as its defaults
    assert "Kubernetes pod ann-worker-1" in plan.lines[0]


def test_a_pytorchjob_pod_with_a_master_rendezvous_at_the_master_and_counts_pods():
    plan = plan_launch(LaunchRequest(argv=["train", "r.yaml"], nproc_per_node=2, max_restarts=3), MASTER,
                       gpus=lambda: 0)
    assert _option(plan.command, "--rdzv-endpoint") == "ann-master-0:23456"
    assert _option(plan.command, "--nnodes") == "3" and plan.world_size == 6
    assert _option(plan.command, "--max-restarts") == "3"


def test_bad_operator_variables_are_one_line_errors():
    with pytest.raises(UserError, match="PET_NNODES"):
        plan_launch(LaunchRequest(argv=["train"]), {**ELASTIC, "PET_NNODES": "two"}, gpus=lambda: 0)
    with pytest.raises(UserError, match="PET_RDZV_BACKEND"):
        plan_launch(LaunchRequest(argv=["train"]), {**ELASTIC, "PET_RDZV_BACKEND": "etcd"}, gpus=lambda: 0)
    with pytest.raises(UserError, match="--nodes 8"):
        plan_launch(LaunchRequest(argv=["train"], nodes=8), ELASTIC, gpus=lambda: 0)
    with pytest.raises(UserError, match=r"PET_NNODES='4:2': the smallest number of pods is above the largest"):
        plan_launch(LaunchRequest(argv=["train"]), {**ELASTIC, "PET_NNODES": "4:2"}, gpus=lambda: 0)


def test_ann_env_shows_the_pod_context():
    lines = environment_lines(ELASTIC)
    assert "launch context: kubernetes-pod" in lines
    pod = next(line for line in lines if line.startswith("Kubernetes: "))
    assert "HOSTNAME=ann-worker-1" in pod and "PET_RDZV_ENDPOINT=ann-worker-0:23456" in pod
    assert "Kubernetes: not inside a pod" in environment_lines({})


def test_the_pytorchjob_template_trains_with_ann_on_the_shared_volume():
    job = yaml.safe_load((ROOT / "k8s" / "pytorchjob.yaml").read_text())
    assert job["apiVersion"] == "kubeflow.org/v1" and job["kind"] == "PyTorchJob"
    elastic = job["spec"]["elasticPolicy"]
    assert elastic["rdzvBackend"] == "c10d" and 1 <= elastic["minReplicas"] <= elastic["maxReplicas"]
    assert elastic["maxRestarts"] >= 1 and "nProcPerNode" not in elastic  # deprecated: the operator warns
    per_pod = job["spec"]["nprocPerNode"]
    assert isinstance(per_pod, str) and int(per_pod) >= 1  # a string in the CRD ("8", or auto/cpu/gpu)
    worker = job["spec"]["pytorchReplicaSpecs"]["Worker"]
    assert elastic["minReplicas"] <= worker["replicas"] <= elastic["maxReplicas"]
    pod = worker["template"]["spec"]
    container = next(c for c in pod["containers"] if c["name"] == "pytorch")  # the operator's container name
    assert any(p["name"] == "pytorchjob-port" for p in container["ports"])  # PET_RDZV_ENDPOINT's port
    assert container["resources"]["limits"]["nvidia.com/gpu"] == int(per_pod)
    script = " ".join(container["command"][2:] + container.get("args", []))
    words = shlex.split(script)
    assert words[:3] == ["exec", "ann", "train"]  # exec: SIGTERM from the kubelet reaches ann itself
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    used = [w for w in words if w.startswith("/")] + [w.split("=", 1)[1] for w in words if w.startswith("data.root=")]
    assert used and all(any(p.startswith(m + "/") for m in mounts) for p in used), (used, mounts)
    claims = {v["name"]: v for v in pod["volumes"]}
    assert "persistentVolumeClaim" in claims[mounts["/shared"]]
    grace = pod["terminationGracePeriodSeconds"]
    shutdown = next(int(e["value"]) for e in container["env"] if e["name"] == "ANN_SHUTDOWN_TIMEOUT")
    assert 0 < shutdown < grace


def _template_pod(job: dict, nnodes: str | None = None) -> tuple[dict, list[str]]:
    """(what the operator sets in a pod of the template's job, the `ann train` arguments of its container)."""
    elastic, worker = job["spec"]["elasticPolicy"], job["spec"]["pytorchReplicaSpecs"]["Worker"]
    container = worker["template"]["spec"]["containers"][0]
    env = {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "HOSTNAME": f"{job['metadata']['name']}-worker-0",
           "PET_RDZV_ENDPOINT": f"{job['metadata']['name']}-worker-0:23456", "PET_RDZV_BACKEND": "c10d",
           "PET_NNODES": nnodes or f"{elastic['minReplicas']}:{elastic['maxReplicas']}",
           "PET_NPROC_PER_NODE": job["spec"]["nprocPerNode"], "PET_MAX_RESTARTS": str(elastic["maxRestarts"])}
    return env, shlex.split(" ".join(container["args"]))[3:]


def test_the_pytorchjob_templates_range_keeps_one_effective_batch_at_every_size(tmp_path):
    """Its recipe at every pod count of its range (a new run), where the 2:4 it had refuses 3 pods."""
    from anncli.recipe import load_recipe
    from anncli.train.loop import TrainOptions
    from anncli.train.plan import plan_split, range_splits

    job = yaml.safe_load((ROOT / "k8s" / "pytorchjob.yaml").read_text())
    env, args = _template_pod(job)
    recipe_path, sets = args[0], [args[i + 1] for i, a in enumerate(args) if a == "--set"]
    recipe = load_recipe(ROOT / recipe_path, sets)
    plan = plan_launch(LaunchRequest(argv=["train", *args]), env, gpus=lambda: 0)
    assert plan.elastic and plan.nproc_per_node == int(job["spec"]["nprocPerNode"])
    splits = range_splits(recipe, plan)
    assert list(splits) == plan.node_counts() and len({s.effective_batch for s in splits.values()}) == 1
    plan_split(recipe, TrainOptions(recipe_path, tmp_path / "run"), plan)
    old = plan_launch(LaunchRequest(argv=["train", *args]), _template_pod(job, "2:4")[0], gpus=lambda: 0)
    with pytest.raises(UserError, match=r"24 ranks \(3 node\(s\)\) cannot split 32.*the sizes that can: 2 or 4 node"):
        range_splits(recipe, old)


def _weights(work: Path) -> dict:
    return torch.load(work / "checkpoints" / "step-000002" / "model.pt", weights_only=True)


@pytest.mark.slow  # two 2-process trainings: about 90 s on 2 busy cores
def test_two_pytorchjob_pods_train_the_demo_bitwise_like_two_local_processes(synth, tmp_path):
    local = tmp_path / "local"
    done = subprocess.run(train_cmd(synth, local, 2, 100, "--nproc-per-node", "2"), cwd=ROOT, env=env(),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    pods, port = tmp_path / "pods", free_port()
    procs = [start(train_cmd(synth, pods, 2, 100), tmp_path / f"pod{r}.log", KUBERNETES_SERVICE_HOST="10.96.0.1",
                   HOSTNAME=f"ann-worker-{r}", PYTHONUNBUFFERED="0", PET_RDZV_ENDPOINT=f"127.0.0.1:{port}",
                   PET_RDZV_BACKEND="c10d", PET_NNODES="2:2", PET_NPROC_PER_NODE="1", PET_MAX_RESTARTS="0",
                   ANN_RDZV_TIMEOUT="300")
             for r in (0, 1)]
    codes = [p.wait(timeout=600) for p in procs]
    logs = "\n".join((tmp_path / f"pod{r}.log").read_text() for r in (0, 1))
    assert codes == [0, 0], logs[-3000:]
    assert "Kubernetes pod ann-worker-" in logs and "rank 1/2" in logs
    assert checkpoints(pods) == checkpoints(local) == ["step-000002"]
    a, b = _weights(local), _weights(pods)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
