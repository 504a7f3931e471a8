"""`ann data synth` and `ann data pack` under a real file-size limit (RLIMIT_FSIZE, set in the child) and on
a real full file system (a small tmpfs): one line, exit 2, none of their files left behind (no 0-byte
`*.tar.tmp`), and an earlier set under the same names kept as it was."""

import resource
import subprocess

import pytest

from conftest import ROOT, ann_cmd, ann_env
from test_data_pack import make_cityscapes
from test_faults import tmpfs  # noqa: F401  (a fixture: a real small file system)


def _ann(*args, file_limit: int | None = None) -> subprocess.CompletedProcess:
    limit = None if file_limit is None else (lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (file_limit,) * 2))
    return subprocess.run(ann_cmd(*args), capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env=ann_env(PYTHONDONTWRITEBYTECODE="1"), preexec_fn=limit)


def _command(kind: str, source, out) -> list:
    if kind == "synth":
        return ["data", "synth", out, "--train", 40, "--val", 4, "--size", "32x64", "--max-samples", 100]
    return ["data", "pack", "cityscapes", source, out, "--split", "train", "--max-samples", 100]


def _one_line(res, reason: str) -> None:
    assert res.returncode == 2, res.stdout[-2000:] + res.stderr[-2000:]
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("ann: error: writing shards: "), res.stderr
    assert reason in lines[0] and ".tmp" not in lines[0], lines[0]


def _files(folder) -> dict:
    return {p.name: p.read_bytes() for p in folder.iterdir()} if folder.exists() else {}


@pytest.fixture(scope="module")
def cityscapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("cs")
    make_cityscapes(root, n=40)
    return root


@pytest.mark.parametrize("kind", ["synth", "pack"])
def test_a_write_over_the_file_size_limit_is_one_line_and_leaves_nothing(tmp_path, cityscapes, kind):
    fresh = tmp_path / "fresh"
    _one_line(_ann(*_command(kind, cityscapes, fresh), file_limit=16 << 10), "over the file-size limit")
    assert not fresh.exists()  # the folder it made is gone too
    earlier = tmp_path / "earlier"
    assert _ann(*_command(kind, cityscapes, earlier)).returncode == 0
    before = _files(earlier)
    again = _command(kind, cityscapes, earlier) + (["--force"] if kind == "synth" else [])
    _one_line(_ann(*again, file_limit=16 << 10), "over the file-size limit")
    assert _files(earlier) == before  # the earlier set, byte for byte, and nothing beside it


@pytest.mark.parametrize("kind", ["synth", "pack"])
def test_a_full_disk_is_one_line_naming_the_device_and_leaves_nothing(tmpfs, cityscapes, kind):  # noqa: F811
    disk = tmpfs("64k")
    _one_line(_ann(*_command(kind, cityscapes, disk / "out")), "no space left on tmpfs at ")
    assert _files(disk) == {}
