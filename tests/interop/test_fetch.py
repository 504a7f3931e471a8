"""Weights by URL, fetched into the cache: a real HTTP server on 127.0.0.1 (weights_server.py) serving files
made here, and the real `ann` in subprocesses. No network beyond 127.0.0.1.

What is held: a file is downloaded once (across processes, under a lock that a killed holder does not
keep), resumed with a range, verified against the hash its name carries, and appears under its final name
only whole; every bad answer, a full or read-only cache and a dead server are one line, exit 2.
"""

from __future__ import annotations

import hashlib
import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT, ann_cmd, ann_env
from weights_server import CHUNK, WeightsServer, dead_server


def checkpoint_bytes(kib: int = 600, seed: int = 0) -> bytes:
    g = torch.Generator().manual_seed(seed)
    buffer = io.BytesIO()
    torch.save({"w": torch.randn(kib * 256, generator=g)}, buffer)
    return buffer.getvalue()


def hashed_name(stem: str, data: bytes) -> str:
    return f"{stem}-{hashlib.sha256(data).hexdigest()[:8]}.pth"


def env_for(cache: Path, **extra) -> dict:
    return ann_env(ANN_CACHE_DIR=str(cache), **extra)


def ann(*args, cache: Path, timeout: float = 120, **env) -> subprocess.CompletedProcess:
    return subprocess.run(ann_cmd(*args), capture_output=True, text=True, cwd=ROOT, env=env_for(cache, **env),
                          timeout=timeout)


def one_line(result: subprocess.CompletedProcess, *needles: str) -> str:
    assert result.returncode == 2, (result.stdout, result.stderr)
    errors = [line for line in result.stderr.splitlines() if line.startswith("ann: error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def cached_files(cache: Path) -> list[Path]:
    """What is under a final name in the cache (not a .part, .lock or .json beside one)."""
    return [p for p in cache.rglob("*.pth") if p.is_file()]


def cache_path(cache: Path, url: str, monkeypatch) -> Path:
    from anncli.interop.cache import file_for

    monkeypatch.setenv("ANN_CACHE_DIR", str(cache))
    return file_for(url)


@pytest.fixture
def server():
    s = WeightsServer()
    yield s
    s.stop()


def test_a_file_is_downloaded_verified_and_printed(server, tmp_path, monkeypatch):
    data = checkpoint_bytes()
    url = server.add(hashed_name("w", data), data)
    result = ann("weights", "fetch", url, cache=tmp_path / "cache")
    assert result.returncode == 0, result.stderr
    path = Path(result.stdout.strip())
    assert path == cache_path(tmp_path / "cache", url, monkeypatch) and path.read_bytes() == data
    assert not list(path.parent.glob("*.part*"))
    again = ann("weights", "fetch", url, cache=tmp_path / "cache")
    assert again.stdout == result.stdout and len(server.gets) == 1  # the second answer is the cache's


def test_progress_is_one_line_per_tenth_without_a_terminal(server, tmp_path):
    data = checkpoint_bytes(kib=640)
    result = ann("weights", "fetch", server.add(hashed_name("w", data), data), cache=tmp_path / "cache")
    assert result.returncode == 0, result.stderr
    shown = [int(line.split(": ")[1].split("%")[0]) for line in result.stderr.splitlines() if "% (" in line]
    assert shown == sorted(set(shown)) and shown[-1] == 100 and len(shown) >= 5, result.stderr
    assert all(p % 10 == 0 for p in shown)


def test_a_wrong_hash_in_the_name_is_refused_and_nothing_is_cached(server, tmp_path):
    data = checkpoint_bytes()
    digest = hashlib.sha256(data).hexdigest()
    wrong = "0" * 8 if not digest.startswith("0" * 8) else "1" * 8
    url = server.add(f"w-{wrong}.pth", data)
    one_line(ann("weights", "fetch", url, cache=tmp_path / "cache"), f"starts {digest[:8]}", f"says {wrong}",
             "removed")
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file() and not p.name.endswith(".lock")]


def test_two_processes_started_together_download_once(tmp_path):
    server = WeightsServer(hold=2 * CHUNK)  # the first answer waits until the second process waits too
    try:
        data = checkpoint_bytes()
        url = server.add(hashed_name("w", data), data)
        logs = [tmp_path / "a.err", tmp_path / "b.err"]
        procs = [subprocess.Popen(ann_cmd("weights", "fetch", url), cwd=ROOT, env=env_for(tmp_path / "cache"),
                                  stdout=subprocess.PIPE, stderr=open(log, "w"), text=True) for log in logs]
        deadline = time.time() + 120
        while not any("waiting for pid" in log.read_text() for log in logs):
            assert time.time() < deadline and all(p.poll() is None for p in procs), [l.read_text() for l in logs]
            time.sleep(0.05)
        server.release()
        outs = [p.communicate(timeout=120)[0] for p in procs]
        assert [p.returncode for p in procs] == [0, 0], [l.read_text() for l in logs]
        assert outs[0] == outs[1] and Path(outs[0].strip()).read_bytes() == data
        assert len(server.gets) == 1, server.gets
    finally:
        server.stop()


# A CLI whose flock fails with ENOLCK, as on NFS without locking: locks become O_EXCL files.
NO_FLOCK = ("import errno, sys\nimport anncli.runs.locks as locks\n"
            "def no_flock(fd, op):\n    raise OSError(errno.ENOLCK, 'No locks available')\n"
            "locks.flock = no_flock\nfrom anncli.cli.main import main\nsys.argv = ['ann', *sys.argv[1:]]\nmain()\n")


@pytest.mark.parametrize("locking", ["flock", "o_excl"])
def test_a_killed_download_resumes_and_its_lock_does_not_block_the_next(tmp_path, monkeypatch, locking):
    server = WeightsServer(hold=4 * CHUNK)
    try:
        data = checkpoint_bytes()
        url = server.add(hashed_name("w", data), data)
        final = cache_path(tmp_path / "cache", url, monkeypatch)
        part = final.with_name(final.name + ".part")
        cmd = ann_cmd("weights", "fetch", url) if locking == "flock" else [sys.executable, "-c", NO_FLOCK, "weights",
                                                                            "fetch", url]
        first = subprocess.Popen(cmd, cwd=ROOT, env=env_for(tmp_path / "cache"), stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while not (part.exists() and part.stat().st_size >= 4 * CHUNK):
            assert time.time() < deadline and first.poll() is None
            time.sleep(0.05)
        os.kill(first.pid, signal.SIGKILL)  # holding the lock, half-way through the file
        first.wait()
        server.hold = None
        server.release()
        second = subprocess.run(cmd, cwd=ROOT, env=env_for(tmp_path / "cache"), capture_output=True, text=True,
                                timeout=120)
        assert second.returncode == 0, second.stderr
        assert final.read_bytes() == data and not part.exists()
        assert server.gets[-1] == (f"/{final.name}", f"bytes={4 * CHUNK}-"), server.gets
        if locking == "o_excl":
            assert "does not support flock" in second.stderr
            assert not final.with_name(final.name + ".lock.held").exists()
    finally:
        server.stop()


def test_a_connection_dropped_mid_file_is_resumed_with_a_range(tmp_path):
    server = WeightsServer(drop="first")
    try:
        data = checkpoint_bytes()
        url = server.add(hashed_name("w", data), data)
        result = ann("weights", "fetch", url, cache=tmp_path / "cache")
        assert result.returncode == 0, result.stderr
        assert Path(result.stdout.strip()).read_bytes() == data
        assert [r for _, r in server.gets] == [None, f"bytes={len(data) // 2}-"]
    finally:
        server.stop()


def test_bad_answers_are_one_line_and_leave_nothing_under_the_final_name(server, tmp_path):
    cache = tmp_path / "cache"
    data = checkpoint_bytes(kib=64)
    html = b"<!DOCTYPE html><html><body>Sign in</body></html>"
    cases = [
        (server.url("missing-0badc0de.pth"), ["HTTP 404"]),
        (server.add("page.pth", html, "text/html; charset=utf-8"), ["HTML page"]),
        (server.add("login.pth", html), ["HTML page"]),
        (server.add("notes.pth", b"just some text\n" * 100), ["not a torch checkpoint"]),
        (server.url("a/../../escape.pth"), ["cannot be a file name in the weights cache"]),
        (server.url("a%2F..%2Fescape.pth"), ["cannot be a file name in the weights cache"]),
        ("mmseg://ann_r50-d8_no_such_config", ["unknown name", "ann weights fetch --list"]),
        ("open-mmlab://resnet18_v1c", ["unknown name", "did you mean open-mmlab://"]),
        (str(tmp_path / "local.pth"), ["not a URL or a name"]),
    ]
    for source, needles in cases:
        one_line(ann("weights", "fetch", source, cache=cache), *needles)
    assert cached_files(cache) == [] and not list(cache.rglob("*.part"))

    cut = WeightsServer(ranges=False, drop="always")  # a server that cannot resume, cutting every answer
    try:
        url = cut.add(hashed_name("w", data), data)
        one_line(ann("weights", "fetch", url, cache=cache), "connection ended at", "cannot resume", "nothing was kept")
    finally:
        cut.stop()
    assert cached_files(cache) == [] and not list(cache.rglob("*.part"))


def test_a_dead_server_an_unreachable_one_or_offline_is_one_line_naming_the_cache(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    sock, url = dead_server()
    try:
        one_line(ann("weights", "fetch", url, cache=cache, ANN_DOWNLOAD_TIMEOUT="1"), "no answer within 1 s",
                 "ann weights fetch")
    finally:
        sock.close()
    stopped = WeightsServer()
    url = stopped.url("w-0123abcd.pth")
    stopped.stop()
    final = cache_path(cache, url, monkeypatch)
    one_line(ann("weights", "fetch", url, cache=cache), "cannot download", str(final), f"ann weights fetch {url}")
    one_line(ann("weights", "fetch", "open-mmlab://resnet50_v1c", cache=cache, ANN_OFFLINE="1"), "ANN_OFFLINE",
             "https://download.openmmlab.com/pretrain/third_party/resnet50_v1c-2cccc1ad.pth", str(cache),
             "ann weights fetch open-mmlab://resnet50_v1c")
    assert cached_files(cache) == []


from test_eval_results_kept import _limited  # noqa: E402
from test_faults import tmpfs  # noqa: E402,F401  (the fixture: a real small file system)


def test_a_full_disk_a_file_size_limit_or_a_read_only_cache_is_one_line(server, tmpfs, tmp_path):
    data = checkpoint_bytes()
    url = server.add(hashed_name("w", data), data)
    full = tmpfs("64k")
    one_line(ann("weights", "fetch", url, cache=full), f"no space left on tmpfs at {full}", "removed")
    assert not [p for p in full.rglob("*") if p.is_file() and p.suffix in (".pth", ".part")]
    limited = subprocess.run(ann_cmd("weights", "fetch", url), capture_output=True, text=True, cwd=ROOT, timeout=120,
                             env=env_for(tmp_path / "cache"), preexec_fn=_limited(200_000))
    one_line(limited, "file too large", "removed")
    assert cached_files(tmp_path / "cache") == []
    read_only = tmpfs("1m", readonly=True)
    one_line(ann("weights", "fetch", url, cache=read_only), "read-only file system", "ANN_CACHE_DIR")


def test_an_interrupted_download_never_appears_under_the_final_name(tmp_path, monkeypatch):
    """While the .part grows the final name does not exist: readers on other nodes never see half a file."""
    server = WeightsServer(hold=2 * CHUNK)
    try:
        data = checkpoint_bytes()
        url = server.add(hashed_name("w", data), data)
        final = cache_path(tmp_path / "cache", url, monkeypatch)
        proc = subprocess.Popen(ann_cmd("weights", "fetch", url), cwd=ROOT, env=env_for(tmp_path / "cache"),
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        part = final.with_name(final.name + ".part")
        deadline = time.time() + 120
        while not (part.exists() and part.stat().st_size >= 2 * CHUNK):
            assert time.time() < deadline and proc.poll() is None
            time.sleep(0.05)
        assert not final.exists()
        server.release()
        assert proc.communicate(timeout=120)[0].strip() == str(final)
        assert final.read_bytes() == data
    finally:
        server.stop()


def test_a_timeout_that_is_not_a_number_is_one_line(tmp_path):
    one_line(ann("weights", "fetch", "http://127.0.0.1:9/w.pth", cache=tmp_path, ANN_DOWNLOAD_TIMEOUT="soon"),
             "ANN_DOWNLOAD_TIMEOUT=soon")



def test_progress_is_a_bar_on_a_terminal(server, tmp_path):
    import pty

    data = checkpoint_bytes()
    url = server.add(hashed_name("w", data), data)
    terminal, stderr = pty.openpty()
    proc = subprocess.Popen(ann_cmd("weights", "fetch", url), cwd=ROOT, env=env_for(tmp_path / "cache", TERM="xterm"),
                            stdout=subprocess.PIPE, stderr=stderr)
    os.close(stderr)
    shown = b""
    while True:
        try:
            piece = os.read(terminal, 4096)
        except OSError:  # EIO: the process closed its end
            break
        if not piece:
            break
        shown += piece
    os.close(terminal)
    assert proc.wait(timeout=120) == 0
    text = shown.decode(errors="replace")
    assert "━" in text and "% (" not in text, text  # rich's bar, not the log lines


def test_the_cache_is_ann_cache_dir_else_under_xdg_cache_home(tmp_path, monkeypatch):
    from anncli.interop.cache import cache_dir, file_for

    monkeypatch.delenv("ANN_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "ann"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "ann"
    monkeypatch.setenv("ANN_CACHE_DIR", str(tmp_path / "mine"))
    url = "https://download.openmmlab.com/pretrain/third_party/resnet50_v1c-2cccc1ad.pth"
    assert file_for(url) == tmp_path / "mine" / "weights" / "download.openmmlab.com" / "pretrain" / "third_party" / \
        "resnet50_v1c-2cccc1ad.pth"
    assert file_for(url + "?dl=1").parent.name.startswith("q-")  # a query gets a folder of its own
