"""Where the commands' weights come from: a local path as it is, or a URL / name made a verified local file.

Read before a model is built: `model.pretrained` (`weights_file`), `--init-from` and `eval`/`predict
--checkpoint` (`checkpoint_dir`, `resolve_checkpoint`: a fetched peer checkpoint is imported once into a
checkpoint directory of the cache), `ann weights import SRC` (`import_source`); `ann weights fetch`
(`fetch_source`, `list_named`) and the `--dry-run` plan (`plan_line`). Accepted sources: local paths,
http(s):// URLs, `open-mmlab://NAME` and `mmseg://CONFIG` (zoo.py). Concurrent callers (the ranks of a
node, the nodes sharing a cache) wait on the file's lock: one downloads, the others read its result.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Optional, Sequence

from anncli.errors import UserError
from anncli.interop import zoo
from anncli.interop.cache import cache_dir, file_for, imported_dir, offline
from anncli.interop.download import fetch, wait_for_lock
from anncli.recipe import WEIGHTS_SCHEMES, Recipe


def is_remote(source: Optional[str]) -> bool:
    return bool(source) and str(source).startswith(WEIGHTS_SCHEMES)


def _entry(source: str) -> Optional[zoo.Named]:
    return zoo.named(source) if zoo.is_name(source) else None


def _url(source: str) -> tuple[str, Optional[str]]:
    """(URL, full SHA-256 or None) of a URL or a name."""
    entry = _entry(source)
    return (entry.url, entry.sha256) if entry else (source, None)


def weights_file(source: str) -> Path:
    """`source` as a local file: a path as it is, a URL or name fetched into the cache (once)."""
    if not is_remote(source):
        return Path(source)
    url, sha256 = _url(source)
    return fetch(url, source=source, sha256=sha256)


def fetch_source(source: str) -> Path:
    """`ann weights fetch NAME|URL`: fill the cache ahead of a job; the file's path."""
    if not is_remote(source):
        raise UserError(f"{source}: not a URL or a name; give an http(s):// URL, open-mmlab://NAME or "
                        "mmseg://CONFIG (ann weights fetch --list)")
    return weights_file(source)


def _row_recipe(entry: Optional[zoo.Named]) -> Optional[Recipe]:
    from anncli.catalog import builtin_recipe
    from anncli.recipe import load_recipe

    return load_recipe(builtin_recipe(entry.recipe)) if entry and entry.recipe else None


def _import_key(base: Optional[Recipe]) -> str:
    from anncli.recipe import recipe_to_yaml

    return recipe_to_yaml(base) if base is not None else "the variant's defaults"


def checkpoint_dir(source: str, base: Optional[Recipe] = None) -> Path:
    """`--checkpoint` / `--init-from` SRC as a checkpoint directory: a local one as it is; a peer checkpoint
    at a URL or a zoo name fetched, then imported with `base` (the recipe it is used with; default: a zoo
    row's recipe, else the variant's defaults) into the cache, once."""
    if not is_remote(source):
        return Path(source)
    file = weights_file(source)
    base = base if base is not None else _row_recipe(_entry(source))
    out = imported_dir(file, _import_key(base))
    if not (out / "COMPLETE").is_file():
        _import_once(file, out, base, source)
    return out


def _import_once(file: Path, out: Path, base: Optional[Recipe], source: str) -> None:
    from anncli.interop.weights import import_fetched

    out.parent.mkdir(parents=True, exist_ok=True)
    with wait_for_lock(out.with_name(out.name + ".lock"), f"importing {source}"):
        if (out / "COMPLETE").is_file():  # another process imported it while this one waited
            return
        shutil.rmtree(out, ignore_errors=True)  # an import killed before its marker
        print(import_fetched(file, out, base, source), file=sys.stderr, flush=True)


def resolve_checkpoint(source: Optional[str], recipe_path: Optional[Path] = None,
                       overrides: Sequence[str] = ()) -> Optional[Path]:
    """`ann eval|predict --checkpoint SRC [RECIPE]`: the directory to evaluate. A fetched file is imported
    with the recipe given, else with its zoo row's; a recipe whose model is not the file's is one line
    (naming the zoo row's recipe)."""
    if source is None or not is_remote(source):
        return None if source is None else Path(source)
    from anncli.interop.weights import ModelMismatch
    from anncli.recipe import load_recipe
    from anncli.runs.checkpoint import check_compatible

    base = load_recipe(recipe_path, list(overrides)) if recipe_path is not None else None
    entry = _entry(source)
    hint = f"; {source} was trained with the recipe {entry.recipe}: pass it or leave the recipe out" \
        if entry and entry.recipe else ""
    try:
        out = checkpoint_dir(source, base)
    except ModelMismatch as e:
        raise UserError(f"{e}{hint}") from None
    if base is not None:
        try:
            check_compatible(out, base)  # before any data is read or a rank started
        except UserError as e:
            raise UserError(f"{e}{hint}") from None
    return out


def import_source(fmt: str, source: str, out: Path, recipe_path: Optional[Path] = None, **options) -> Path:
    """`ann weights import FMT SRC`: SRC a path, URL or name; a zoo name brings its row's recipe."""
    from anncli.catalog import builtin_recipe
    from anncli.interop.weights import import_checkpoint

    file = weights_file(source)
    entry = _entry(source) if is_remote(source) else None
    if recipe_path is None and entry and entry.recipe:
        recipe_path = builtin_recipe(entry.recipe)
    return import_checkpoint(fmt, file, out, recipe_path, source=source if is_remote(source) else None, **options)


def plan_line(what: str, source: str) -> str:
    """The `--dry-run` plan's line for a URL or name: found cached, or to be fetched (from where, to where)."""
    url, _ = _url(source)
    final = file_for(url)
    if final.is_file():
        return f"{what} {source}: cached, {final}"
    how = "ANN_OFFLINE is set: run `ann weights fetch " + source + "` where there is network first" \
        if offline() else f"fetch {url}"
    return f"{what} {source}: not cached; {how} into {final}"


def list_named() -> str:
    """`ann weights fetch --list`: every named file, its mIoU where published, and whether it is cached."""
    rows = [("name", "recipe", "mIoU", "ms+flip", "cached")]
    for entry in [*zoo.BACKBONES, *zoo.ZOO]:
        final = file_for(entry.url)
        rows.append((entry.name, entry.recipe or "-", _figure(entry.miou), _figure(entry.miou_ms_flip),
                     str(final) if final.is_file() else "no"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1] for row in rows]
    return "\n".join([*lines, f"cache: {cache_dir()}"])


def _figure(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.2f}"

