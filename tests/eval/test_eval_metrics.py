"""Confusion matrix and metrics: known values, mmseg's NaN rules, and a brute-force count."""

import math

import numpy as np
import pytest
import torch

from anncli.eval.metrics import confusion_matrix, json_safe, metrics_from_confusion


def percent(value: float) -> float:
    """A fraction as the usual two-decimal percentage, as the tables print it (NaN stays NaN)."""
    return value if math.isnan(value) else round(value * 100.0, 2)


def test_perfect_prediction_gives_100():
    rng = np.random.default_rng(0)
    label = torch.from_numpy(rng.integers(0, 4, size=(16, 24)))
    label[0, :] = 255  # ignored pixels do not matter
    pred = label.clone()
    pred[0, :] = 1
    m = metrics_from_confusion(confusion_matrix(pred, label, 5))  # class 4 is absent from both: NaN, left out
    assert percent(m["aAcc"]) == percent(m["mIoU"]) == percent(m["mAcc"]) == 100.0
    assert math.isnan(m["per_class"][4]["IoU"])


def test_hand_built_confusion_known_values():
    # rows: ground truth, columns: prediction
    cm = torch.tensor([[3, 1, 0], [2, 4, 0], [0, 0, 0]], dtype=torch.int64)
    m = metrics_from_confusion(cm, ["a", "b", "c"])
    a, b, c = m["per_class"]
    assert a["IoU"] == pytest.approx(3 / 6) and a["Acc"] == pytest.approx(3 / 4)
    assert b["IoU"] == pytest.approx(4 / 7) and b["Acc"] == pytest.approx(4 / 6)
    assert math.isnan(c["IoU"]) and math.isnan(c["Acc"])
    assert m["aAcc"] == pytest.approx(7 / 10)
    assert m["mIoU"] == pytest.approx((3 / 6 + 4 / 7) / 2)
    assert m["mAcc"] == pytest.approx((3 / 4 + 4 / 6) / 2)
    assert [r["name"] for r in m["per_class"]] == ["a", "b", "c"]
    assert percent(m["mIoU"]) == round((3 / 6 + 4 / 7) / 2 * 100, 2)


def test_predicted_but_absent_class_counts_zero_iou_and_nan_acc():
    label = torch.tensor([[0, 0, 1, 1]])
    pred = torch.tensor([[0, 2, 1, 1]])  # class 2 never in the ground truth, predicted once
    m = metrics_from_confusion(confusion_matrix(pred, label, 3))
    two = m["per_class"][2]
    assert two["IoU"] == 0.0 and math.isnan(two["Acc"])
    assert m["mIoU"] == pytest.approx((1 / 2 + 1 + 0) / 3)  # the 0 is counted
    assert m["mAcc"] == pytest.approx((1 / 2 + 1) / 2)  # the NaN is not


def test_ignore_and_out_of_range_labels_are_dropped():
    label = torch.tensor([0, 255, 1, 7])
    pred = torch.tensor([0, 1, 0, 1])
    cm = confusion_matrix(pred, label, 2)
    assert cm.dtype == torch.int64
    assert cm.tolist() == [[1, 0], [1, 0]]


def test_equals_brute_force_per_class_count():
    rng = np.random.default_rng(1)
    k = 5
    label = rng.integers(0, k, size=(3, 20, 30))
    label[rng.random(label.shape) < 0.1] = 255
    pred = rng.integers(0, k, size=label.shape)
    pred[label == 2] = 2  # one class predicted perfectly where present
    label[label == 4] = 255  # one class absent from the ground truth
    cm = torch.zeros(k, k, dtype=torch.int64)
    for i in range(label.shape[0]):
        cm += confusion_matrix(torch.from_numpy(pred[i]), torch.from_numpy(label[i]), k)
    m = metrics_from_confusion(cm)

    ious, accs, hits, labelled = [], [], 0, 0
    for c in range(k):
        inter = gt = predicted = 0
        for g, p in zip(label.ravel().tolist(), pred.ravel().tolist()):
            if g == 255:
                continue
            inter += g == c and p == c
            gt += g == c
            predicted += p == c
        union = gt + predicted - inter
        ious.append(inter / union if union else None)
        accs.append(inter / gt if gt else None)
        hits += inter
        labelled += gt
        assert m["per_class"][c]["intersection"] == inter
        assert m["per_class"][c]["pixels"] == gt
        assert m["per_class"][c]["predicted"] == predicted
    kept_iou = [v for v in ious if v is not None]
    kept_acc = [v for v in accs if v is not None]
    assert m["mIoU"] == pytest.approx(sum(kept_iou) / len(kept_iou))
    assert m["mAcc"] == pytest.approx(sum(kept_acc) / len(kept_acc))
    assert m["aAcc"] == pytest.approx(hits / labelled)
    assert m["per_class"][2]["Acc"] == 1.0
    assert math.isnan(m["per_class"][4]["Acc"]) and m["per_class"][4]["IoU"] == 0.0


def test_json_safe_replaces_nan():
    assert json_safe({"a": [1.0, float("nan")], "b": float("nan")}) == {"a": [1.0, None], "b": None}
