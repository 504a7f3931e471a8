"""Reading shards: the training stream's uint8 batches and their resume, exact-once eval split, faults and
the skip bound of the training stream, URLs, and the per-shard sample counts the global order needs
(manifests, or tar headers). The global order itself: tests/data/test_data_order.py."""

import json
import logging
import shutil

import numpy as np
import pytest
import torch

from anncli.data.global_stream import GlobalStream
from anncli.data.counts import shard_counts
from anncli.data.manifest import resolve_urls
from anncli.data.shards import DataError, ShardWriter, eval_samples
from anncli.data.synth import _encode_png, make_sample, write_synth
from anncli.data.transforms import normalize_batch
from anncli.errors import UserError
from anncli.recipe import AugmentConfig

AUG = AugmentConfig(crop=(24, 40), scale=(0.5, 1.5), photometric="mmseg", brightness_delta=32)


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    write_synth(root, train=60, val=50, size=(32, 64), seed=3, max_samples=20, verbose=False)  # 3 train, 3 val shards
    return root


def _stream(urls, counts, **kw):
    args = dict(augment=AUG, batch_size=3, effective_batch=3, seed=7, rank=0, world_size=1, num_workers=0, lanes=4)
    return GlobalStream(urls, counts, **{**args, **kw})


def _take(stream, n):
    it = iter(stream)
    out = [next(it) for _ in range(n)]
    it.close()
    return out


def _same(a, b):
    return a["keys"] == b["keys"] and torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])


@pytest.mark.parametrize("num_workers", [0, 2])
def test_batches_are_uint8_and_resume_exactly(synth_root, num_workers):
    urls = resolve_urls(str(synth_root), "synth", "train")
    counts = shard_counts(urls, synth_root)
    reference = _take(_stream(urls, counts, num_workers=num_workers), 9)
    first = _stream(urls, counts, num_workers=num_workers)
    head = _take(first, 5)
    state = json.loads(json.dumps(first.state_dict()))  # plain JSON values
    resumed = _stream(urls, counts, num_workers=num_workers)
    resumed.load_state_dict(state)
    tail = _take(resumed, 4)
    assert all(_same(a, b) for a, b in zip(reference, head + tail))
    # uint8 through the loader; the step normalises on the device (float32 NCHW) and takes labels as int64
    assert reference[0]["image"].shape == (3, 24, 40, 3) and reference[0]["image"].dtype == torch.uint8
    assert reference[0]["label"].shape == (3, 24, 40) and reference[0]["label"].dtype == torch.uint8
    on_device = normalize_batch(reference[0]["image"], AUG.mean, AUG.std, AUG.bgr)
    assert on_device.shape == (3, 3, 24, 40) and on_device.dtype == torch.float32
    assert set(torch.cat([b["label"].unique() for b in reference]).tolist()) <= {0, 1, 2, 3, 4, 255}
    assert resumed.samples_seen == 9 * 3 and resumed.samples_skipped == 0


def test_eval_split_exactly_once(tmp_path):
    writer = ShardWriter(tmp_path, "synth-val", max_count=4, max_size=1 << 40)
    rng = np.random.default_rng(0)
    for i in range(37):  # 10 shards: 9 × 4 + 1
        image, label, _ = make_sample(rng, 16, 32)
        writer.write(f"s{i:03d}", {"img.png": _encode_png(image), "seg.png": _encode_png(label)})
    urls = [str(tmp_path / s["name"]) for s in writer.close()]
    assert len(urls) == 10
    keys = []
    for rank in range(3):
        got = list(eval_samples(urls, rank=rank, world_size=3, num_workers=2))
        assert all(s["image"].dtype == np.uint8 and s["image"].shape == (16, 32, 3) for s in got)
        keys += [s["key"] for s in got]
    assert sorted(keys) == [f"s{i:03d}" for i in range(37)]
    assert list(eval_samples(urls, rank=11, world_size=12, num_workers=2)) == []


# ---------------------------------------------------------------- faults


def _bad_shards(tmp_path, n_good=30):
    """Two shards: one with a corrupt PNG and a sample missing its label, one truncated mid-way."""
    rng = np.random.default_rng(1)
    good = [make_sample(rng, 32, 64)[:2] for _ in range(n_good)]
    writer = ShardWriter(tmp_path, "bad-train", max_count=1000, max_size=1 << 40)
    for i, (image, label) in enumerate(good[: n_good // 2]):
        members = {"img.png": _encode_png(image), "seg.png": _encode_png(label)}
        if i == 3:
            members["img.png"] = b"\x89PNG\r\n\x1a\n not really a png"
        if i == 6:
            del members["seg.png"]
        writer.write(f"a{i:03d}", members)
    writer.close()
    writer = ShardWriter(tmp_path, "trunc-train", max_count=1000, max_size=1 << 40)
    for i, (image, label) in enumerate(good[n_good // 2 :]):
        writer.write(f"b{i:03d}", {"img.png": _encode_png(image), "seg.png": _encode_png(label)})
    writer.close()
    trunc = tmp_path / "trunc-train-000000.tar"
    data = trunc.read_bytes()
    trunc.write_bytes(data[: len(data) // 2 + 100])
    return [str(tmp_path / "bad-train-000000.tar"), str(trunc)]


def test_training_counts_and_skips_faults(tmp_path, caplog):
    urls = _bad_shards(tmp_path)
    stream = _stream(urls, [15, 15], max_skip_fraction=0.5)  # the counts a manifest written at packing holds
    with caplog.at_level(logging.WARNING, logger="anncli.data"):
        batches = _take(stream, 20)  # two passes over the 30 samples
    keys = {k for b in batches for k in b["keys"]}
    assert "a003" not in keys and "a006" not in keys and "a004" in keys
    assert all(len(b["keys"]) == 3 for b in batches)  # bad samples were replaced
    assert stream.samples_skipped >= 3
    messages = [r.getMessage() for r in caplog.records]
    assert any("a003" in m and "not a readable image" in m for m in messages)
    assert any("a006" in m and "missing field seg.png" in m for m in messages)
    for cycle in (0, 1):  # once per shard and cycle: the next cycle reads the shard again
        assert sum("trunc-train-000000.tar" in m and f"is cut after 8 samples in cycle {cycle}" in m
                   for m in messages) == 1
    assert all("\n" not in m for m in messages)


def test_training_aborts_above_the_skip_bound(tmp_path):
    urls = _bad_shards(tmp_path)
    with pytest.raises(DataError, match="max_skip_fraction=0.01"):
        _take(_stream(urls, [15, 15], max_skip_fraction=0.01), 200)
    with pytest.raises(DataError, match="max_skip_fraction"):
        _take(_stream(urls, [15, 15], max_skip_fraction=0.01, num_workers=2), 200)


def test_eval_errors_name_shard_and_key(tmp_path):
    bad, trunc = _bad_shards(tmp_path)
    with pytest.raises(UserError, match=r"bad-train-000000\.tar: sample a003"):
        list(eval_samples([bad], rank=0, world_size=1))
    with pytest.raises(UserError, match=r"trunc-train-000000\.tar: shard unreadable after sample b0"):
        list(eval_samples([trunc], rank=0, world_size=1, num_workers=1))


# ---------------------------------------------------------------- URLs


def test_resolve_urls(synth_root, tmp_path):
    root = str(synth_root)
    by_split = resolve_urls(root, "synth", "val")
    assert [u.rsplit("/", 1)[1] for u in by_split] == [f"synth-val-00000{i}.tar" for i in range(3)]
    assert resolve_urls(root, "synth", "synth-val-{000000..000002}.tar") == by_split
    assert resolve_urls(root, "synth", str(synth_root / "synth-val.json")) == by_split
    assert resolve_urls(root, "synth", "pipe:cat x.tar") == ["pipe:cat x.tar"]
    assert resolve_urls(root, "synth", "https://h/s-{0..1}.tar") == ["https://h/s-0.tar", "https://h/s-1.tar"]
    with pytest.raises(UserError, match="synth-test.json"):
        resolve_urls(root, "synth", "test")
    with pytest.raises(UserError, match=r"synth-val-\{000007\.\.000009\}\.tar"):
        resolve_urls(root, "synth", "synth-val-{000007..000009}.tar")
    with pytest.raises(UserError, match="1 of 4"):
        resolve_urls(root, "synth", "synth-val-{000000..000003}.tar")
    (tmp_path / "broken-val.json").write_text("{not json")
    with pytest.raises(UserError, match="not a valid shard manifest"):
        resolve_urls(str(tmp_path), "broken", "val")


def test_pipe_urls_are_read(synth_root):
    urls = [f"pipe:cat {u}" for u in resolve_urls(str(synth_root), "synth", "val")]
    assert len(list(eval_samples(urls, rank=0, world_size=1))) == 50
    assert len(_take(_stream(urls, shard_counts(urls, synth_root)), 2)) == 2


# ---------------------------------------------------------------- sample counts


def test_shard_counts_come_from_manifests_else_from_tar_headers(synth_root, tmp_path, capsys):
    urls = resolve_urls(str(synth_root), "synth", "train")
    manifest = [20, 20, 20]
    assert shard_counts(urls, synth_root) == manifest
    by_pattern = resolve_urls(str(synth_root), "synth", "synth-train-{000000..000002}.tar")
    assert shard_counts(by_pattern, "/nonexistent") == manifest  # the manifest beside the shards
    assert shard_counts([f"pipe:cat {u}" for u in urls], synth_root) == manifest  # by file name
    assert "tar headers" not in capsys.readouterr().err

    bare = tmp_path / "bare"
    bare.mkdir()
    for u in urls:
        shutil.copy(u, bare)
    copies = resolve_urls(str(bare), "synth", "synth-train-{000000..000002}.tar")
    assert shard_counts(copies, bare) == manifest
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "3 training shard(s) are in no manifest" in err and "ann data pack" in err
    assert shard_counts([f"pipe:cat {u}" for u in copies], bare, announce=False) == manifest
    cut = bare / "synth-train-000000.tar"
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    assert 0 < shard_counts([str(cut)], bare, announce=False)[0] < 20  # a cut shard: its readable samples
