"""The all-reduce batch norm on 2 real gloo ranks equals plain BatchNorm on the concatenated batch."""

import os
import uuid

import pytest
import torch
from torch import nn
from torch.distributed.launcher.api import LaunchConfig, elastic_launch

from anncli.cluster.distributed import AllReduceBatchNorm2d, convert_sync_batchnorm


def _batch(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(3, 4, 5, 6, generator=g) * 3 + 1


def _reference_bn() -> nn.BatchNorm2d:
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(4)
    nn.init.uniform_(bn.weight, 0.5, 1.5)
    nn.init.uniform_(bn.bias, -0.5, 0.5)
    return bn


def _worker(out_dir: str) -> None:
    import torch.distributed as dist

    from anncli.cluster.distributed import init_distributed, teardown

    torch.set_num_threads(1)
    info = init_distributed()
    bn = convert_sync_batchnorm(_reference_bn(), info.device)
    assert isinstance(bn, AllReduceBatchNorm2d)
    x = _batch(info.rank).requires_grad_(True)
    for _ in range(2):  # two steps, so running statistics accumulate
        y = bn(x)
    (y * torch.arange(y.numel()).reshape(y.shape).float().sin()).sum().backward()
    grads = torch.cat([bn.weight.grad, bn.bias.grad])
    dist.all_reduce(grads)  # what DDP does with parameter gradients (sum, then averaged by world size)
    torch.save({"y": y.detach(), "dx": x.grad, "grads": grads, "rm": bn.running_mean, "rv": bn.running_var,
                "n": bn.num_batches_tracked}, os.path.join(out_dir, f"rank{info.rank}.pt"))
    teardown()


def test_all_reduce_bn_matches_bn_on_concatenated_batch(tmp_path):
    cfg = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=2, run_id=str(uuid.uuid4()),
                       rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.1)
    elastic_launch(cfg, entrypoint=_worker)(str(tmp_path))
    parts = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]

    bn = _reference_bn()
    x = torch.cat([_batch(0), _batch(1)]).requires_grad_(True)
    for _ in range(2):
        y = bn(x)
    (y * torch.cat([torch.arange(y.numel() // 2).reshape(3, 4, 5, 6).float().sin()] * 2)).sum().backward()

    torch.testing.assert_close(torch.cat([p["y"] for p in parts]), y.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat([p["dx"] for p in parts]), x.grad, atol=1e-5, rtol=1e-5)
    for p in parts:
        torch.testing.assert_close(p["grads"], torch.cat([bn.weight.grad, bn.bias.grad]), atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(p["rm"], bn.running_mean, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(p["rv"], bn.running_var, atol=1e-5, rtol=1e-5)
        assert int(p["n"]) == 2


def test_single_process_and_eval_fall_back_to_plain_bn():
    bn = _reference_bn()
    ours = convert_sync_batchnorm(_reference_bn(), torch.device("cpu"))
    x = _batch(3)
    torch.testing.assert_close(ours(x), bn(x))
    ours.eval(), bn.eval()
    torch.testing.assert_close(ours(x), bn(x))


def test_one_image_with_a_1x1_map_in_eval_does_not_crash():
    bn = convert_sync_batchnorm(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)), torch.device("cpu")).eval()
    assert bn(torch.randn(1, 3, 1, 1)).shape == (1, 4, 1, 1)


def _moments_worker(out_dir: str, loc: float, spread: float) -> None:
    from anncli.cluster.distributed import init_distributed, teardown

    torch.set_num_threads(1)
    info = init_distributed()
    bn = convert_sync_batchnorm(nn.BatchNorm2d(4, momentum=1.0), info.device)
    x = (_batch(info.rank) - 1) / 3 * spread + loc  # the draws of _batch, standardized and rescaled
    y = bn(x)
    torch.save({"y": y.detach(), "rv": bn.running_var, "rm": bn.running_mean},
               os.path.join(out_dir, f"rank{info.rank}.pt"))
    teardown()


@pytest.mark.parametrize("loc, spread", [(300.0, 1.0), (300.0, 0.01)])
def test_all_reduce_bn_statistics_are_stable_when_the_mean_dwarfs_the_spread(tmp_path, loc, spread):
    """Against a float64 two-pass reference: E[x^2] - mean^2 in float32 is 2e-2 off at mean/std 300
    (mean 300, std 1) and NaN at mean 300, std 0.01."""
    cfg = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=2, run_id=str(uuid.uuid4()),
                       rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.1)
    elastic_launch(cfg, entrypoint=_moments_worker)(str(tmp_path), loc, spread)
    parts = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]

    x = (torch.cat([_batch(0), _batch(1)]).double() - 1) / 3 * spread + loc
    x = x.float().double()  # the float32 inputs the ranks saw
    var, mean = torch.var_mean(x, dim=(0, 2, 3), correction=1)
    y = (x - mean[None, :, None, None]) / torch.sqrt(x.var(dim=(0, 2, 3), correction=0) + 1e-5)[None, :, None, None]
    for p in parts:
        torch.testing.assert_close(p["rv"].double(), var, rtol=1e-5, atol=0)
        torch.testing.assert_close(p["rm"].double(), mean, rtol=1e-6, atol=0)
    torch.testing.assert_close(torch.cat([p["y"] for p in parts]).double(), y, rtol=1e-4, atol=1e-4)


RAISING_RANK = '''
import signal, sys
import torch, torch.distributed as dist
from anncli.data.shards import DataError
from anncli.cluster.distributed import init_distributed, rank_session

signal.signal(signal.SIGTERM, lambda *a: None)  # like training: SIGTERM only sets a flag
info = init_distributed()
with rank_session(info):
    x = torch.ones(2_000_000)
    for step in range(100_000):  # rank 0 keeps reducing gradients, as DDP does
        if info.rank == 1 and step == 3:
            raise DataError("shard x-000001.tar: sample 7: label 40 >= num_classes 19")
        dist.all_reduce(x)
        x.fill_(1)
'''


def test_a_rank_that_raises_stops_every_rank_and_names_itself(tmp_path):
    """No barrier after an exception: before, rank 1 waited in teardown's barrier while rank 0 waited in
    its all_reduce, until the collective timeout (10 minutes at start-up)."""
    import socket
    import subprocess
    import sys

    script = tmp_path / "raising.py"
    script.write_text(RAISING_RANK)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo",
           "PYTHONPATH": str(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(script)], capture_output=True, text=True, env=env, timeout=240)
    out = done.stdout + done.stderr
    host = socket.gethostname()
    assert done.returncode != 0
    assert f"[ann] rank 1/2 on {host} failed (DataError); stopping every rank" in out, out[-3000:]
    assert (f"[ann] rank 0/2 on {host}: stopping: rank 1/2 on {host} failed: DataError: shard x-000001.tar: "
            "sample 7: label 40 >= num_classes 19") in out, out[-3000:]
