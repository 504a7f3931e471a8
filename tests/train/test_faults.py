"""Faults off the happy path, with real processes: a killed rank's children, full or read-only disks, ..."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from anncli.runs.locks import lock_run_dir
from anncli.errors import UserError

ROOT = Path(__file__).resolve().parents[2]


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_a_forked_child_does_not_keep_the_run_lock_of_its_dead_parent(tmp_path):
    """A DataLoader worker is a fork of its rank: when the rank is SIGKILLed, the restarted rank must get
    the run directory although the orphaned child still lives."""
    holder = subprocess.Popen([sys.executable, "-c", (
        "import os, sys, time; from anncli.runs.locks import lock_run_dir\n"
        f"h = lock_run_dir({str(tmp_path)!r}, 5)\n"
        "child = os.fork()\n"
        "if child == 0:\n"
        "    time.sleep(120); os._exit(0)\n"
        "print(child, flush=True); time.sleep(120)\n")], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    child = int(holder.stdout.readline())
    try:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
        assert _alive(child)
        lock_run_dir(tmp_path, 2).close()
    finally:
        os.kill(child, signal.SIGKILL)


# --- file-system errors: checked before the work, one line when they happen during it ----------------

from conftest import ann_cmd, ann_env, tiny_overrides  # noqa: E402


def _ann(*args, timeout=600):
    return subprocess.run(ann_cmd(*args), capture_output=True, text=True, cwd=ROOT, env=ann_env(), timeout=timeout)


def _one_line_exit_2(res, *needles):
    assert res.returncode == 2, res.stdout[-2000:] + res.stderr[-2000:]
    errors = [line for line in res.stderr.splitlines() if line.startswith("ann: error:")]
    assert len(errors) == 1 and "Traceback" not in res.stderr, res.stderr
    for needle in needles:
        assert needle in res.stderr, res.stderr


@pytest.fixture
def tmpfs(tmp_path):
    """A real small file system of its own (root only), read-only or nearly full on demand."""
    mounted = []

    def mount(size: str, readonly: bool = False) -> Path:
        point = tmp_path / f"fs{len(mounted)}"
        point.mkdir()
        opts = f"size={size}" + (",ro" if readonly else "")
        if subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(point)], capture_output=True).returncode:
            pytest.skip("cannot mount a tmpfs here (needs root)")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", "-l", str(point)], check=False)


def test_json_into_a_missing_directory_is_refused_before_the_benchmark(tmp_path):
    missing = tmp_path / "no-such-dir"
    res = _ann("bench", "attention", "--sizes", "64x64", "--channels", "16", "--repeats", "1",
               "--json", missing / "x.json")
    _one_line_exit_2(res, f"--json {missing / 'x.json'}: directory {missing} does not exist")
    assert not missing.exists()
    assert "apnb" not in res.stdout.lower()  # nothing was measured


def test_a_file_as_work_dir_is_one_line(tmp_path):
    f = tmp_path / "run"
    f.write_text("not a directory")
    res = _ann("train", "recipes/demo.yaml", "--work-dir", f)
    _one_line_exit_2(res, f"--work-dir {f}: is a file, not a directory")


def test_read_only_work_dir_and_outputs_are_refused_before_the_work(tmpfs):
    ro = tmpfs("1m", readonly=True)
    res = _ann("train", "recipes/demo.yaml", "--work-dir", ro / "run")
    _one_line_exit_2(res, f"--work-dir {ro / 'run'}: read-only file system (tmpfs at {ro})")
    res = _ann("bench", "attention", "--sizes", "64x64", "--channels", "16", "--repeats", "1", "--json", ro / "x.json")
    _one_line_exit_2(res, f"--json {ro / 'x.json'}: read-only file system (tmpfs at {ro})")
    assert ".ann-write-test" not in res.stderr  # the user's path, never the probe's temporary file


def test_a_full_disk_during_training_is_one_line_naming_the_device(tmpfs, tmp_path):
    full = tmpfs("96k")  # the recipe and the event log fit, a checkpoint does not
    res = _ann("train", "recipes/demo.yaml", "--work-dir", full / "run", *tiny_overrides(tmp_path / "data"))
    _one_line_exit_2(res, f"no space left on tmpfs at {full}")
    assert list((full / "run" / "checkpoints").iterdir()) == []  # no .tmp-step-* staging folder is left


def test_deepspeed_cpu_op_build_is_announced_once_before_it_starts(tmp_path, monkeypatch, capfd):
    from anncli.train.engine import announce_shm_build

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "fresh"))
    assert announce_shm_build()
    err = capfd.readouterr().err
    assert "building DeepSpeed's CPU communication op (deepspeed_shm_comm)" in err and "once per machine" in err
    built = tmp_path / "built" / "deepspeed_shm_comm"
    built.mkdir(parents=True)
    (built / "deepspeed_shm_comm.so").write_bytes(b"")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "built"))
    assert not announce_shm_build() and capfd.readouterr().err == ""


def test_outputs_of_predict_plot_viz_export_and_weights_import_are_checked_before_the_work(tmp_path):
    """A file where a directory must be: one line naming the option, before any checkpoint or input is read."""
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    missing = tmp_path / "no-checkpoint"
    cases = [
        (["predict", tmp_path, "--checkpoint", missing, "--out", blocker], f"--out {blocker}: is a file"),
        (["predict", tmp_path, "--model", missing / "m.onnx", "--out", blocker], f"--out {blocker}: is a file"),
        (["plot", missing, "--out", blocker / "x.png"], f"--out {blocker / 'x.png'}: directory {blocker} is a file"),
        (["viz", "attention", tmp_path / "x.png", "--checkpoint", missing, "--pixel", "1,1", "--out", blocker / "a.png"],
         f"--out {blocker / 'a.png'}: directory {blocker} is a file"),
        (["export", "--checkpoint", missing, "--out", tmp_path], f"--out {tmp_path}: is a directory"),
        (["weights", "import", "mmseg", missing / "w.pth", "--out", blocker / "ckpt"], f"--out {blocker}: is a file"),
    ]
    for args, needle in cases:
        _one_line_exit_2(_ann(*args), needle)
    assert blocker.read_text() == "not a directory"
