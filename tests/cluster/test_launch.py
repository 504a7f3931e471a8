"""The launch matrix row by row: pure plans from (request, environment)."""

from __future__ import annotations

import os
import sys

import pytest

from anncli.cluster import command, launch
from anncli.errors import UserError
from anncli.cluster.command import LaunchRequest
from anncli.cluster.launch import plan_launch

ARGV = ["train", "recipes/demo.yaml", "--set", "train.iters=2"]


def req(**kw) -> LaunchRequest:
    return LaunchRequest(argv=list(ARGV), **kw)


def fake_scontrol(calls: list | None = None, addr: str = "10.1.2.3"):
    def scontrol(args: list[str]) -> str:
        if calls is not None:
            calls.append(args)
        if args[:2] == ["show", "hostnames"]:
            return "gpu-a17\ngpu-a18\n"
        if args[:2] == ["show", "node"]:
            return f"NodeName={args[2]} Arch=x86_64 CoresPerSocket=32\n   NodeAddr={addr} NodeHostName={args[2]} Version=22.05\n"
        raise AssertionError(args)

    return scontrol


def no_scontrol(args):
    raise AssertionError("scontrol must not be called here")


def opt(cmd: list[str], name: str) -> str:
    return cmd[cmd.index(name) + 1]


def tail(cmd: list[str]) -> list[str]:
    """What torchrun/srun runs: everything from `-m anncli` on."""
    i = cmd.index("anncli")
    return cmd[i + 1 :]


SLURM_ALLOC = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "gpu-a[17-18]", "SLURM_JOB_NUM_NODES": "2",
               "SLURM_NNODES": "2", "SLURM_CPUS_PER_TASK": "16"}
SLURM_STEP = {**SLURM_ALLOC, "SLURM_STEP_ID": "0", "SLURM_STEP_NODELIST": "gpu-a[17-18]", "SLURM_STEP_NUM_NODES": "2",
              "SLURM_STEP_NUM_TASKS": "2", "SLURM_NODEID": "1", "SLURMD_NODENAME": "gpu-a18"}


def test_plain_shell_one_process_runs_in_process():
    plan = plan_launch(req(), env={"PATH": "/bin"}, scontrol=no_scontrol, gpus=lambda: 0)
    assert (plan.kind, plan.command, plan.world_size) == ("in-process", None, 1)


def test_plain_shell_one_gpu_runs_in_process():
    plan = plan_launch(req(), env={}, scontrol=no_scontrol, gpus=lambda: 1)
    assert plan.kind == "in-process"


def test_nproc_defaults_to_visible_gpus():
    plan = plan_launch(req(), env={}, scontrol=no_scontrol, gpus=lambda: 4)
    assert plan.kind == "torchrun-standalone"
    assert (plan.world_size, plan.nproc_per_node) == (4, 4)
    assert opt(plan.command, "--nproc-per-node") == "4"


def test_standalone_torchrun_for_several_processes_on_one_node():
    plan = plan_launch(req(nproc_per_node=2, max_restarts=3), env={"NCCL_SOCKET_IFNAME": "eth0"},
                       scontrol=no_scontrol, gpus=lambda: 0)
    cmd = plan.command
    assert plan.kind == "torchrun-standalone" and plan.world_size == 2
    assert cmd[:3] == [sys.executable, "-m", "anncli.cluster.torchrun"]  # torch.distributed.run's main
    assert "--standalone" in cmd and "--rdzv-endpoint" not in cmd
    assert opt(cmd, "--nnodes") == "1" and opt(cmd, "--max-restarts") == "3"
    assert opt(cmd, "--rdzv-conf") == f"join_timeout={command.DEFAULT_RDZV_TIMEOUT}"
    assert "SIGUSR1" in opt(cmd, "--signals-to-handle")
    assert tail(cmd) == ARGV
    assert plan.env["NCCL_SOCKET_IFNAME"] == "eth0" and plan.env["PYTHONFAULTHANDLER"] == "1"
    assert plan.env["TORCH_EXTENSIONS_DIR"] == os.path.join(sys.prefix, "torch_extensions")
    assert any("NCCL_SOCKET_IFNAME=eth0" in line for line in plan.lines)


def test_workers_get_a_fresh_store_per_restart_and_explicit_threads():
    plan = plan_launch(req(nproc_per_node=2), env={}, gpus=lambda: 0)
    assert plan.env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] == "1"  # see command.child_env
    assert plan.env["OMP_NUM_THREADS"] == str(max(1, len(os.sched_getaffinity(0)) // 2))
    assert any("TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in line for line in plan.lines)
    kept = plan_launch(req(nproc_per_node=2), env={"OMP_NUM_THREADS": "3"}, gpus=lambda: 0)
    assert kept.env["OMP_NUM_THREADS"] == "3"


def test_torch_extensions_dir_is_kept_when_set():
    plan = plan_launch(req(nproc_per_node=2), env={"TORCH_EXTENSIONS_DIR": "/cache/ext"}, gpus=lambda: 0)
    assert plan.env["TORCH_EXTENSIONS_DIR"] == "/cache/ext"


def test_several_nodes_without_endpoint_is_a_clear_error():
    with pytest.raises(UserError, match="--rdzv-endpoint HOST:PORT"):
        plan_launch(req(nodes=2), env={}, scontrol=no_scontrol, gpus=lambda: 0)


@pytest.mark.parametrize("endpoint", ["host", "host:", ":29500", "host:http", "host:70000"])
def test_bad_endpoint_is_a_clear_error(endpoint):
    with pytest.raises(UserError, match="HOST:PORT"):
        plan_launch(req(nodes=2, rdzv_endpoint=endpoint), env={}, gpus=lambda: 0)


def test_node_rank_must_be_below_nodes():
    with pytest.raises(UserError, match="--node-rank 2"):
        plan_launch(req(nodes=2, node_rank=2, rdzv_endpoint="h:1234"), env={}, gpus=lambda: 0)


def test_plain_shell_several_nodes_is_a_c10d_node_agent():
    plan = plan_launch(req(nodes=2, node_rank=1, rdzv_endpoint="10.0.0.1:29500", nproc_per_node=4),
                       env={"ANN_RDZV_TIMEOUT": "30"}, scontrol=no_scontrol, gpus=lambda: 0)
    cmd = plan.command
    assert plan.kind == "torchrun-node" and plan.world_size == 8 and plan.nnodes == 2
    assert opt(cmd, "--rdzv-backend") == "c10d" and opt(cmd, "--rdzv-endpoint") == "10.0.0.1:29500"
    assert opt(cmd, "--nnodes") == "2" and opt(cmd, "--rdzv-id") == "ann"
    assert "--node-rank" not in cmd  # inert under c10d; torchrun would only warn about it
    assert opt(cmd, "--rdzv-conf") == "join_timeout=30"
    assert "--standalone" not in cmd and tail(cmd) == ARGV


def test_rdzv_timeout_must_be_a_number():
    with pytest.raises(UserError, match="ANN_RDZV_TIMEOUT"):
        plan_launch(req(nproc_per_node=2), env={"ANN_RDZV_TIMEOUT": "soon"}, gpus=lambda: 0)


def test_torchrun_worker_runs_in_process():
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "GROUP_WORLD_SIZE": "2",
           **SLURM_STEP}
    plan = plan_launch(req(nodes=2), env=env, scontrol=no_scontrol, gpus=lambda: 8)
    assert (plan.kind, plan.command, plan.world_size, plan.nnodes, plan.nproc_per_node) == ("worker", None, 4, 2, 2)
    assert "rank 3" in plan.lines[0]


def test_slurm_allocation_without_step_sruns_one_agent_per_node():
    plan = plan_launch(req(), env={**SLURM_ALLOC, "NCCL_DEBUG": "INFO"}, scontrol=no_scontrol, gpus=lambda: 4)
    cmd = plan.command
    assert plan.kind == "srun" and plan.world_size == 8
    assert cmd[0] == "srun" and opt(cmd, "--nodes") == "2" and opt(cmd, "--ntasks-per-node") == "1"
    assert "--kill-on-bad-exit=1" in cmd and "--cpus-per-task=16" in cmd
    assert "torch.distributed.run" not in cmd
    assert cmd[cmd.index(sys.executable):] == [sys.executable, "-m", "anncli", *ARGV]
    assert plan.env["NCCL_DEBUG"] == "INFO"


def test_slurm_allocation_rejects_more_nodes_than_allocated():
    with pytest.raises(UserError, match="--nodes 3 but this SLURM allocation has 2"):
        plan_launch(req(nodes=3), env=SLURM_ALLOC, scontrol=no_scontrol, gpus=lambda: 0)


def test_slurm_step_is_a_node_agent_at_the_head_node_address():
    calls: list = []
    plan = plan_launch(req(), env=SLURM_STEP, scontrol=fake_scontrol(calls), gpus=lambda: 4)
    cmd = plan.command
    assert plan.kind == "torchrun-node" and plan.world_size == 8 and plan.nnodes == 2
    assert calls == [["show", "hostnames", "gpu-a[17-18]"], ["show", "node", "gpu-a17"]]
    assert opt(cmd, "--rdzv-endpoint") == f"10.1.2.3:{20000 + 4242}"
    assert opt(cmd, "--rdzv-id") == "4242" and opt(cmd, "--nnodes") == "2"
    assert "--node-rank" not in cmd  # c10d assigns node ranks; SLURM_NODEID is not the rendezvous rank
    assert tail(cmd) == ARGV


def test_slurm_step_port_override_and_explicit_endpoint():
    plan = plan_launch(req(), env={**SLURM_STEP, "ANN_RDZV_PORT": "31000"}, scontrol=fake_scontrol(), gpus=lambda: 1)
    assert opt(plan.command, "--rdzv-endpoint") == "10.1.2.3:31000"
    plan = plan_launch(req(rdzv_endpoint="ib0-head:29400"), env=SLURM_STEP, scontrol=no_scontrol, gpus=lambda: 1)
    assert opt(plan.command, "--rdzv-endpoint") == "ib0-head:29400"


def test_slurm_step_without_scontrol_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(UserError, match="scontrol"):
        plan_launch(req(), env=SLURM_STEP, gpus=lambda: 1)


def test_slurm_step_with_failing_scontrol_is_an_error_not_localhost():
    def broken(args):
        raise UserError("`scontrol show hostnames` failed: slurm_load_partitions: Unable to contact slurm controller")

    with pytest.raises(UserError, match="Unable to contact"):
        plan_launch(req(), env=SLURM_STEP, scontrol=broken, gpus=lambda: 1)


def test_slurm_step_without_node_addr_is_an_error():
    with pytest.raises(UserError, match="NodeAddr"):
        plan_launch(req(), env=SLURM_STEP, scontrol=fake_scontrol(addr="(null)"), gpus=lambda: 1)


def test_slurm_step_with_one_task_per_gpu_is_rejected():
    env = {**SLURM_STEP, "SLURM_STEP_NUM_TASKS": "8"}
    with pytest.raises(UserError, match="one task per node"):
        plan_launch(req(), env=env, scontrol=fake_scontrol(), gpus=lambda: 4)


def test_slurm_step_rejects_a_different_node_count():
    with pytest.raises(UserError, match="--nodes 4 but this srun step has 2"):
        plan_launch(req(nodes=4), env=SLURM_STEP, scontrol=fake_scontrol(), gpus=lambda: 4)


def test_request_for_takes_the_verb_and_everything_after_it_from_argv():
    request = launch.request_for("eval", ["/usr/bin/ann", "eval", "r.yaml", "--flip", "--nodes", "2"], nodes=2)
    assert request.argv == ["eval", "r.yaml", "--flip", "--nodes", "2"] and request.nodes == 2
    assert launch.request_for("train", ["python", "-c", "..."]).argv == ["train"]


def test_explicit_one_node_in_a_bigger_allocation_runs_on_one_node():
    plan = plan_launch(req(nodes=1), env=SLURM_ALLOC, scontrol=no_scontrol, gpus=lambda: 4)
    assert opt(plan.command, "--nodes") == "1" and plan.world_size == 4
    everything = plan_launch(req(), env=SLURM_ALLOC, scontrol=no_scontrol, gpus=lambda: 4)
    assert opt(everything.command, "--nodes") == "2" and everything.world_size == 8
