"""The synthetic set (identical bytes per seed, the long-range rule) and the training augmentation."""

import hashlib

import numpy as np
import pytest
import torch

from anncli.data.manifest import read_manifest, resolve_urls
from anncli.data.shards import eval_samples
from anncli.data.synth import ensure_synth, make_sample, write_synth
from anncli.data.transforms import TrainTransform, normalize, normalize_batch
from anncli.recipe import AugmentConfig, SynthConfig


def _digests(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_same_seed_identical_bytes(tmp_path):
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        write_synth(tmp_path / name, train=12, val=6, size="32x64", seed=seed, max_samples=5, verbose=False)
    a, b, c = (_digests(tmp_path / n) for n in "abc")
    assert a == b
    assert sorted(a) == ["synth-train-000000.tar", "synth-train-000001.tar", "synth-train-000002.tar",
                         "synth-train.json", "synth-val-000000.tar", "synth-val-000001.tar", "synth-val.json"]
    assert a["synth-train-000000.tar"] != c["synth-train-000000.tar"]


def test_val_does_not_depend_on_train_count(tmp_path):
    write_synth(tmp_path / "a", train=3, val=4, size=(32, 64), seed=0, max_samples=10, verbose=False)
    write_synth(tmp_path / "b", train=9, val=4, size=(32, 64), seed=0, max_samples=10, verbose=False)
    assert _digests(tmp_path / "a")["synth-val-000000.tar"] == _digests(tmp_path / "b")["synth-val-000000.tar"]


def test_square_class_follows_the_distant_key():
    rng = np.random.default_rng(0)
    for _ in range(30):
        image, label, meta = make_sample(rng, 64, 128)
        key = label == 4
        ys, xs = np.nonzero(key)
        assert key.sum() == 100 and (xs.max() < 32 or xs.min() >= 96)
        colour = int(np.argmax(image[key].mean(0)))
        assert ["red", "green", "blue"][colour] == meta["key_colour"]
        squares = np.isin(label, [1, 2, 3])
        assert set(np.unique(label[squares])) == {1 + colour}
        far = np.nonzero(squares)[1]
        assert (far >= 64).all() if xs.max() < 32 else (far < 64).all()
        assert set(np.unique(label)) <= {0, 1, 2, 3, 4, 255} and (label == 255).any()


def test_ensure_synth_creates_once(tmp_path, capsys):
    cfg = SynthConfig(train=4, val=3, size=(32, 64), seed=1, max_samples=2)
    assert ensure_synth(str(tmp_path / "d"), cfg) is True
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "creating" in out[0]
    assert ensure_synth(str(tmp_path / "d"), cfg) is False
    manifest = read_manifest(tmp_path / "d", "synth", "train")
    assert manifest["total"] == 4 and len(manifest["classes"]) == 5 and manifest["ignore_index"] == 255
    samples = list(eval_samples(resolve_urls(str(tmp_path / "d"), "synth", "val"), rank=0, world_size=1))
    assert len(samples) == 3 and samples[0]["image"].shape == (32, 64, 3)


def test_normalize_rgb_and_bgr():
    img = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    mean, std = (1.0, 2.0, 3.0), (2.0, 4.0, 8.0)
    out = normalize(img, mean, std, bgr=False)
    assert out.shape == (3, 2, 3) and out.dtype == torch.float32
    assert torch.allclose(out[1], (torch.tensor(img[..., 1], dtype=torch.float32) - 2.0) / 4.0)
    out = normalize(img, mean, std, bgr=True)
    assert torch.allclose(out[0], (torch.tensor(img[..., 2], dtype=torch.float32) - 1.0) / 2.0)


def _pair(h=20, w=30):
    rng = np.random.default_rng(3)
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8), rng.integers(0, 5, (h, w)).astype(np.uint8)


def test_identity_geometry_and_flip_are_exact():
    image, label = _pair()
    for flip, view in ((0.0, slice(None)), (1.0, slice(None, None, -1))):
        t = TrainTransform(AugmentConfig(crop=(20, 30), scale=(1, 1), aspect=None, flip=flip, photometric="none"))
        img, lbl = t.crop_uint8(image, label, np.random.default_rng(0))
        np.testing.assert_array_equal(img, image[:, view])
        np.testing.assert_array_equal(lbl, label[:, view])


def test_padding_nearest_labels_and_determinism():
    image, label = _pair()
    t = TrainTransform(AugmentConfig(crop=(64, 64), scale=(0.5, 2.0), photometric="mmseg"))
    for seed in range(10):
        img, lbl = t(image, label, np.random.default_rng(seed))
        img2, lbl2 = t(image, label, np.random.default_rng(seed))
        assert torch.equal(img, img2) and torch.equal(lbl, lbl2)
        assert img.shape == (3, 64, 64) and lbl.shape == (64, 64) and lbl.dtype == torch.int64
        assert set(lbl.unique().tolist()) <= {0, 1, 2, 3, 4, 255}
    small = TrainTransform(AugmentConfig(crop=(64, 64), scale=(1, 1), aspect=None, flip=0, photometric="none"))
    img, lbl = small.crop_uint8(image, label, np.random.default_rng(0))
    assert (lbl[20:] == 255).all() and (lbl[:, 30:] == 255).all() and (img[20:] == 0).all()
    np.testing.assert_array_equal(lbl[:20, :30], label)


def test_cat_max_ratio_prefers_mixed_crops():
    label = np.zeros((100, 100), np.uint8)
    label[:, 80:] = 1  # a crop of 40 columns is pure class 0 unless it reaches column 80
    image = np.zeros((100, 100, 3), np.uint8)
    mixed = {}
    for ratio in (1.0, 0.75):
        t = TrainTransform(AugmentConfig(crop=(40, 40), scale=(1, 1), aspect=None, flip=0, cat_max_ratio=ratio,
                                         photometric="none"))
        crops = [t.crop_uint8(image, label, np.random.default_rng(s))[1] for s in range(40)]
        mixed[ratio] = sum(bool((c == 1).any() and (c == 0).any() and (c == 0).mean() < 0.75) for c in crops)
    assert mixed[0.75] > mixed[1.0] + 10


@pytest.mark.parametrize("base", [(2048, 1024), (1024, 2048)])
def test_base_size_keep_ratio_is_orientation_free(base):
    image, label = _pair(10, 20)
    t = TrainTransform(AugmentConfig(crop=(16, 16), base_size=base, scale=(1, 1), aspect=None))
    img, lbl = t(image, label, np.random.default_rng(0))
    assert img.shape == (3, 16, 16) and lbl.shape == (16, 16)


@pytest.mark.parametrize("bgr", [False, True])
def test_device_normalisation_of_a_uint8_batch_equals_the_cpu_path_bit_for_bit(bgr):
    rng = np.random.default_rng(0)
    mean, std = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)
    crops = [rng.integers(0, 256, (24, 40, 3), dtype=np.uint8) for _ in range(3)]
    batch = torch.stack([torch.from_numpy(c) for c in crops])
    expected = torch.stack([normalize(c, mean, std, bgr) for c in crops])
    for channels_last in (False, True):
        out = normalize_batch(batch, mean, std, bgr, channels_last)
        assert torch.equal(out, expected) and out.dtype == torch.float32
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        assert out.is_contiguous(memory_format=fmt)
    with pytest.raises(ValueError, match="uint8"):
        normalize_batch(expected, mean, std)


def test_the_loader_tensors_are_the_uint8_crop_of_the_float_path():
    image, label = make_sample(np.random.default_rng(2), 48, 64)[:2]
    t = TrainTransform(AugmentConfig(crop=(32, 32), scale=(0.5, 2.0), photometric="mmseg"))
    img8, lbl8 = t.uint8_tensors(image, label, np.random.default_rng(5))
    img, lbl = t(image, label, np.random.default_rng(5))
    assert img8.dtype == lbl8.dtype == torch.uint8 and img8.shape == (32, 32, 3)
    assert torch.equal(normalize_batch(img8[None], t.cfg.mean, t.cfg.std)[0], img)
    assert torch.equal(lbl8.long(), lbl)
