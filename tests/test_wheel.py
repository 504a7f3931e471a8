"""The wheel, installed outside the checkout, trains and evaluates the demo from a directory that is not the repo.

`pip wheel . --no-deps` builds from a copy of the checkout (without runs/, data/, venvs or build leftovers,
which could slip stale files into the wheel), so the links anncli/recipes and anncli/slurm must resolve into
real files. The wheel goes into a fresh venv that sees the running interpreter's site-packages for the
dependencies (torch is not downloaded again) but not the checkout: that directory is a plain path entry, so
the editable install's .pth hook there never runs, and PYTHONPATH is dropped.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from conftest import ROOT, ann_env, tiny_overrides

LEFT_OUT = {".git", ".venv", "runs", "data", "build", "dist"}  # at the top of the checkout
# The demo shrunk to seconds, its data.root left as the recipe says (data/synth, relative to the current directory).
TINY = [arg for key, value in zip(*[iter(tiny_overrides(Path("unused")))] * 2) if not value.startswith("data.root=")
        for arg in (key, value)]


def _left_out(directory: str, names: list[str]) -> set[str]:
    top = LEFT_OUT if Path(directory) == ROOT else set()
    return {n for n in names if n in top or n in ("__pycache__", ".pytest_cache") or n.endswith(".egg-info")}


def _run(cmd, cwd, **env) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in ann_env(**env).items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    done = subprocess.run([str(c) for c in cmd], cwd=cwd, env=environment, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (cmd, done.stdout[-2000:], done.stderr[-3000:])
    return done


def _wheel(tmp: Path) -> Path:
    source = tmp / "checkout"
    shutil.copytree(ROOT, source, symlinks=True, ignore=_left_out)
    _run([sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation", "--no-index", "-q",
          "-w", tmp / "dist"], cwd=source)
    (wheel,) = (tmp / "dist").glob("anncli-*.whl")
    return wheel


def _venv(tmp: Path, wheel: Path) -> Path:
    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=tmp)
    python = venv / "bin" / "python"
    own = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], cwd=tmp).stdout.strip())
    dependencies = {sysconfig.get_path("purelib"), sysconfig.get_path("platlib")}  # of sys.prefix, this venv
    (own / "dependencies.pth").write_text("".join(f"{p}\n" for p in sorted(dependencies)))
    _run([python, "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed", "-q", wheel], cwd=tmp)
    return venv


def test_the_wheel_installed_outside_the_checkout_trains_and_evaluates_the_demo(tmp_path):
    from anncli.version import __version__

    wheel = _wheel(tmp_path)
    assert wheel.name.startswith(f"anncli-{__version__}-")  # the build reads anncli/version.py
    venv = _venv(tmp_path, wheel)
    work = tmp_path / "work"
    work.mkdir()
    where = _run([venv / "bin" / "python", "-c", "import anncli.catalog as c; print(c.__file__); print(c.RECIPES)"],
                 cwd=work).stdout.split()
    assert all(Path(p).is_relative_to(venv) for p in where), where  # not the checkout's editable anncli
    assert not Path(where[1]).is_symlink() and (Path(where[1]) / "demo.yaml").is_file()
    ann = venv / "bin" / "ann"

    assert _run([ann, "--version"], cwd=work).stdout.startswith(f"ann {__version__} (torch ")
    listed = _run([ann, "recipes", "list"], cwd=work).stdout
    assert any(line.split()[:2] == ["demo", "synth"] for line in listed.splitlines()), listed
    _run([ann, "recipes", "copy", "demo"], cwd=work)
    assert (work / "demo.yaml").read_bytes() == (ROOT / "recipes" / "demo.yaml").read_bytes()

    trained = _run([ann, "train", "demo", *TINY], cwd=work)
    assert f"ann: recipe demo: the built-in one, {where[1]}/demo.yaml" in trained.stderr, trained.stderr
    assert (work / "data" / "synth" / "synth-train.json").is_file()  # the recipe's data.root, under this directory
    assert (work / "runs" / "demo" / "checkpoints" / "step-000006" / "COMPLETE").is_file()
    _run([ann, "eval", "demo", *TINY, "--json", "metrics.json"], cwd=work)
    metrics = json.loads((work / "metrics.json").read_text())
    assert metrics["checkpoint"].endswith("step-000006") and 0.0 <= metrics["mIoU"] <= 1.0
