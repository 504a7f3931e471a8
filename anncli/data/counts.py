"""Sample counts of training shards: from the manifests beside them, else read once from their tar headers."""

from __future__ import annotations

import os
import re
import sys
import tarfile
from glob import glob
from pathlib import Path

from anncli.data.manifest import is_remote, load_manifest
from anncli.data.shards import member_key
from anncli.data.streams import open_shard
from anncli.errors import UserError


def _shard_name(url: str) -> str:
    """The file name of a shard URL (`pipe:aws s3 cp s3://b/x-000001.tar -` → `x-000001.tar`)."""
    names = re.findall(r"[^/\s]+\.tar\b", url)
    return names[-1] if names else url.rsplit("/", 1)[-1]


def count_samples(url: str) -> int:
    """Samples in one shard, by reading its tar headers only (local files: a seek past each member's data)."""
    handle, mode = open_shard(url), ("r|" if is_remote(url) else "r:")
    keys, last = 0, None
    with handle, tarfile.open(fileobj=handle, mode=mode) as tar:
        try:
            for info in tar:
                key, field = member_key(info.name)
                if info.isreg() and field is not None and key != last:
                    keys, last = keys + 1, key
        except (tarfile.TarError, EOFError):
            pass  # a cut shard: its readable samples count
    return keys


def shard_counts(urls: list[str], root: str | Path, announce: bool = True) -> list[int]:
    """Per-shard sample counts of `urls`: from the manifests (`*.json`) beside the local shards and under
    `root` (local shards by path, remote ones by file name); shards that no manifest lists are counted once
    by reading their tar headers."""
    folders = {str(root)} | {os.path.dirname(u) for u in urls if not is_remote(u)}
    by_path: dict[str, int] = {}
    for path in sorted(p for folder in folders for p in glob(os.path.join(folder, "*.json"))):
        try:
            shards = load_manifest(path)["shards"]
        except UserError:
            continue  # another kind of JSON file
        by_path.update({os.path.abspath(os.path.join(os.path.dirname(path), s["name"])): s["count"] for s in shards})
    by_name = {os.path.basename(p): c for p, c in by_path.items()}

    def known(url: str) -> int | None:
        return by_name.get(_shard_name(url)) if is_remote(url) else by_path.get(os.path.abspath(url))

    missing = [u for u in urls if known(u) is None]
    if missing and announce:
        print(f"[ann] {len(missing)} training shard(s) are in no manifest (e.g. {missing[0]}); counting their "
              "samples once by reading tar headers (`ann data pack` writes a manifest that saves this)",
              file=sys.stderr, flush=True)
    try:
        counted = {u: count_samples(u) for u in missing}
    except (OSError, tarfile.TarError, EOFError) as e:
        raise UserError(f"cannot count the samples of a training shard without a manifest: {e}") from None
    return [counted[u] if u in counted else known(u) for u in urls]
