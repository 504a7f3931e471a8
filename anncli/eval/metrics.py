"""Segmentation metrics from an int64 confusion matrix.

The matrix is indexed [ground truth, prediction]. Counting in int64 keeps the sums exact: a Cityscapes
val pass holds about 1e9 labelled pixels, far beyond what float32 counts represent exactly.

The NaN rules are mmseg's: a class absent from both ground truth and prediction has IoU 0/0 = NaN and
is left out of mIoU; a class predicted but absent from the ground truth has IoU 0 (counted) and Acc
NaN (left out of mAcc).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from anncli.data.labels import IGNORE_INDEX


def confusion_matrix(pred: torch.Tensor, label: torch.Tensor, num_classes: int,
                     ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """[K, K] int64 counts of (label, pred) pairs; ignored and out-of-range labels are dropped."""
    label = label.reshape(-1).to(torch.int64)
    pred = pred.reshape(-1).to(torch.int64).to(label.device)
    keep = (label != ignore_index) & (label >= 0) & (label < num_classes)
    pairs = label[keep] * num_classes + pred[keep]
    counts = torch.bincount(pairs, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


def _nanmean(values: list[float]) -> float:
    kept = [v for v in values if not math.isnan(v)]
    return sum(kept) / len(kept) if kept else float("nan")


def _ratio(num: int, den: int) -> float:
    return num / den if den else float("nan")


def metrics_from_confusion(cm: torch.Tensor, class_names: Sequence[str] | None = None) -> dict:
    """aAcc, mIoU, mAcc and per-class IoU/Acc as fractions in [0, 1] (NaN where undefined).

    Per class: `pixels` (ground-truth count), `predicted` (prediction count), `intersection`, `union`.
    """
    cm = cm.detach().to("cpu", torch.int64)
    k = cm.shape[0]
    names = list(class_names) if class_names is not None else [str(i) for i in range(k)]
    if len(names) != k:
        names = [names[i] if i < len(names) else str(i) for i in range(k)]
    inter = cm.diagonal().tolist()
    gt = cm.sum(dim=1).tolist()
    predicted = cm.sum(dim=0).tolist()
    per_class = []
    for c in range(k):
        union = gt[c] + predicted[c] - inter[c]
        per_class.append({
            "name": names[c], "IoU": _ratio(inter[c], union), "Acc": _ratio(inter[c], gt[c]),
            "pixels": gt[c], "predicted": predicted[c], "intersection": inter[c], "union": union,
        })
    total = sum(gt)
    return {
        "aAcc": _ratio(sum(inter), total),
        "mIoU": _nanmean([c["IoU"] for c in per_class]),
        "mAcc": _nanmean([c["Acc"] for c in per_class]),
        "pixels": total,
        "per_class": per_class,
    }


def json_safe(obj):
    """Replace NaN by None (JSON has no NaN) throughout nested dicts and lists."""
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {key: json_safe(v) for key, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj
