"""Where fetched weights live: `$ANN_CACHE_DIR`, default `${XDG_CACHE_HOME:-~/.cache}/ann`.

    <cache>/weights/<host>/<url path>          a verified download (it appears under this name only whole)
    <cache>/weights/<host>/<url path>.part     a download under way or cut off, resumed by the next fetch
    <cache>/weights/<host>/<url path>.lock     held by the one process that downloads it
    <cache>/checkpoints/<file stem>.<hash>/    a peer checkpoint imported for --checkpoint / --init-from
                                               (the hash: of the recipe it was imported with)

Every path is built from the URL's host and path segments, each a plain file name: a URL cannot name a
place outside the cache. Torch-free.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from urllib.parse import unquote, urlsplit

from anncli.errors import UserError

# torch.hub's convention: `<name>-<hex>.<ext>`, the hex a prefix of the file's SHA-256
_HASH_IN_NAME = re.compile(r"-([0-9a-f]{8,64})\.[A-Za-z0-9]+$")
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+=~-]{0,254}")


def cache_dir() -> Path:
    if os.environ.get("ANN_CACHE_DIR"):
        return Path(os.environ["ANN_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "ann"


def offline() -> bool:
    return os.environ.get("ANN_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _segment(url: str, text: str) -> str:
    if not _PLAIN_NAME.fullmatch(text):
        raise UserError(f"{url}: {text!r} in its path cannot be a file name in the weights cache "
                        "(letters, digits and _.+=~- only, not . or ..)")
    return text


def file_for(url: str) -> Path:
    """The cache path of a URL's file: <cache>/weights/<host>[_<port>]/<path>; a query string gets a folder
    of its own (q-<hash>), so two queries of one path do not share a file."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UserError(f"{url}: not an http(s) URL")
    host = parts.hostname + (f"_{parts.port}" if parts.port else "")
    segments = [_segment(url, unquote(s)) for s in parts.path.split("/") if s]
    if not segments:
        raise UserError(f"{url}: names no file (the path is empty)")
    if parts.query:
        segments.insert(-1, "q-" + hashlib.sha256(parts.query.encode()).hexdigest()[:12])
    return cache_dir() / "weights" / _segment(url, host) / Path(*segments)


def hash_prefix(url: str) -> str | None:
    """The SHA-256 prefix a file name carries (`resnet50_v1c-2cccc1ad.pth` -> 2cccc1ad), or None."""
    m = _HASH_IN_NAME.search(urlsplit(url).path.rsplit("/", 1)[-1])
    return m.group(1) if m else None


def imported_dir(file: Path, recipe_key: str) -> Path:
    """Where a fetched peer checkpoint, imported with the recipe whose text is `recipe_key`, is kept."""
    tag = hashlib.sha256(recipe_key.encode()).hexdigest()[:8]
    return cache_dir() / "checkpoints" / f"{file.stem}.{tag}"
