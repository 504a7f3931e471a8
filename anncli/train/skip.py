"""Skipping a non-finite step on the device, at the cost of a plain step: no host read, no copies.

The policy is GradScaler's: an optimizer step whose micro-batches had a non-finite loss or batch-norm
statistics on any rank, or whose gradients are non-finite, is skipped whole. Nothing of it stays:
- weights and optimizer state: the fused SGD/AdamW kernels take a `found_inf` tensor and do nothing when it
  is set (AdamW's step counter is put back on the device); `SkippingOptimizer` hands them the engine's flag;
- batch-norm buffers: every buffer of the network is a view into one flat tensor per dtype
  (`FlatBuffers`), so keeping a micro-batch's statistics or restoring the ones from before its forward is
  one copy and one `where` per dtype, whatever the network's size;
- the fp16 scale is GradScaler's own: overflowing gradients back it off, as torch.amp.GradScaler does.
The flags stay on the device; the loop reads them on its log steps.
"""

from __future__ import annotations

import torch
from torch import nn

from anncli.cluster.distributed import all_reduce_sum_, is_distributed


class FlatBuffers:
    """The module's buffers re-seated as views of one flat tensor per (dtype, device).

    In-place updates (batch norm's running statistics, DDP's buffer broadcast, `load_state_dict`) keep
    writing into the flat tensors, so `snapshot`, `finite` and `restore_unless` each cost an op or two."""

    def __init__(self, module: nn.Module):
        groups: dict[tuple, list[tuple[nn.Module, str, torch.Tensor]]] = {}
        for owner in module.modules():
            for name, buf in owner.named_buffers(recurse=False):
                if buf is not None:
                    groups.setdefault((buf.dtype, buf.device), []).append((owner, name, buf))
        self.flats: list[torch.Tensor] = []
        for entries in groups.values():
            self.flats.append(self._seat(entries))
        self.saved = [torch.empty_like(f) for f in self.flats]
        self.floating = [f for f in self.flats if f.is_floating_point()]

    @staticmethod
    def _seat(entries: list) -> torch.Tensor:
        unique = list({id(buf): buf for _, _, buf in entries}.values())  # a buffer registered twice: one place
        flat = torch.cat([b.detach().reshape(-1) for b in unique]) if unique else entries[0][2].new_empty(0)
        views, offset = {}, 0
        for buf in unique:
            views[id(buf)] = flat[offset:offset + buf.numel()].view(buf.shape)
            offset += buf.numel()
        for owner, name, buf in entries:
            setattr(owner, name, views[id(buf)])  # a registered buffer's name: nn.Module re-registers it
        return flat

    def snapshot(self) -> None:
        with torch.no_grad():
            for saved, flat in zip(self.saved, self.flats):
                saved.copy_(flat)

    def total(self) -> torch.Tensor:
        """The sum of every floating buffer: non-finite when one of them is (a float32 scalar)."""
        sums = [f.sum(dtype=torch.float32) for f in self.floating]
        if not sums:
            return torch.zeros((), device=self.flats[0].device if self.flats else "cpu")
        return sums[0] if len(sums) == 1 else torch.stack(sums).sum()

    def restore_unless(self, keep: torch.Tensor) -> None:
        """Unless `keep` (agreed by every rank), every buffer gets back its value from the last snapshot."""
        with torch.no_grad():
            for saved, flat in zip(self.saved, self.flats):
                flat.copy_(torch.where(keep, flat, saved))


def total_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The L2 norm of all `tensors` together (as clip_grad_norm_ computes it): one fused kernel per device and
    dtype, then the norm of those norms. Every tensor of a rank lives on its one device."""
    if not tensors:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(tensors)))


class SkippingOptimizer:
    """Mixed into torch's SGD and AdamW built with `fused=True`: `step()` is skipped on the device when the
    engine's `skip` flag is set or, with `check_gradients`, when the gradients it holds are non-finite
    (agreed across ranks: under ZeRO each rank holds a partition). A GradScaler's own `found_inf` is kept.
    `skipped` is the last step's flag (a float tensor, 1.0 = skipped)."""

    skip: torch.Tensor | None = None
    check_gradients = False

    def step(self, closure=None):
        self._zero_fill_momentum()
        found = self._found()
        outer = getattr(self, "found_inf", None)  # set by GradScaler.step around this call
        self.found_inf = found if outer is None else torch.maximum(found, outer.to(found.dtype))
        self.skipped = self.found_inf
        try:
            return super().step(closure)
        finally:
            if outer is None:
                del self.found_inf
            else:
                self.found_inf = outer

    def _found(self) -> torch.Tensor:
        device = self.param_groups[0]["params"][0].device
        found = torch.zeros((), dtype=torch.float32, device=device) if self.skip is None else self.skip.float()
        if self.check_gradients:
            grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
            if grads:
                bad = (~torch.isfinite(total_norm(grads))).float()
                found = torch.maximum(found, bad)
            if is_distributed():
                found = (all_reduce_sum_(found.reshape(1)) > 0).float()[0]
        return found

    def _zero_fill_momentum(self) -> None:
        """Fused SGD's first step creates its momentum buffers uninitialised and fills them from the gradients;
        skipped, they would stay garbage. Zero-filled beforehand they give the same first step, bit for bit."""
        if getattr(self, "_momentum_ready", False) or not isinstance(self, torch.optim.SGD):
            return
        for group in self.param_groups:
            if group["momentum"]:
                for p in group["params"]:
                    if self.state[p].get("momentum_buffer") is None:
                        self.state[p]["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        self._momentum_ready = True

    def load_state_dict(self, state_dict) -> None:
        super().load_state_dict(state_dict)
        self._momentum_ready = False


class SkippingSGD(SkippingOptimizer, torch.optim.SGD):
    pass


class SkippingAdamW(SkippingOptimizer, torch.optim.AdamW):
    pass
