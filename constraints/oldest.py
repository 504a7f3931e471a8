"""Pins of the oldest declared version of each direct dependency, read from pyproject.toml.

    python constraints/oldest.py > pins.txt    name==floor for every dependency and the lane's extras

`make test-oldest` installs the project with the extras in EXTRAS against these pins (pip has no
lowest-direct resolution). Every requirement must have one `>=` floor naming a release that exists on PyPI.
One exception, torch: the lane takes the CPU build pinned in constraints/cpu.txt, because every older torch
on PyPI is a CUDA build that needs 2.5 GB of nvidia-* runtimes to import, even on a CPU.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

from packaging.requirements import Requirement

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
CPU_PINS = Path(__file__).resolve().parent / "cpu.txt"
EXTRAS = ("test", "tensorboard", "plot", "export", "voc")  # what the lane's tests use (Makefile: LANE)


def floor(requirement: Requirement) -> str:
    floors = [s.version for s in requirement.specifier if s.operator == ">="]
    if len(floors) != 1:
        raise SystemExit(f"{PYPROJECT.name}: {requirement} needs exactly one >= floor")
    return floors[0]


def pins() -> list[str]:
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    declared = project["dependencies"] + [r for e in EXTRAS for r in project["optional-dependencies"][e]]
    torch = next(line for line in CPU_PINS.read_text().splitlines() if line.startswith("torch=="))
    return [torch if r.name == "torch" else f"{r.name}=={floor(r)}" for r in map(Requirement, declared)]


if __name__ == "__main__":
    print("\n".join(pins()))
