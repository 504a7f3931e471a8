"""Pins of the oldest declared version of each direct dependency, read from pyproject.toml.

    python constraints/oldest.py > pins.txt    name==floor for every dependency and the dev extra

`make test-oldest` installs the project against these pins (pip has no lowest-direct resolution). Every
requirement must have one `>=` floor naming a release that exists on PyPI.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

from packaging.requirements import Requirement

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def floor(requirement: Requirement) -> str:
    floors = [s.version for s in requirement.specifier if s.operator == ">="]
    if len(floors) != 1:
        raise SystemExit(f"{PYPROJECT.name}: {requirement} needs exactly one >= floor")
    return floors[0]


def pins() -> list[str]:
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    declared = project["dependencies"] + project["optional-dependencies"]["dev"]
    return [f"{r.name}=={floor(r)}" for r in map(Requirement, declared)]


if __name__ == "__main__":
    print("\n".join(pins()))
