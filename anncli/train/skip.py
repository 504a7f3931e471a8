"""Skipping a micro-batch whose loss is non-finite on any rank, decided on the device: no host read.

The engines all-reduce each micro-batch's mean losses anyway; `finite` is true when every rank's are
finite, so every rank takes the same decision. A skipped micro-batch leaves nothing behind: its loss is
replaced by 0, and each parameter's gradient of it is masked to 0 before it is accumulated (and before
DDP or DeepSpeed reduce it), so inf/NaN activations cannot reach the gradients. When no micro-batch of a
step was kept, the optimizer step is undone (parameters and optimizer state), so momentum and weight
decay do not move the weights either. The loop reads the flags on its log steps (`SkipRecord`).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn


class NonFiniteSkip:
    def __init__(self, module: nn.Module, device: torch.device):
        self.finite = torch.ones((), dtype=torch.bool, device=device)
        self.kept = torch.zeros((), dtype=torch.int32, device=device)  # kept micro-batches of this step
        for p in module.parameters():
            if p.requires_grad:
                p.register_hook(self._mask)

    def _mask(self, grad: torch.Tensor) -> torch.Tensor:
        return torch.where(self.finite, grad, torch.zeros((), dtype=grad.dtype, device=grad.device))

    def decide(self, ok: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
        """From the agreement of every rank (`ok`: their losses and batch-norm statistics are finite): the loss
        to back-propagate (0 when skipped)."""
        self.finite = ok
        self.kept += self.finite.int()
        return torch.where(self.finite, total, torch.zeros((), dtype=total.dtype, device=total.device))

    def optimizer_step(self, step: Callable[[], None], params: list[torch.Tensor], optimizer) -> None:
        """`step()`, undone on the device when no micro-batch of the step was kept."""
        tensors = _unique(params + [p for g in optimizer.param_groups for p in g["params"]])
        saved = [t.detach().clone() for t in tensors]
        state = {id(t): t.detach().clone() for t in _state_tensors(optimizer, self.kept.device)}
        step()
        keep = self.kept > 0
        with torch.no_grad():
            for t, old in zip(tensors, saved):
                t.copy_(torch.where(keep, t, old))
            for t in _state_tensors(optimizer, self.kept.device):  # state born in this step goes back to zeros: a fresh state
                t.copy_(torch.where(keep, t, state.get(id(t), torch.zeros((), dtype=t.dtype, device=t.device))))
        self.kept.zero_()


def _unique(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    seen, out = set(), []
    for t in tensors:
        if id(t) not in seen:
            seen.add(id(t))
            out.append(t)
    return out


def _state_tensors(optimizer, device: torch.device) -> list[torch.Tensor]:
    """The optimizer state on the flag's device. On CUDA, AdamW's step counter is a CPU tensor and is left
    alone (a skipped step still counts in its bias correction): restoring it would read the flag, a sync."""
    return [v for state in optimizer.state.values() for v in state.values()
            if isinstance(v, torch.Tensor) and v.device == device]
