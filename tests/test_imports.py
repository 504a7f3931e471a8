"""The package's wings import one way only, and no two files import each other, directly or around a loop.

`ORDER` is the one written statement of the allowed direction: a module may import modules of its own wing
and of the wings after it in the list, never one before it. `entry` is the public surface (`python -m
anncli`, `from anncli import load_model`); `base` is the package's top-level modules that every wing uses
(recipe, recipe_yaml, errors, paths, catalog, api, version). Imports are read from the syntax tree, inside
functions too, so a lazy import is held to the same order.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "anncli"
ORDER = ["entry", "cli", "train", "interop", "eval", "runs", "data", "models", "cluster", "base"]
ENTRY = {"anncli", "anncli.__main__", "anncli.api"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def wing(module: str) -> str:
    if module in ENTRY:
        return "entry"
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (PACKAGE / parts[1]).is_dir() else "base"


def imported(module: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The package modules that `path` imports (a name imported from a package is that package's module
    when a file of that name exists, else the package itself)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "anncli"}
        elif isinstance(node, ast.ImportFrom) and node.module:
            base = node.module
            if node.level:
                pkg = module.split(".")[: len(module.split(".")) - node.level + (path.name == "__init__.py")]
                base = ".".join(pkg + [node.module])
            if base.split(".")[0] != "anncli":
                continue
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    return {m for m in found if m in known and m != module}


def graph() -> dict[str, set[str]]:
    known = modules()
    return {m: imported(m, p, known) for m, p in known.items()}


def test_the_order_names_every_wing_of_the_package():
    wings = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    assert wings == set(ORDER) - {"entry", "base"}


@pytest.mark.parametrize("module", sorted(modules()))
def test_imports_run_down_the_order(module):
    rank = ORDER.index(wing(module))
    upward = sorted(m for m in graph()[module] if ORDER.index(wing(m)) < rank)
    assert upward == [], f"{module} ({wing(module)}) imports from a wing above it"


def test_no_file_imports_itself_through_others():
    edges, cycles, state = graph(), [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(edges[node]):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for m in sorted(edges):
        if m not in state:
            visit(m, [m])
    assert cycles == []


def test_the_checker_sees_an_upward_and_a_circular_import(tmp_path, monkeypatch):
    """The checks above would fail on a bad tree: a small package with both faults is caught."""
    pkg = tmp_path / "anncli"
    for folder in ("cli", "models"):
        (pkg / folder).mkdir(parents=True)
        (pkg / folder / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "models" / "a.py").write_text("def f():\n    from anncli.cli import b\n")
    (pkg / "cli" / "b.py").write_text("from anncli.models import a\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", pkg)
    edges = graph()
    assert edges["anncli.models.a"] == {"anncli.cli.b"} and edges["anncli.cli.b"] == {"anncli.models.a"}
    assert ORDER.index(wing("anncli.cli.b")) < ORDER.index(wing("anncli.models.a"))
