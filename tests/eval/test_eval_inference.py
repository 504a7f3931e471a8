"""Inference core: flip, multi-scale, whole vs sliding windows, padding, base resize, precision."""

import numpy as np
import pytest
import torch
from torch import nn

from anncli.eval.evaluate import evaluate_model
from anncli.eval.inference import Protocol, base_factor, infer_logits, view_sizes, window_starts
from anncli.eval.metrics import metrics_from_confusion

torch.set_num_threads(1)


class SymmetricConvNet(nn.Module):
    """Convolutions whose kernels are mirror-symmetric in width: flipping the input flips the output."""

    def __init__(self, classes: int = 4):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, classes, 3, padding=1)
        with torch.no_grad():
            for conv in (self.a, self.b):
                conv.weight.copy_((conv.weight + conv.weight.flip(-1)) / 2)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


class PositionNet(nn.Module):
    """Output depends on where a pixel sits in its input: channel 0 = row, channel 1 = column."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def forward(self, x):
        self.shapes.append(tuple(x.shape[-2:]))
        b, _, h, w = x.shape
        rows = torch.arange(h, dtype=torch.float32).view(1, 1, h, 1).expand(b, 1, h, w)
        cols = torch.arange(w, dtype=torch.float32).view(1, 1, 1, w).expand(b, 1, h, w)
        return torch.cat([rows, cols], dim=1) + 0 * x[:, :1]


class ChannelNet(nn.Module):
    """Pointwise: the input channels are the class scores."""

    def forward(self, x):
        return x * 1.0


def _image(h=12, w=18, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).normal(size=(3, h, w)).astype(np.float32))


def test_flip_with_flip_equivariant_model_equals_single_scale():
    model, image = SymmetricConvNet().eval(), _image()
    single = infer_logits(model, image, Protocol())
    flipped_sum = infer_logits(model, image, Protocol(flip=True))
    torch.testing.assert_close(flipped_sum, 2 * single, rtol=1e-5, atol=1e-5)
    flipped_mean = infer_logits(model, image, Protocol(flip=True, merge="softmax"))
    torch.testing.assert_close(flipped_mean, single.softmax(0), rtol=1e-5, atol=1e-6)
    assert torch.equal(flipped_sum.argmax(0), single.argmax(0))


def test_flip_adds_the_mirrored_view_flipped_back():
    model, image = PositionNet(), _image(4, 6)
    out = infer_logits(model, image, Protocol(flip=True))
    cols = torch.arange(6, dtype=torch.float32)
    torch.testing.assert_close(out[1], (cols + cols.flip(0)).expand(4, 6))


def test_slide_with_window_covering_the_image_equals_whole():
    model, image = SymmetricConvNet().eval(), _image(12, 18)
    whole = infer_logits(model, image, Protocol(scales=(1.0, 0.5), flip=True))
    for crop in ((12, 18), (16, 32)):
        slide = infer_logits(model, image, Protocol(scales=(1.0, 0.5), flip=True, mode="slide", crop=crop,
                                                    stride=(4, 4)))
        torch.testing.assert_close(slide, whole)


def test_window_starts_align_the_last_window_to_the_border():
    assert window_starts(10, 4, 3) == [0, 3, 6]
    assert window_starts(14, 5, 4) == [0, 4, 8, 9]
    assert window_starts(5, 5, 3) == [0]
    assert window_starts(3, 5, 3) == [0]


def test_overlapping_windows_average_position_dependent_output():
    model, (h, w) = PositionNet(), (10, 14)
    out = infer_logits(model, _image(h, w), Protocol(mode="slide", crop=(4, 5), stride=(3, 4), batch_windows=1))
    row_starts, col_starts = [0, 3, 6], [0, 4, 8, 9]  # written out, not computed by the code under test
    assert sorted(set(model.shapes)) == [(4, 5)] and len(model.shapes) == 12
    for y in range(h):
        for x in range(w):
            rows = [y - r for r in row_starts if r <= y < r + 4]
            cols = [x - c for c in col_starts if c <= x < c + 5]
            local_rows = [ry for ry in rows for _ in cols]
            local_cols = [cx for _ in rows for cx in cols]
            assert out[0, y, x].item() == pytest.approx(sum(local_rows) / len(local_rows))
            assert out[1, y, x].item() == pytest.approx(sum(local_cols) / len(local_cols))


def test_scaled_image_smaller_than_the_window_runs_whole():
    model = PositionNet()
    infer_logits(model, _image(16, 16), Protocol(scales=(0.5, 1.0), mode="slide", crop=(12, 12), stride=(8, 8),
                                                 batch_windows=1))
    assert model.shapes == [(8, 8)] + [(12, 12)] * 4


def test_multiscale_views_are_resized_back_and_summed():
    model, image = ChannelNet(), torch.ones(3, 8, 12) * torch.tensor([1.0, 2.0, 3.0]).view(3, 1, 1)
    out = infer_logits(model, image, Protocol(scales=(0.5, 1.0, 1.5)))
    assert out.shape == (3, 8, 12)
    torch.testing.assert_close(out, 3 * image)
    mean = infer_logits(model, image, Protocol(scales=(0.5, 1.0, 1.5), merge="softmax"))
    torch.testing.assert_close(mean, image.softmax(0))


def test_size_divisor_pads_and_crops_back():
    model = PositionNet()
    out = infer_logits(model, _image(10, 13), Protocol(size_divisor=8))
    assert model.shapes == [(16, 16)]
    assert out.shape == (2, 10, 13)
    torch.testing.assert_close(out[1], torch.arange(13, dtype=torch.float32).expand(10, 13))


def test_base_resize_short_side_with_long_side_cap():
    p = Protocol(resize_short=520, max_long=1040)
    assert base_factor(1024, 2048, p) == pytest.approx(0.5078125)
    assert view_sizes(1024, 2048, p) == [(520, 1040)]
    assert view_sizes(400, 600, p) == [(520, 780)]
    assert view_sizes(400, 600, Protocol(resize_short=520, scales=(0.5, 2.0))) == [(260, 390), (1040, 1560)]


def test_bf16_autocast_returns_float32_close_to_fp32():
    model, image = SymmetricConvNet().eval(), _image()
    full = infer_logits(model, image, Protocol())
    half = infer_logits(model, image, Protocol(precision="bf16"))
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, full, rtol=0.05, atol=0.05)


def test_evaluate_model_perfect_prediction_and_mode_restored():
    rng = np.random.default_rng(0)
    samples = []
    for i in range(3):
        label = rng.integers(0, 3, size=(6, 9)).astype(np.uint8)
        image = np.zeros((6, 9, 3), dtype=np.uint8)
        for c in range(3):
            image[..., c][label == c] = 255  # the class is the brightest channel
        label[0, 0] = 255
        samples.append({"key": f"s{i}", "image": image, "label": label, "shard": "x"})
    model = ChannelNet().train()
    seen = []
    cm = evaluate_model(model, samples, Protocol(), 3, torch.device("cpu"), on_sample=lambda s, p: seen.append(s["key"]))
    assert model.training and seen == ["s0", "s1", "s2"]
    assert cm.sum().item() == 3 * 54 - 3
    m = metrics_from_confusion(cm)
    assert m["mIoU"] == m["aAcc"] == m["mAcc"] == 1.0
