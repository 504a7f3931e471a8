"""Losses against a brute-force reference written pixel by pixel."""

import math

import pytest
import torch

from anncli.data.labels import IGNORE_INDEX
from anncli.train.losses import SegLoss, cross_entropy, ohem_cross_entropy
from anncli.recipe import LossConfig

K = 4


def pixels(logits, target):
    """(probabilities, label) of every pixel, as plain Python lists."""
    out = []
    b, k, h, w = logits.shape
    for n in range(b):
        for i in range(h):
            for j in range(w):
                scores = [float(logits[n, c, i, j]) for c in range(k)]
                top = max(scores)
                exps = [math.exp(s - top) for s in scores]
                out.append(([e / sum(exps) for e in exps], int(target[n, i, j])))
    return out


def reference_ce(logits, target, weights=None):
    num = den = 0.0
    for probs, label in pixels(logits, target):
        if label == 255:
            continue
        w = 1.0 if weights is None else weights[label]
        num += -w * math.log(probs[label])
        den += w
    return num / den if den else 0.0


def reference_ohem(logits, target, thresh, min_kept, weights=None):
    valid = [(probs[label], label) for probs, label in pixels(logits, target) if label != 255]
    if not valid:
        return 0.0
    ordered = sorted(p for p, _ in valid)
    threshold = max(ordered[min(min_kept, len(ordered) - 1)], thresh)
    kept = [-(1.0 if weights is None else weights[label]) * math.log(p) for p, label in valid if p < threshold]
    return sum(kept) / len(kept) if kept else 0.0


def sample(seed=0, ignore_fraction=0.2):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, K, 5, 6, generator=g) * 2
    target = torch.randint(0, K, (2, 5, 6), generator=g)
    target[torch.rand(2, 5, 6, generator=g) < ignore_fraction] = 255
    return logits, target


WEIGHTS = [0.8373, 0.9180, 1.1116, 1.0507]


@pytest.mark.parametrize("min_kept", [0, 5, 20, 1000])
@pytest.mark.parametrize("weights", [None, WEIGHTS])
def test_ohem_matches_the_reference(min_kept, weights):
    logits, target = sample()
    w = None if weights is None else torch.tensor(weights)
    got = ohem_cross_entropy(logits, target, thresh=0.7, min_kept=min_kept, weight=w)
    assert got.item() == pytest.approx(reference_ohem(logits, target, 0.7, min_kept, weights), rel=1e-5)


def test_ohem_keeps_pixels_below_the_threshold_only_when_min_kept_is_small():
    logits, target = sample(seed=3)
    assert ohem_cross_entropy(logits, target, 0.7, 0).item() == pytest.approx(reference_ohem(logits, target, 0.7, 0))
    # with a low threshold and min_kept 0 the rule keeps fewer pixels than plain CE averages
    assert ohem_cross_entropy(logits, target, 0.1, 0).item() == pytest.approx(reference_ohem(logits, target, 0.1, 0))


def test_ohem_when_every_pixel_is_easy():
    target = torch.randint(0, K, (1, 4, 4), generator=torch.Generator().manual_seed(1))
    logits = torch.nn.functional.one_hot(target, K).permute(0, 3, 1, 2).float() * 4.0  # p(true) = 0.95
    logits[0, :, 0, 0] *= 1.5  # one pixel easier than the rest, so the ordering is not all ties
    # min_kept >= n: the threshold is the largest probability and every pixel below it is kept
    got = ohem_cross_entropy(logits, target, 0.7, 100_000)
    assert got.item() == pytest.approx(reference_ohem(logits, target, 0.7, 100_000), rel=1e-5)
    assert got.item() > 0
    # min_kept 0: the threshold is the smallest probability, nothing is kept, the loss is 0, not NaN
    assert ohem_cross_entropy(logits, target, 0.7, 0).item() == 0.0


def test_every_pixel_ignored_gives_zero_loss_and_a_finite_gradient():
    logits = torch.randn(1, K, 3, 3, requires_grad=True)
    target = torch.full((1, 3, 3), 255)
    aux = torch.randn(1, K, 3, 3, requires_grad=True)
    for ohem in (True, False):
        total, parts = SegLoss(LossConfig(ohem=ohem), K)(logits, aux, target)
        total.backward()
        assert total.item() == 0.0 and parts["aux_loss"].item() == 0.0
        assert torch.isfinite(logits.grad).all() and torch.isfinite(aux.grad).all()


@pytest.mark.parametrize("weights", [None, WEIGHTS])
def test_plain_ce_matches_the_reference_and_torch(weights):
    logits, target = sample(seed=5)
    w = None if weights is None else torch.tensor(weights)
    got = cross_entropy(logits, target, w)
    assert got.item() == pytest.approx(reference_ce(logits, target, weights), rel=1e-5)
    torch_ce = torch.nn.functional.cross_entropy(logits, target, weight=w, ignore_index=255)
    assert got.item() == pytest.approx(torch_ce.item(), rel=1e-5)


def test_segloss_combines_ohem_main_and_weighted_aux():
    logits, target = sample(seed=7)
    aux, _ = sample(seed=8)
    cfg = LossConfig(ohem=True, ohem_thresh=0.7, ohem_min_kept=10, aux_weight=0.4, class_weights=WEIGHTS)
    total, parts = SegLoss(cfg, K)(logits, aux, target)
    main_ref = reference_ohem(logits, target, 0.7, 10, WEIGHTS)
    aux_ref = reference_ce(aux, target, WEIGHTS)
    assert parts["loss"].item() == pytest.approx(main_ref, rel=1e-5)
    assert parts["aux_loss"].item() == pytest.approx(aux_ref, rel=1e-5)
    assert total.item() == pytest.approx(main_ref + 0.4 * aux_ref, rel=1e-5)
    total, parts = SegLoss(LossConfig(ohem=False), K)(logits, None, target)
    assert parts["aux_loss"].item() == 0.0 and total.item() == pytest.approx(reference_ce(logits, target), rel=1e-5)


def test_loss_runs_in_float32_under_autocast():
    logits, target = sample(seed=9)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        total, parts = SegLoss(LossConfig(ohem_min_kept=10), K)(logits.bfloat16(), logits.bfloat16(), target)
    assert total.dtype == torch.float32 and parts["loss"].dtype == torch.float32
    expected = reference_ohem(logits.bfloat16().float(), target, 0.7, 10)
    assert parts["loss"].item() == pytest.approx(expected, rel=1e-5)


def test_labels_outside_the_classes_are_named():
    logits, target = sample(seed=2)
    target[0, 0, 0], target[1, 1, 1], target[1, 2, 2] = 19, 254, -1
    with pytest.raises(ValueError, match=r"-1, 19, 254 outside \[0, 4\)"):
        SegLoss(LossConfig(), K)(logits, None, target)


def test_global_normalisation_makes_the_gradient_independent_of_the_split():
    """Two micro-batches of one step with different valid-pixel counts: `global` gives the full batch's
    pixel-mean gradient, `process` (mean of per-micro-batch means) does not."""
    from anncli.recipe import LossConfig

    torch.manual_seed(0)
    logits = torch.randn(4, 5, 6, 8)
    target = torch.randint(0, 5, (4, 6, 8))
    target[:2, :, :5] = IGNORE_INDEX  # the first half has far fewer valid pixels
    loss = SegLoss(LossConfig(ohem=False, aux_weight=0.0, normalize="global"), 5)

    def grad(parts, denominator=None):
        x = logits.clone().requires_grad_(True)
        total = sum(loss(x[p], None, target[p], denominator)[0] / len(parts) for p in parts)
        total.backward()
        return x.grad

    whole = grad([slice(0, 4)])
    halves = [slice(0, 2), slice(2, 4)]
    denominator = loss.global_denominator([target[p] for p in halves], world_size=1, device=logits.device)
    assert float(denominator) == float((target != IGNORE_INDEX).sum()) / 2
    torch.testing.assert_close(grad(halves, denominator), whole, rtol=1e-5, atol=1e-8)
    assert not torch.allclose(grad(halves), whole, rtol=1e-3, atol=1e-6)
