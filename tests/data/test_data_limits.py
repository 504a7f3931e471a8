"""Bombs and crafted names on real files: a gzip'd shard, a 20000x20000 PNG with a tiny body, an oversized
tar member, a deflated .pth that inflates, and a manifest whose shard name is a `pipe:` command."""

import io
import json
import struct
import tarfile
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from anncli.data.manifest import resolve_urls
from anncli.data.guards import CompressedShard, Limits, header_hw
from anncli.data.images import decode_label
from anncli.data.shards import eval_samples, iter_shard
from anncli.data.synth import _encode_png
from anncli.errors import UserError
from anncli.interop.weights import read_state_dict
from conftest import run_ann
from test_data_safety import _raw_shard


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_bomb(width: int = 20000, height: int = 20000, depth: int = 8) -> bytes:
    """A valid greyscale PNG of width x height zeros, `depth` bits a pixel: a few hundred KB (48 KB at 1 bit)
    that decode to width*height pixels."""
    rows = zlib.compressobj(9)
    row = b"\x00" * (-(-width * depth // 8) + 1)  # filter byte + pixels
    body = b"".join(rows.compress(row) for _ in range(height)) + rows.flush()
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, depth, 0, 0, 0, 0))
            + _chunk(b"IDAT", body) + _chunk(b"IEND", b""))


def _tar(path: Path, members: dict[str, bytes]) -> str:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


@pytest.fixture(scope="module")
def bomb() -> bytes:
    return png_bomb()


def test_pixels_are_checked_from_the_header_before_decoding(tmp_path, bomb):
    assert len(bomb) < 1_000_000 and header_hw(bomb) == (20000, 20000)
    with pytest.raises(Exception, match=r"label is 20000x20000 pixels \(HxW\), over data.max_pixels=64000000"):
        decode_label(bomb)
    image = np.zeros((8, 8, 3), np.uint8)
    url = _tar(tmp_path / "bomb-val-000000.tar", {"s0.img.png": _encode_png(image), "s0.seg.png": bomb})
    with pytest.raises(UserError) as err:  # evaluation: one line naming the shard, the sample and the cap
        list(eval_samples([url], rank=0, world_size=1))
    assert "bomb-val-000000.tar: sample s0: label is 20000x20000 pixels" in str(err.value)
    assert "--set data.max_pixels" in str(err.value) and "\n" not in str(err.value)
    res = run_ann("data", "inspect", url, "--json")
    assert res.returncode == 1 and "label is 20000x20000 pixels" in res.stdout, res.stderr[-2000:]


def test_a_jpeg_header_gives_its_size():
    import cv2

    ok, data = cv2.imencode(".jpg", np.zeros((24, 40, 3), np.uint8))
    assert ok and header_hw(data.tobytes()) == (24, 40)
    with pytest.raises(Exception, match=r"image is 24x40 pixels \(HxW\), over data.max_pixels=100"):
        Limits(max_pixels=100).check_pixels("image", data.tobytes())


def test_a_member_over_the_cap_is_refused_before_it_is_read(tmp_path):
    url = _tar(tmp_path / "big-val-000000.tar", {"s0.img.png": b"\0" * (3 << 20), "s0.seg.png": b"x"})
    with pytest.raises(tarfile.ReadError, match=r"member s0.img.png holds 3 MB, over data.max_member_mb=2"):
        list(iter_shard(url, Limits(max_member_mb=2)))
    res = run_ann("data", "inspect", url, "--max-member-mb", "2")
    assert res.returncode == 1 and "over data.max_member_mb=2" in res.stdout, res.stdout + res.stderr


def test_a_gzip_compressed_shard_is_refused_by_name(tmp_path):
    plain = _raw_shard(tmp_path / "x-val-000000.tar", ["s0", "s1"])
    gz = tmp_path / "x-val-000000.tar.gz"
    import gzip

    gz.write_bytes(gzip.compress(Path(plain).read_bytes()))
    with pytest.raises(CompressedShard, match=r"x-val-000000.tar.gz: a gzip-compressed tar"):
        list(iter_shard(str(gz)))
    with pytest.raises(CompressedShard):
        list(iter_shard(f"pipe:cat {gz}"))
    res = run_ann("data", "inspect", str(gz))
    assert res.returncode == 2 and "gzip-compressed tar" in res.stderr and "gunzip" in res.stderr, res.stdout
    assert len(res.stderr.strip().splitlines()) == 1
    assert [k for k, _ in iter_shard(f"pipe:cat {plain}")] == ["s0", "s1"]  # plain streams still read whole


def _deflated_pth(path: Path, mb: int) -> Path:
    """A real torch file whose members are re-stored deflated: small on disk, `mb` MiB once loaded."""
    plain = path.with_suffix(".plain")
    torch.save({"state_dict": {"cls.weight": torch.zeros(mb << 18)}}, plain)
    with zipfile.ZipFile(plain) as src, zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info))
    plain.unlink()
    return path


def test_a_deflated_checkpoint_is_sized_before_loading(tmp_path):
    pth = _deflated_pth(tmp_path / "bomb.pth", 24)
    assert pth.stat().st_size < 1 << 20
    with pytest.raises(UserError, match=r"bomb.pth: loads into 24 MB, over --max-checkpoint-mb 16"):
        read_state_dict(pth, max_mb=16)
    for args in (["import", "official", pth, "--out", tmp_path / "out"], ["inspect", pth]):
        res = run_ann("weights", *args, "--max-checkpoint-mb", "16")
        assert res.returncode == 2 and "over --max-checkpoint-mb 16" in res.stderr, res.stderr[-2000:]
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- a manifest may name files only


@pytest.mark.parametrize("name", ["pipe:touch PWNED", "http://127.0.0.1:1/x.tar", "../other/x.tar", "/etc/x.tar"])
def test_a_manifest_names_files_beside_it_never_commands(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    manifest = {"classes": ["a"], "shards": [{"name": name, "count": 1}]}
    (tmp_path / "synth-val.json").write_text(json.dumps(manifest))
    if "/" not in name:
        (tmp_path / name).write_bytes(b"")  # a file of that name exists: the name passes a check for files
    with pytest.raises(UserError, match=r"shard name .* is not a file name in the manifest's folder"):
        resolve_urls(".", "synth", "val")
    with pytest.raises(UserError, match="not a file name"):
        resolve_urls(".", "synth", "synth-val.json")
    assert not (tmp_path / "PWNED").exists()
