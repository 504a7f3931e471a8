"""Downloads into the weights cache (cache.py): once per file, resumed, verified, then renamed into place.

`fetch(url)` returns the cached file when it is there: a file appears under its final name only whole and
verified. Otherwise one process downloads it, under the file's lock (runs/locks.py: flock, or O_EXCL lock
files where the file system has none; a killed holder's lock does not stay), while every other process or
node sharing the cache waits and then reads the verified file. The download goes to `<file>.part`,
resumes from there with an HTTP range when the server keeps the same file (If-Range), and is checked: a
torch file (zip or pickle), not an HTML page; whole (Content-Length); the SHA-256 prefix its name carries;
the full digest where the table knows it. A read that stalls for `ANN_DOWNLOAD_TIMEOUT` seconds (default
60) ends the attempt; a dropped connection is resumed a few times. Each failure is one UserError line.
Torch-free.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
import time
import zipfile
from http.client import HTTPException
from pathlib import Path
from urllib.error import HTTPError, URLError
from urllib.request import Request, urlopen

from anncli.errors import UserError
from anncli.interop.cache import cache_dir, file_for, hash_prefix, offline
from anncli.interop.progress import MB, DownloadProgress
from anncli.paths import fsync_path, os_error_line, writable_dir
from anncli.runs.locks import holder, try_lock
from anncli.version import __version__

CHUNK = 2**16
ATTEMPTS = 5
TORCH_MAGIC = (b"PK\x03\x04", b"\x80")  # torch.save's zip file, or the legacy format's pickle


class _Dropped(Exception):
    """The connection ended before the file did; what arrived is kept in the .part file, which the next
    attempt resumes when the server can (`resumable`: byte ranges of a named version of the file)."""

    def __init__(self, message: str, resumable: bool = True):
        super().__init__(message)
        self.resumable = resumable


def timeout_s() -> float:
    text = os.environ.get("ANN_DOWNLOAD_TIMEOUT", "60")
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if value <= 0:
        raise UserError(f"ANN_DOWNLOAD_TIMEOUT={text}: expected a positive number of seconds")
    return value


def not_cached(url: str, source: str, final: Path, why: str) -> str:
    return (f"{url}: {why}, and it is not in the weights cache ({final}); fetch it where there is network "
            f"with `ann weights fetch {source}` (the same ANN_CACHE_DIR)")


def fetch(url: str, source: str | None = None, sha256: str | None = None) -> Path:
    """The verified cache file of `url`, downloaded first if needed. `source` is what the user wrote
    (a name or the URL), for the messages."""
    final = file_for(url)
    source = source or url
    if final.is_file():
        return final
    if offline():
        raise UserError(not_cached(url, source, final, "ANN_OFFLINE is set"))
    try:
        writable_dir(final.parent, "weights cache")
    except UserError as e:
        raise UserError(f"{e} (ANN_CACHE_DIR={cache_dir()}: set it to a writable directory)") from None
    with wait_for_lock(final.with_name(final.name + ".lock"), f"downloading {url}"):
        if not final.is_file():  # else another process finished it while this one waited
            _download(url, final, source, sha256)
    return final


def wait_for_lock(path: Path, doing: str):
    """The exclusive lock at `path`, once its holder (which is `doing` something) lets it go."""
    said = False
    while True:
        try:
            lock = try_lock(path, shared=False)
        except OSError as e:
            raise UserError(f"weights cache {os_error_line(e, path)}: cannot take the lock") from None
        if lock is not None:
            return lock
        if not said:
            print(f"[ann] waiting for {holder(path)}, which is {doing}", file=sys.stderr, flush=True)
            said = True
        time.sleep(0.2)


def _download(url: str, final: Path, source: str, sha256: str | None) -> None:
    part = final.with_name(final.name + ".part")
    best = -1
    for attempt in range(ATTEMPTS):
        try:
            _attempt(url, part, final, source)
            break
        except _Dropped as cut:
            have = part.stat().st_size if part.exists() else 0
            if not cut.resumable and have <= best:
                _remove(part)
                raise UserError(f"{url}: {cut}, again, and the server cannot resume a download (no byte "
                                "ranges); nothing was kept: try again later") from None
            if have <= best or attempt == ATTEMPTS - 1:
                raise UserError(f"{url}: {cut}; {have / MB:.1f} MB kept in {part}: run the command again to "
                                "resume") from None
            best = have
            time.sleep(min(0.5 * 2**attempt, 8))
    _verify(url, part, sha256)
    fsync_path(part)
    os.replace(part, final)
    _meta(part).unlink(missing_ok=True)
    fsync_path(final.parent)
    print(f"[ann] downloaded {url} -> {final}", file=sys.stderr, flush=True)


def _meta(part: Path) -> Path:
    return part.with_name(part.name + ".json")


def _resume_headers(url: str, part: Path) -> tuple[int, dict]:
    """(offset, headers): a range from the end of a .part file of the same URL whose server named the
    file's version (ETag or Last-Modified), else from the start."""
    headers = {"User-Agent": f"anncli/{__version__}"}
    try:
        saved = json.loads(_meta(part).read_text())
        offset = part.stat().st_size
    except (OSError, ValueError):
        return 0, headers
    version = saved.get("etag") or saved.get("last_modified")
    if saved.get("url") != url or not version or offset == 0:
        return 0, headers
    return offset, {**headers, "Range": f"bytes={offset}-", "If-Range": version}


def _open(url: str, part: Path, final: Path, source: str):
    offset, headers = _resume_headers(url, part)
    try:
        return offset, urlopen(Request(url, headers=headers), timeout=timeout_s())
    except HTTPError as e:
        if e.code == 416:  # the .part is not a prefix of what the server has now: start over
            _remove(part)
            raise _Dropped("the server refused to resume (HTTP 416)") from None
        raise UserError(f"{url}: HTTP {e.code} {e.reason}") from None
    except (URLError, HTTPException, OSError) as e:
        reason = getattr(e, "reason", None) or e
        if isinstance(reason, TimeoutError) or "timed out" in str(reason):
            reason = f"no answer within {timeout_s():g} s, ANN_DOWNLOAD_TIMEOUT"
        kept = f"; {part.stat().st_size / MB:.1f} MB kept in {part}" if part.exists() else ""
        raise UserError(not_cached(url, source, final, f"cannot download ({reason}){kept}")) from None


def _attempt(url: str, part: Path, final: Path, source: str) -> None:
    offset, response = _open(url, part, final, source)
    with response:
        kind = response.headers.get("Content-Type", "")
        if "text/html" in kind:
            raise UserError(_html_page(url, f" ({kind})"))
        total = _total(url, response, offset)
        if response.status != 206:
            offset = 0
        _write_meta(part, {"url": url, "etag": response.headers.get("ETag"),
                           "last_modified": response.headers.get("Last-Modified")})
        progress = DownloadProgress(final.name, total, offset)
        try:
            _copy(url, response, part, offset, progress)
        finally:
            progress.close()
    size = part.stat().st_size
    if total is not None and size < total:
        resumable = response.headers.get("Accept-Ranges") == "bytes" and bool(
            response.headers.get("ETag") or response.headers.get("Last-Modified"))
        raise _Dropped(f"the connection ended at {size / MB:.1f} of {total / MB:.1f} MB", resumable)


def _total(url: str, response, offset: int) -> int | None:
    """The whole file's size: from Content-Range of a resumed answer, else Content-Length."""
    if response.status == 206:
        content_range = response.headers.get("Content-Range", "")  # bytes START-END/TOTAL
        try:
            start, total = int(content_range.split()[1].split("-")[0]), int(content_range.rsplit("/", 1)[1])
        except (IndexError, ValueError):
            raise UserError(f"{url}: a resumed answer without a usable Content-Range ({content_range!r})") from None
        if start != offset:
            raise UserError(f"{url}: asked to resume at byte {offset}, the server sent from byte {start}")
        return total
    length = response.headers.get("Content-Length")
    return int(length) if length and length.isdigit() else None


def _copy(url: str, response, part: Path, offset: int, progress: DownloadProgress) -> None:
    """The answer's body appended to `part` (written afresh when `offset` is 0). A write that fails (a full
    disk, the file-size limit, a read-only cache) removes the partial file; a read that fails keeps it."""
    old = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # over `ulimit -f`: an error (EFBIG), not a kill
    try:
        with open(part, "ab" if offset else "wb") as out:
            first = offset == 0
            while True:
                try:
                    chunk = response.read1(CHUNK)  # what has arrived: a slow server still shows progress
                except (HTTPException, OSError) as e:
                    raise _Dropped(f"the connection failed ({type(e).__name__}: {e})") from None
                if not chunk:
                    return
                if first:
                    _check_start(url, chunk, part)
                    first = False
                _write(out, chunk, part)
                progress.update(len(chunk))
    finally:
        signal.signal(signal.SIGXFSZ, old)


def _write(out, chunk: bytes, part: Path) -> None:
    try:
        out.write(chunk)
        out.flush()
    except OSError as e:
        _write_failed(e, part)


def _write_meta(part: Path, meta: dict) -> None:
    """What the next attempt needs to resume `part`: its URL and the server's name of the file's version."""
    try:
        _meta(part).write_text(json.dumps(meta))
    except OSError as e:
        _write_failed(e, part)


def _write_failed(error: OSError, part: Path) -> None:
    _remove(part)
    raise UserError(f"weights cache {os_error_line(error, part)}: the download was removed") from None


def _check_start(url: str, chunk: bytes, part: Path) -> None:
    if chunk.startswith(TORCH_MAGIC):
        return
    _remove(part)
    head = chunk[:512].lstrip().lower()
    if head.startswith((b"<!doctype html", b"<html")) or b"<html" in head:
        raise UserError(_html_page(url))
    raise UserError(f"{url}: not a torch checkpoint (it starts with {chunk[:16]!r}); nothing was kept")


def _html_page(url: str, kind: str = "") -> str:
    return (f"{url}: the server sent an HTML page{kind}, not a checkpoint: a login or error page? Give the file's "
            "direct download URL")


def _verify(url: str, part: Path, sha256: str | None) -> None:
    digest = hashlib.sha256()
    with open(part, "rb") as f:
        for block in iter(lambda: f.read(2**20), b""):
            digest.update(block)
    got = digest.hexdigest()
    prefix = hash_prefix(url)
    if prefix and not got.startswith(prefix):
        _remove(part)
        raise UserError(f"{url}: the download's SHA-256 starts {got[:len(prefix)]}, its name says {prefix} "
                        f"(full digest {got}); the download was removed")
    if sha256 and got != sha256:
        _remove(part)
        raise UserError(f"{url}: the download's SHA-256 is {got}, expected {sha256}; the download was removed")
    with open(part, "rb") as f:
        zipped = f.read(4) == TORCH_MAGIC[0]
    if zipped and not zipfile.is_zipfile(part):
        _remove(part)
        raise UserError(f"{url}: the download is a truncated torch file (its zip directory is missing); it was "
                        "removed")


def _remove(part: Path) -> None:
    part.unlink(missing_ok=True)
    _meta(part).unlink(missing_ok=True)

