"""Packing the official layouts into shards: labels pixel for pixel, bad input through the real CLI, inspect."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anncli.data import datasets
from anncli.data.manifest import read_manifest, resolve_urls
from anncli.data.shards import eval_samples, iter_shard
from anncli.errors import UserError

ANN = str(Path(sys.executable).with_name("ann"))
H, W = 8, 16


def _png(path: Path, arr: np.ndarray, palette: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(arr)
    if palette:  # a 'P' image whose indices are the ids and whose colours are unrelated to them
        im = Image.frombytes("P", (arr.shape[1], arr.shape[0]), arr.tobytes())
        im.putpalette([(i * 37) % 256 for i in range(768)])
    im.save(path)


def _image(rng) -> np.ndarray:
    return rng.integers(0, 256, (H, W, 3), dtype=np.uint8)


def make_cityscapes(root: Path, split: str = "train", n: int = 4, seed: int = 0) -> dict[str, np.ndarray]:
    """Tiny Cityscapes tree; returns key → expected train ids. Every labelId 0..33 appears somewhere."""
    rng = np.random.default_rng(seed)
    lut = {lid: tid for tid, lid in enumerate(datasets.CITYSCAPES_TRAINID_TO_LABELID)}
    expected = {}
    for i in range(n):
        city = ["aachen", "bochum"][i % 2]
        key = f"{city}_{i:06d}_000019"
        ids = ((np.arange(H * W).reshape(H, W) + 7 * i) % 34).astype(np.uint8)
        _png(root / "leftImg8bit" / split / city / f"{key}_leftImg8bit.png", _image(rng))
        _png(root / "gtFine" / split / city / f"{key}_gtFine_labelIds.png", ids)
        expected[key] = np.vectorize(lambda v: lut.get(int(v), 255))(ids).astype(np.uint8)
    return expected


def make_ade(root: Path, n: int = 3) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    base = root / "ADEChallengeData2016"
    expected = {}
    for i in range(n):
        key = f"ADE_val_{i + 1:08d}"
        ids = ((np.arange(H * W).reshape(H, W) * 3 + i) % 151).astype(np.uint8)
        (base / "images" / "validation").mkdir(parents=True, exist_ok=True)
        Image.fromarray(_image(rng)).save(base / "images" / "validation" / f"{key}.jpg", quality=90)
        _png(base / "annotations" / "validation" / f"{key}.png", ids)
        exp = ids.astype(np.int16) - 1
        exp[ids == 0] = 255
        expected[key] = exp.astype(np.uint8)
    return expected


def make_context(root: Path, palette_mode: bool) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(2)
    base = root / "VOCdevkit" / "VOC2010"
    expected, ids_list = {}, []
    for i in range(3):
        key = f"2008_{i:06d}"
        ids = ((np.arange(H * W).reshape(H, W) + 11 * i) % 60).astype(np.uint8)
        (base / "JPEGImages").mkdir(parents=True, exist_ok=True)
        Image.fromarray(_image(rng)).save(base / "JPEGImages" / f"{key}.jpg")
        _png(base / "SegmentationClassContext" / f"{key}.png", ids, palette=palette_mode)
        exp = ids.astype(np.int16) - 1
        exp[ids == 0] = 255
        expected[key] = exp.astype(np.uint8)
        ids_list.append(key)
    listing = base / "ImageSets" / "SegmentationContext" / "val.txt"
    listing.parent.mkdir(parents=True, exist_ok=True)
    listing.write_text("\n".join(ids_list) + "\n")
    return expected


def _read_all(out: Path, dataset: str, split: str) -> dict[str, dict]:
    urls = resolve_urls(str(out), dataset, split)
    return {s["key"]: s for s in eval_samples(urls, rank=0, world_size=1)}


def test_cityscapes_labels_and_original_bytes(tmp_path):
    expected = make_cityscapes(tmp_path / "cs")
    manifest = datasets.pack_dataset("cityscapes", tmp_path / "cs", tmp_path / "out", split="train", max_samples=3)
    assert manifest["total"] == 4 and [s["count"] for s in manifest["shards"]] == [3, 1]
    assert manifest["classes"] == datasets.CITYSCAPES_CLASSES and manifest["ignore_index"] == 255
    got = _read_all(tmp_path / "out", "cityscapes", "train")
    assert set(got) == set(expected)
    for key, exp in expected.items():
        np.testing.assert_array_equal(got[key]["label"], exp)
    # the image bytes are the original file, never re-encoded
    key, fields = next(iter_shard(str(tmp_path / "out" / "cityscapes-train-000000.tar")))
    city = key.split("_")[0]
    assert fields["img.png"] == (tmp_path / "cs/leftImg8bit/train" / city / f"{key}_leftImg8bit.png").read_bytes()
    assert json.loads(fields["meta.json"])["key"] == key


def test_train_order_is_shuffled_and_seeded(tmp_path):
    make_cityscapes(tmp_path / "cs", n=12)
    orders = []
    for seed in (0, 0, 1):
        out = tmp_path / f"out{len(orders)}"
        datasets.pack_dataset("cityscapes", tmp_path / "cs", out, split="train", max_samples=100, seed=seed)
        orders.append([k for k, _ in iter_shard(str(out / "cityscapes-train-000000.tar"))])
    assert orders[0] == orders[1] != orders[2]
    assert orders[0] != sorted(orders[0])


def test_ade20k_reduce_zero_label(tmp_path):
    expected = make_ade(tmp_path / "ade")
    manifest = datasets.pack_dataset("ade20k", tmp_path / "ade", tmp_path / "out", split="validation")
    assert manifest["split"] == "val" and len(manifest["classes"]) == 150
    got = _read_all(tmp_path / "out", "ade20k", "val")
    for key, exp in expected.items():
        np.testing.assert_array_equal(got[key]["label"], exp)
        assert got[key]["image"].shape == (H, W, 3)


@pytest.mark.parametrize("palette_mode", [False, True], ids=["L", "P"])
def test_pascal_context_ids_survive_both_png_modes(tmp_path, palette_mode):
    expected = make_context(tmp_path / "ctx", palette_mode)
    some_label = next((tmp_path / "ctx").rglob("SegmentationClassContext/*.png"))
    assert Image.open(some_label).mode == ("P" if palette_mode else "L")
    datasets.pack_dataset("pascal-context", tmp_path / "ctx", tmp_path / "out", split="val")
    got = _read_all(tmp_path / "out", "pascal_context", "val")
    for key, exp in expected.items():
        np.testing.assert_array_equal(got[key]["label"], exp)
    assert read_manifest(tmp_path / "out", "pascal_context", "val")["classes"][0] == "aeroplane"


def test_tables():
    for name, n in [("cityscapes", 19), ("ade20k", 150), ("pascal-context", 59), ("synth", 5)]:
        assert len(datasets.class_names(name)) == n and len(datasets.palette(name)) == n
        assert all(len(c) == 3 and all(0 <= v <= 255 for v in c) for c in datasets.palette(name))
    assert datasets.class_names("ade20k")[7] == "bed" and datasets.class_names("pascal_context")[-1] == "wood"
    lut = datasets.label_lut("cityscapes")
    assert [int(lut[v]) for v in datasets.CITYSCAPES_TRAINID_TO_LABELID] == list(range(19))


def test_skip_missing(tmp_path):
    make_cityscapes(tmp_path / "cs", n=3)
    next((tmp_path / "cs/gtFine/train").glob("*/*_labelIds.png")).unlink()
    with pytest.raises(UserError, match="1 image"):
        datasets.pack_dataset("cityscapes", tmp_path / "cs", tmp_path / "out", split="train")
    manifest = datasets.pack_dataset("cityscapes", tmp_path / "cs", tmp_path / "out", split="train", skip_missing=True)
    assert manifest["total"] == 2


def _cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([ANN, *args], capture_output=True, text=True, timeout=120)


def test_cli_bad_inputs_exit_2_with_one_line(tmp_path):
    make_cityscapes(tmp_path / "cs", n=2)
    bad = (np.arange(H * W).reshape(H, W) % 40 + 10).astype(np.uint8)  # 34..49 are not labelIds
    _png(next((tmp_path / "cs/gtFine/train").glob("*/*_labelIds.png")), bad)
    (tmp_path / "cs/gtFine/val").mkdir(parents=True)
    _png(tmp_path / "cs/gtFine/val/x/x_000000_000000_gtFine_labelIds.png", bad % 30)
    (tmp_path / "cs/leftImg8bit/val").mkdir(parents=True)
    cases = [
        (["cityscapes", str(tmp_path / "nope"), str(tmp_path / "o"), "--split", "train"], "not found"),
        (["ade20k", str(tmp_path / "cs"), str(tmp_path / "o"), "--split", "training"], "images/training"),
        (["cityscapes", str(tmp_path / "cs"), str(tmp_path / "o"), "--split", "train"], "label values [34"),
        (["cityscapes", str(tmp_path / "cs"), str(tmp_path / "o"), "--split", "val"], "label(s) without an image"),
    ]
    for args, needle in cases:
        r = _cli("data", "pack", *args)
        assert r.returncode == 2, (args, r.stderr)
        assert needle in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert "Traceback" not in r.stderr


def test_cli_inspect_json(tmp_path):
    make_cityscapes(tmp_path / "cs", n=3)
    datasets.pack_dataset("cityscapes", tmp_path / "cs", tmp_path / "out", split="train", max_samples=2)
    r = _cli("data", "inspect", str(tmp_path / "out" / "cityscapes-train-{000000..000001}.tar"), "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["samples"] == 3 and report["shards"] == 2 and report["ok"]
    assert report["image_sizes"] == {f"{H}x{W}": 3}
    by_name = {c["name"]: c["pixels"] for c in report["classes"]}
    assert len(by_name) == 19 and sum(by_name.values()) + report["ignore_pixels"] == 3 * H * W
    r = _cli("data", "inspect", str(tmp_path / "out" / "cityscapes-val-{000000..000003}.tar"))
    assert r.returncode == 2 and "cityscapes-val-{000000..000003}.tar" in r.stderr


def test_cli_inspect_exits_1_and_lists_problems_readably(tmp_path):
    """A non-image member and a truncated shard: exit 1, one plain line per problem, no object reprs."""
    import io
    import tarfile

    make_cityscapes(tmp_path / "cs", n=3)
    datasets.pack_dataset("cityscapes", tmp_path / "cs", tmp_path / "out", split="train", max_samples=2)
    first, second = tmp_path / "out" / "cityscapes-train-000000.tar", tmp_path / "out" / "cityscapes-train-000001.tar"
    with tarfile.open(first) as tf:
        members = [(m, tf.extractfile(m).read()) for m in tf.getmembers()]
    with tarfile.open(first, "w") as tf:
        for m, data in members:
            if m.name.endswith(".img.png") and m.name.startswith(members[0][0].name.split(".")[0]):
                data = b"this is not an image"
                m.size = len(data)
            tf.addfile(m, io.BytesIO(data))
    second.write_bytes(second.read_bytes()[:700])  # cut inside the first member
    r = _cli("data", "inspect", str(tmp_path / "out" / "cityscapes-train-{000000..000001}.tar"))
    assert r.returncode == 1, r.stdout + r.stderr
    lines = [line for line in r.stdout.splitlines() if line.startswith("problem: ")]
    assert len(lines) == 3, r.stdout
    assert "img.png is not a readable image (20 bytes, starts 74 68 69 73" in lines[0] and str(first) in lines[0]
    assert str(second) in lines[1] and "unreadable after 0 samples: unexpected end of data" in lines[1]
    assert lines[2].endswith("0 samples, manifest says 1")
    assert "_io.BytesIO" not in r.stdout and "3 problem(s)" in r.stdout
    j = _cli("data", "inspect", str(tmp_path / "out" / "cityscapes-train-{000000..000001}.tar"), "--json")
    assert j.returncode == 1 and len(json.loads(j.stdout)["problems"]) == 3
