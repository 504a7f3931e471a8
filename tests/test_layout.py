"""docs/ARCHITECTURE.md describes the tree as it is: every file under anncli/ has its line, and no line names
a file that is gone."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_architecture_lists_every_file_of_the_package_and_no_other():
    listed = set(re.findall(r"^    (anncli/\S+\.py) ", (ROOT / "docs" / "ARCHITECTURE.md").read_text(), re.M))
    present = {p.relative_to(ROOT).as_posix() for p in (ROOT / "anncli").rglob("*.py")}
    assert sorted(present - listed) == [], "files without a line in docs/ARCHITECTURE.md"
    assert sorted(listed - present) == [], "lines for files that do not exist"


def test_readme_links_the_architecture():
    assert "(docs/ARCHITECTURE.md)" in (ROOT / "README.md").read_text()


def test_the_package_top_level_holds_at_most_8_modules_beside_its_entry_points():
    """The base every wing uses stays small; a module that serves one wing lives in that wing."""
    top = sorted(p.name for p in (ROOT / "anncli").glob("*.py") if p.name not in ("__init__.py", "__main__.py"))
    assert len(top) <= 8, top


def test_no_module_of_the_package_is_over_300_lines():
    """One concern per file: a module that grows past 300 lines is split along its concerns."""
    long = {p.relative_to(ROOT).as_posix(): n for p in (ROOT / "anncli").rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 300}
    assert long == {}, long
