"""Where a split's shards are: manifests, and shard specifications resolved to URLs.

The manifest `<root>/<dataset>-<split>.json` lists the split's shards beside it, with the classes, the
palette, the ignore index and the sample count of every shard. A shard specification is a split name (read
from its manifest), a path, brace pattern, glob or manifest, or a `pipe:` / http(s) URL.
"""

from __future__ import annotations

import json
import os
import re
from glob import escape as glob_escape, glob
from pathlib import Path

from braceexpand import braceexpand

from anncli.errors import UserError

_SPLIT_ALIASES = {"training": "train", "validation": "val"}


def manifest_path(root: str | Path, dataset: str, split: str) -> Path:
    return Path(root) / f"{dataset}-{split}.json"


def load_manifest(path: str | Path) -> dict:
    """Read and check a manifest file; a missing or malformed one is a UserError."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{p}: shard manifest not found (create the shards with `ann data pack` or `ann data synth`)")
    try:
        manifest = json.loads(p.read_text())
        ok = isinstance(manifest["classes"], list) and all(
            isinstance(s["name"], str) and isinstance(s["count"], int) for s in manifest["shards"]
        )
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        ok = False
    if not ok:
        raise UserError(f"{p}: not a valid shard manifest (expected classes and shards [{{name, count}}])")
    return manifest


def read_manifest(root: str | Path, dataset: str, split: str) -> dict:
    return load_manifest(manifest_path(root, dataset, split))


def _plain_name(name: str, manifest: Path) -> str:
    """A shard name from a manifest: a file name beside it, never a path, URL or `pipe:` command (only a
    recipe, written by the user, may say those)."""
    if name in ("", ".", "..") or "/" in name or "\\" in name or ":" in name or "\0" in name:
        raise UserError(f"{manifest}: shard name {name!r} is not a file name in the manifest's folder "
                        "(URLs, pipe: commands and paths belong in the recipe's data.train/data.val)")
    return name


def _manifest_shards(path: Path) -> list[str]:
    manifest = load_manifest(path)
    urls = [_local(os.path.join(path.parent, _plain_name(s["name"], path))) for s in manifest["shards"]]
    _check_exist(urls, str(path))
    return urls


def _check_exist(paths: list[str], pattern: str, where: str = "") -> None:
    missing = [p for p in paths if not os.path.isfile(p)]
    if not paths or len(missing) == len(paths):
        raise UserError(f"no shard files match {pattern!r}{where}")
    if missing:
        raise UserError(f"{len(missing)} of {len(paths)} shard files of {pattern!r} are missing, first: {missing[0]}")


def is_remote(spec: str) -> bool:
    return spec.startswith("pipe:") or re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]+://", spec) is not None


def _local(path: str) -> str:
    """A local path that no reader takes for a command or a URL: under a relative root named like one
    (`pipe:x/a.tar`), it gets a leading `./`."""
    return os.path.join(".", path) if is_remote(path) or path.startswith("file:") else path


def _refuse_remote(spec: str, source: str) -> None:
    """A shard spec from a recipe the user did not give (`source`, a checkpoint's) may name files only."""
    remote = next((piece for piece in spec.split("::") if is_remote(piece)), None)
    if remote is not None:
        raise UserError(f"{source} reads {remote!r}: a recipe that comes from a checkpoint never runs pipe: "
                        "commands or opens URLs (anyone who can write the run directory could plant one); pass "
                        "the shards with --split, or give your own recipe")


def expand_paths(root: str | Path, spec: str, root_is: str = "data.root") -> list[str]:
    """A path, brace pattern, glob or manifest (relative to root unless absolute; `::` joins lists).
    `root_is` names the root in messages."""
    urls: list[str] = []
    for piece in spec.split("::"):
        if is_remote(piece):
            urls.extend(braceexpand(piece))
            continue
        local = []
        for name in braceexpand(piece):
            path = _local(name if os.path.isabs(name) else os.path.join(str(root), name))
            if name.endswith(".json"):
                local.extend(_manifest_shards(Path(path)))
            elif any(c in name for c in "*?["):
                local.extend(sorted(glob(path)))
            elif os.path.isdir(path):
                raise UserError(_folder_given(name, path))
            else:
                local.append(path)
        where = "" if os.path.isabs(piece) else f" (relative names are looked up under {root_is} {root})"
        _check_exist(local, piece, where)
        urls.extend(local)
    return urls


def _folder_given(name: str, path: str) -> str:
    """What a folder given as a shard spec holds, and how to name its shards instead."""
    manifests = sorted(os.path.basename(p) for p in glob(os.path.join(glob_escape(path), "*.json")))
    shards = glob(os.path.join(glob_escape(path), "*.tar"))
    holds = "; ".join(part for part in (f"{len(manifests)} manifest(s): {', '.join(manifests[:4])}" if manifests
                                        else "", f"{len(shards)} shard(s)" if shards else "") if part)
    example = f"a manifest such as {os.path.join(name, manifests[-1])}, " if manifests else ""
    return (f"{name!r} is a directory ({holds or 'no *.tar shards and no manifests'}); name {example}a shard, "
            f"or a pattern such as {os.path.join(name, '*.tar')!r}")


def _split_manifest(root: str, dataset: str, split: str) -> Path:
    """The manifest of a split name; `training`/`validation` (ADE20K's folder names, which `ann data pack`
    accepts) find the `train`/`val` manifest it writes."""
    path = manifest_path(root, dataset, split)
    alias = manifest_path(root, dataset, _SPLIT_ALIASES.get(split, split))
    if not path.is_file() and alias.is_file():
        return alias
    if not path.is_file():
        present = sorted(p.name for p in Path(root).glob(f"{glob_escape(dataset)}-*.json"))
        there = f"; {root} holds {', '.join(present)}" if present else ""
        raise UserError(f"{path}: shard manifest not found (split {split!r} of {dataset}{there}; create the shards "
                        "with `ann data pack` or `ann data synth`)")
    return path


def resolve_urls(root: str, dataset: str, spec: str, from_checkpoint: str | None = None) -> list[str]:
    """Shard URLs for a split name (read from its manifest) or a path / brace pattern / pipe: / http(s) URL.
    `from_checkpoint` names where a spec from a checkpoint's recipe comes from: it may name local files only."""
    spec = spec.strip()
    if not spec:
        raise UserError("empty shard specification")
    if from_checkpoint is not None:
        _refuse_remote(spec, from_checkpoint)
    if re.fullmatch(r"[A-Za-z0-9_]+", spec):
        return _manifest_shards(_split_manifest(root, dataset, spec))
    return expand_paths(root, spec)


def write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(manifest_text(obj))
    os.replace(tmp, path)


def manifest_text(obj: dict) -> str:
    text = json.dumps(obj, indent=1)
    return re.sub(r"\[\s+(\d+),\s+(\d+),\s+(\d+)\s+\]", r"[\1, \2, \3]", text) + "\n"  # palette rows on one line
