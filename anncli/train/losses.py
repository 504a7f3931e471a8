"""Segmentation losses: (class-weighted) cross-entropy, OHEM cross-entropy and aux weighting.

Labels are train ids in [0, K) with 255 = ignore. Everything runs in float32 with autocast off.
OHEM follows the official ANN code (torchcv `FSOhemCELoss`): among the non-ignored pixels of one call
sort the probability p of the true class ascending, threshold = max(p[min(min_kept, n-1)], thresh),
keep the pixels with p < threshold, and average their (class-weighted) per-pixel CE. One call is one
process's batch, so `min_kept` counts per process, as it counted per GPU in the official code.

`loss.normalize`: `process` (the official semantics) averages CE over this process's valid pixels and
the engines average the processes, so the gradient depends on how a global batch is split. `global`
divides the plain CE terms (main without OHEM, aux) by a `denominator` the loop computes from the whole
global batch (`global_denominator`: one all-reduced pixel-weight sum), which makes the gradient the
global batch's pixel mean on any split. OHEM keeps selecting per process either way.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from anncli.data.labels import IGNORE_INDEX
from anncli.models.precision import autocast_off
from anncli.recipe import LossConfig


def check_labels(target: torch.Tensor, num_classes: int) -> None:
    """Label values outside [0, num_classes) and not ignored are an error. On a device tensor this reads
    the device (a sync); the training loop checks its host batch instead, before it moves."""
    if target.is_cpu:  # numpy: no torch host read, and several times faster on uint8 crops
        arr = target.numpy()
        values = sorted(int(v) for v in np.unique(arr[(arr != IGNORE_INDEX) & ((arr < 0) | (arr >= num_classes))]))
    else:
        bad = (target != IGNORE_INDEX) & ((target < 0) | (target >= num_classes))
        values = sorted(int(v) for v in torch.unique(target[bad]).tolist()) if bool(bad.any()) else []
    if values:
        shown = ", ".join(map(str, values[:8])) + (", ..." if len(values) > 8 else "")
        raise ValueError(f"label values {shown} outside [0, {num_classes}) and not the ignore value {IGNORE_INDEX}")


def pixel_ce(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """Per-pixel (weighted) CE, 0 on ignored pixels: (B,K,H,W), (B,H,W) -> (B,H,W)."""
    return F.cross_entropy(logits, target, weight=weight, ignore_index=IGNORE_INDEX, reduction="none")


def pixel_weight_sum(target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """The CE denominator: the number of valid pixels, or the sum of their class weights."""
    valid = target != IGNORE_INDEX
    pixel_weight = valid.float() if weight is None else weight[target.clamp(max=weight.numel() - 1)] * valid
    return pixel_weight.sum()


def cross_entropy(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None,
                  denominator: torch.Tensor | None = None) -> torch.Tensor:
    """Weighted mean CE like nn.CrossEntropyLoss (sum / sum of pixel weights); 0 when all is ignored.
    With `denominator`, the weighted sum divided by it instead (`loss.normalize: global`)."""
    if denominator is None:
        denominator = pixel_weight_sum(target, weight)
    return pixel_ce(logits, target, weight).sum() / denominator.clamp(min=1e-12)


def ohem_cross_entropy(logits: torch.Tensor, target: torch.Tensor, thresh: float = 0.7, min_kept: int = 100_000,
                       weight: torch.Tensor | None = None) -> torch.Tensor:
    """Online hard example mining CE with the official semantics; 0 when no pixel is kept.

    Written with masks over every pixel instead of gathering the valid ones, so that no size is read
    back to the host: the training step never waits for the GPU here (the k-th smallest probability
    of the valid pixels is read from a sort with the ignored ones last)."""
    valid = (target != IGNORE_INDEX).flatten()
    with torch.no_grad():
        prob = torch.softmax(logits, dim=1).gather(1, target.masked_fill(target == IGNORE_INDEX, 0).unsqueeze(1))
        prob = torch.where(valid, prob.flatten(), torch.inf)
        k = (valid.sum() - 1).clamp(min=0, max=min_kept)  # the official min(min_kept, n - 1), on the device
        kth = prob.sort().values.gather(0, k.reshape(1))[0]
        kept = valid & (prob < torch.clamp(kth, min=thresh))
    ce = pixel_ce(logits, target, weight).flatten()
    return torch.where(kept, ce, 0.0).sum() / kept.sum().clamp(min=1)


class SegLoss(nn.Module):
    """total = main (OHEM or plain CE) + aux_weight * aux CE; returns (total, {"loss", "aux_loss"})."""

    def __init__(self, cfg: LossConfig, num_classes: int, check: bool = True):
        super().__init__()
        self.cfg = cfg
        self.num_classes = num_classes
        self.check = check  # False where the caller checked the labels on the host (the training loop)
        if cfg.class_weights is not None and len(cfg.class_weights) != num_classes:
            raise ValueError(f"{len(cfg.class_weights)} class weights for {num_classes} classes")
        weight = None if cfg.class_weights is None else torch.tensor(cfg.class_weights, dtype=torch.float32)
        self.register_buffer("weight", weight, persistent=False)
        self.host_weight = weight  # for the host-side labels of `global_denominator`, read without a sync

    def global_denominator(self, targets: list[torch.Tensor], world_size: int, device) -> torch.Tensor:
        """Collective. The pixel-weight sum of one optimizer step's global batch (this rank's micro-batch
        labels `targets`, all-reduced) over world size x micro-batches: dividing each micro-batch's CE sum by
        it, then averaging over micro-batches and ranks as the engines do, gives the global pixel mean."""
        from anncli.cluster.distributed import all_reduce_sum_

        local = sum(pixel_weight_sum(t.long(), self.host_weight) for t in targets).reshape(1).double()
        local = local.to(device, non_blocking=True)
        return (all_reduce_sum_(local) / (world_size * len(targets))).float()[0]

    def forward(self, main: torch.Tensor, aux: torch.Tensor | None, target: torch.Tensor,
                denominator: torch.Tensor | None = None):
        if main.shape[-2:] != target.shape[-2:]:
            raise ValueError(f"logits {tuple(main.shape[-2:])} and labels {tuple(target.shape[-2:])} differ in size")
        target = target.long()
        if self.check:
            check_labels(target, self.num_classes)
        cfg = self.cfg
        with autocast_off(main.device):
            if cfg.ohem:
                main_loss = ohem_cross_entropy(main.float(), target, cfg.ohem_thresh, cfg.ohem_min_kept, self.weight)
            else:
                main_loss = cross_entropy(main.float(), target, self.weight, denominator)
            aux_loss = main_loss.new_zeros(()) if aux is None else cross_entropy(aux.float(), target, self.weight,
                                                                                  denominator)
            total = main_loss + cfg.aux_weight * aux_loss
        return total, {"loss": main_loss, "aux_loss": aux_loss}
