"""Process-group set-up and teardown, rank helpers, small collectives, and sync-BN for any device.

torch's SyncBatchNorm has no CPU kernels, so CPU ranks use `AllReduceBatchNorm2d`: per-channel sum,
sum of squares and count go through an autograd-aware all_reduce, which gives the statistics of the
whole global batch on every backend.
"""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

# Rendezvous and the first step may wait for slow nodes; after that a hang should surface quickly.
INIT_TIMEOUT_S = int(os.environ.get("ANN_INIT_TIMEOUT", "600"))
TRAIN_TIMEOUT_S = int(os.environ.get("ANN_TRAIN_TIMEOUT", "300"))


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _pick_device(local_rank: int) -> torch.device:
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def init_distributed() -> DistInfo:
    """Join the process group described by torchrun's environment; a single process needs none."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = _pick_device(local_rank)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(
            backend=backend,
            timeout=datetime.timedelta(seconds=INIT_TIMEOUT_S),
            device_id=device if device.type == "cuda" else None,
        )
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def describe_rank(info: DistInfo) -> str:
    return f"rank {info.rank}/{info.world_size} on {socket.gethostname()} (pid {os.getpid()}, {info.device})"


def teardown() -> None:
    if dist.is_initialized():
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """Sum in place across ranks; a no-op in a single process."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when the flag is set on at least one rank (one all_reduce)."""
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def broadcast_object(obj):
    """Rank 0's picklable `obj` on every rank (one small broadcast); itself in a single process."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class AllReduceBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics cover the batch of every rank.

    Forward and backward equal plain BatchNorm2d on the concatenation of all ranks' batches; running
    statistics are updated identically on every rank. Works on CPU (gloo) and GPU alike.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and is_distributed()):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        c = x.shape[1]
        xf = x.float()
        count = torch.full((1,), xf.numel() / c, dtype=xf.dtype, device=xf.device)
        stats = torch.cat([xf.sum(dim=(0, 2, 3)), (xf * xf).sum(dim=(0, 2, 3)), count])
        stats = all_reduce(stats)
        total = stats[2 * c]
        mean = stats[:c] / total
        var = stats[c : 2 * c] / total - mean * mean
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                unbiased = var * (total / (total - 1).clamp(min=1))
                self.running_mean.mul_(1 - m).add_(m * mean.detach())
                self.running_var.mul_(1 - m).add_(m * unbiased.detach())
        inv_std = torch.rsqrt(var + self.eps)
        scale = inv_std if self.weight is None else self.weight * inv_std
        shift = -mean * scale if self.bias is None else self.bias - mean * scale
        return (xf * scale[None, :, None, None] + shift[None, :, None, None]).to(x.dtype)


def convert_sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """Sync-BN before DDP/DeepSpeed wraps the model: torch's on CUDA, the all-reduce one elsewhere."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return _replace_bn(model)


def _replace_bn(module: nn.Module) -> nn.Module:
    if type(module) is nn.BatchNorm2d:
        new = AllReduceBatchNorm2d(module.num_features, module.eps, module.momentum, module.affine,
                                   module.track_running_stats)
        new.load_state_dict(module.state_dict())
        new.train(module.training)
        return new
    for name, child in module.named_children():
        setattr(module, name, _replace_bn(child))
    return module


def set_train_timeout() -> None:
    """After the first step, shorten the collective timeout so that a lost rank surfaces in minutes."""
    if is_distributed():
        from torch.distributed.distributed_c10d import _set_pg_timeout

        barrier()  # every rank must have finished its slow first step before the shorter limit applies
        _set_pg_timeout(datetime.timedelta(seconds=TRAIN_TIMEOUT_S))
