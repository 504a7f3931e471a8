"""The stop flag (SIGTERM/SIGUSR1 on any rank) agreed by every rank without blocking the training step.

Each step end starts an asynchronous MAX all_reduce of this rank's flag and reads the one started at the
previous step end, which has long finished by then: the ranks agree one step after a signal, all on the
same step, and the step never waits for the vote. The vote travels over gloo on CPU tensors (a group of
its own when the training group is NCCL), so it never touches the GPU stream and never syncs it.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class StopVote:
    def __init__(self, device: torch.device):
        self._distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        self._group = None
        if self._distributed and device.type != "cpu":
            self._group = dist.new_group(backend="gloo")  # collective: every rank builds the vote's group
        self._pending: tuple[torch.Tensor, object] | None = None

    def agreed(self, flag: bool) -> bool:
        """Vote `flag` for this step; True on every rank, at the same step, once a rank has voted True."""
        if not self._distributed:
            return flag
        previous = self._collect()
        vote = torch.tensor([int(flag)], dtype=torch.int32)
        self._pending = (vote, dist.all_reduce(vote, op=dist.ReduceOp.MAX, group=self._group, async_op=True))
        return previous

    def now(self, flag: bool) -> bool:
        """A blocking vote, where every rank waits anyway (before validation): True on every rank when one
        has voted True, in this call or the one in flight."""
        if not self._distributed:
            return flag
        previous = self._collect()
        vote = torch.tensor([int(flag)], dtype=torch.int32)
        dist.all_reduce(vote, op=dist.ReduceOp.MAX, group=self._group)
        return previous or bool(vote.numpy()[0])

    def _collect(self) -> bool:
        if self._pending is None:
            return False
        vote, work = self._pending
        self._pending = None
        work.wait()
        return bool(vote.numpy()[0])  # a CPU tensor: reading it is no device sync

    def close(self) -> None:
        """Wait for the vote in flight, so that no rank leaves a collective behind when the loop ends."""
        if self._distributed:
            self._collect()
