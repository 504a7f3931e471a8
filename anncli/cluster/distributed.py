"""Process-group set-up and teardown, rank helpers, small collectives, and sync-BN for any device.

torch's SyncBatchNorm has no CPU kernels, so CPU ranks use `AllReduceBatchNorm2d`: per-rank mean, M2
and count go through an autograd-aware all_reduce and are combined stably, which gives the statistics
of the whole global batch on every backend.
"""

from __future__ import annotations

import datetime
import os
import socket
import sys
import time
from contextlib import contextmanager
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
    """Join the process group described by torchrun's environment; a single process needs none. A torchrun
    worker first arranges to stop when its agent dies (lifetime.rank_dies_with_agent)."""
    from anncli.cluster.lifetime import rank_dies_with_agent

    rank_dies_with_agent()
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
    """The end of a run that went well on this rank: wait for the others, then leave the group."""
    if dist.is_initialized():
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()


_FAILED_KEY, _READ_KEY = "ann/failed", "ann/failed-read"


@contextmanager
def rank_session(info: DistInfo):
    """The body of one rank. A normal end tears down with a barrier; an exception never enters one.

    A rank that raises must not wait in a barrier while the others wait in a different collective (they
    would pair up wrongly or hang until the collective timeout). It leaves the group at once, which
    breaks the others' collectives within seconds, and leaves a note in the store naming itself; a
    rank whose collective broke prints that note (or that a peer vanished) and exits 1, no traceback.
    """
    try:
        yield info
    except BaseException as exc:
        if dist.is_initialized():
            _abort(info, exc)
        raise
    else:
        teardown()


def _is_collective_error(exc: BaseException) -> bool:
    text = str(exc)
    return isinstance(exc, dist.DistError) or (
        isinstance(exc, RuntimeError) and any(w in text for w in ("gloo", "Gloo", "NCCL", "Connection reset"))
    )


def _abort(info: DistInfo, exc: BaseException) -> None:
    who = f"rank {info.rank}/{info.world_size} on {socket.gethostname()}"
    store = _default_store()
    if isinstance(exc, Exception) and _is_collective_error(exc):
        note = _read_failure(store)
        _destroy()
        cause = note or "another rank stopped answering (killed, or it failed before saying why)"
        print(f"[ann] {who}: stopping: {cause}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    if isinstance(exc, Exception):
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        _try(lambda: store.set(_FAILED_KEY, f"{who} failed: {type(exc).__name__}: {first}"))
        print(f"[ann] {who} failed ({type(exc).__name__}); stopping every rank", file=sys.stderr, flush=True)
    _destroy()
    if info.rank == 0 and isinstance(exc, Exception):  # rank 0 may host the store: let the others read the note
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline and (_try(lambda: store.add(_READ_KEY, 0)) or 0) < info.world_size - 1:
            time.sleep(0.1)


def _default_store():
    from torch.distributed.distributed_c10d import _get_default_store

    store = _try(_get_default_store)
    if store is not None:
        _try(lambda: store.set_timeout(datetime.timedelta(seconds=5)))
    return store


def _read_failure(store) -> str | None:
    """The failing rank's note, waiting up to 2 s for it (it is written before that rank leaves)."""
    deadline = time.monotonic() + 2
    while store is not None and time.monotonic() < deadline:
        if _try(lambda: store.check([_FAILED_KEY])):
            note = _try(lambda: store.get(_FAILED_KEY).decode())
            _try(lambda: store.add(_READ_KEY, 1))
            return note
        time.sleep(0.1)
    return None


def _destroy() -> None:
    _try(dist.destroy_process_group)


def _try(fn):
    """Best effort while a run is failing: the store or the group may already be gone."""
    try:
        return fn()
    except Exception:
        return None


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


class _AllReduceSum(torch.autograd.Function):
    """Sum across ranks with its exact gradient: every rank's output depends on every rank's input, so
    the gradient of each input is the sum of the output gradients of all ranks.

    Written on `dist.all_reduce` because `torch.distributed.nn.functional.all_reduce` is deprecated
    (a FutureWarning per rank) and the suggested functional collectives have no autograd formula.
    """

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        out = tensor.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad


def global_batch_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-channel mean, biased variance and element count of an NCHW batch over all ranks.

    Numerically stable: each rank takes its own mean and M2 (sum of squared deviations) in two local
    passes (shifted data, float64 sums), and ranks combine them in float64 (Chan et al.): M2 = sum M2_r + sum n_r mean_r^2 - N mean^2.
    The naive E[x^2] - mean^2 in float32 loses every digit when the mean dwarfs the spread.
    """
    n_r = x.numel() / x.shape[1]
    # Deviations from a rough local mean (a constant: the result does not depend on it), summed in float64.
    shift = x.detach().mean(dim=(0, 2, 3))
    d = x - shift[None, :, None, None]
    s1, s2 = d.sum(dim=(0, 2, 3), dtype=torch.float64), d.square().sum(dim=(0, 2, 3), dtype=torch.float64)
    mean_r, m2_r = shift.double() + s1 / n_r, s2 - s1 * s1 / n_r
    count = torch.full((1,), float(n_r), dtype=torch.float64, device=x.device)
    stats = _AllReduceSum.apply(torch.cat([mean_r * n_r, mean_r * mean_r * n_r, m2_r, count]))
    c = x.shape[1]
    total = stats[3 * c]
    mean = stats[:c] / total
    m2 = stats[2 * c : 3 * c] + (stats[c : 2 * c] - total * mean * mean)
    return mean, (m2 / total).clamp(min=0), total


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
        xf = x.float()
        mean64, var64, total = global_batch_moments(xf)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                unbiased = var64 * (total / (total - 1).clamp(min=1))
                self.running_mean.mul_(1 - m).add_(m * mean64.float())
                self.running_var.mul_(1 - m).add_(m * unbiased.float())
        # The mean as float32 head + tail: x - head is exact near the mean, so a mean far larger than
        # the spread does not cost the output its digits.
        head = mean64.float()
        tail = (mean64 - head.double()).float()
        inv_std = torch.rsqrt(var64 + self.eps).float()
        scale = inv_std if self.weight is None else self.weight * inv_std
        y = ((xf - head[None, :, None, None]) - tail[None, :, None, None]) * scale[None, :, None, None]
        if self.bias is not None:
            y = y + self.bias[None, :, None, None]
        return y.to(x.dtype)


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
