"""Output paths checked before the work, files written whole, and file-system errors as one line.

An evaluation or a benchmark must not run for an hour and then fail to write its result: the CLI
checks every output place first (`writable_dir`, `writable_file`, `creatable_dir`). Every file the
tool writes goes through `replaced_whole` (a temporary sibling, fsynced, renamed over the target), so
an existing file is never truncated and a failed write leaves nothing behind. A write that fails later
(a full disk, the file-size limit) becomes one line naming the device and the path (`fs_error_line`).
No torch here: the CLI calls these before it imports anything heavy.
"""

from __future__ import annotations

import errno
import os
import resource
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

from anncli.errors import UserError

_REASONS = {
    errno.ENOSPC: "no space left on {device}",
    errno.EDQUOT: "disk quota exceeded on {device}",
    errno.EROFS: "read-only file system ({device})",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.ENOTDIR: "a parent is a file, not a directory",
    errno.EISDIR: "is a directory",
    errno.EFBIG: "file too large (over the file-size limit, `ulimit -f`)",
}
# What torch.save says when the disk fills up under it (no errno, no path).
_TORCH_WRITE_FAILURES = ("iostream error", "file write failed", "PytorchStreamWriter failed", "inline_container.cc")


def device_of(path: str | os.PathLike) -> str:
    """The mount (device and mount point) holding `path`, e.g. "/dev/vdb at /data"; best effort."""
    p = os.path.realpath(_existing_ancestor(Path(path)))
    best = ("", "")
    try:
        with open("/proc/mounts") as f:
            for line in f:
                dev, mnt = line.split()[:2]
                if (p == mnt or p.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best[1]):
                    best = (dev, mnt)
    except OSError:
        pass
    return f"{best[0]} at {best[1]}" if best[1] else "the device"


def _existing_ancestor(path: Path) -> Path:
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def os_error_line(exc: OSError, path: str | os.PathLike) -> str:
    where = exc.filename or path
    reason = _REASONS.get(exc.errno, exc.strerror or str(exc)).format(device=device_of(where))
    return f"{where}: {reason}"


def _probe(directory: Path, what: str, given: Path) -> None:
    """Create and remove a file in `directory`: the only sure test of writability (root ignores modes).
    The message names `given`, the user's path, never the probe's own file."""
    try:
        fd, name = tempfile.mkstemp(prefix=".ann-write-test-", dir=directory)
        os.close(fd)
        os.unlink(name)
    except OSError as e:
        raise UserError(f"{what} {os_error_line(_naming(e, given), given)}: cannot write there") from None


def writable_dir(path: str | os.PathLike, what: str) -> Path:
    """Create `path` (and its parents) when missing and check that files can be written into it."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{what} {path}: is a file, not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{what} {os_error_line(e, path)}: cannot create the directory") from None
    _probe(path, what, path)
    return path


def creatable_dir(path: str | os.PathLike, what: str) -> Path:
    """Check that `path` is a directory files can be written into, or can be made one, without making it:
    a command refused later leaves no empty folder behind. The writer creates it."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{what} {path}: is a file, not a directory")
    ancestor = _existing_ancestor(path)
    if not ancestor.is_dir():
        raise UserError(f"{what} {path}: {ancestor} is a file, not a directory")
    _probe(ancestor, what, path)
    return path


def writable_file(path: str | os.PathLike, what: str) -> Path:
    """Check that `path` can be written: its directory must exist already (never created silently)."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{what} {path}: is a directory; give a file name")
    parent = path.parent
    if not parent.is_dir():
        kind = "is a file" if parent.exists() else "does not exist"
        raise UserError(f"{what} {path}: directory {parent} {kind}; create it first or choose another path")
    _probe(parent, what, path)
    return path


# What matplotlib's Agg, PDF, PS, SVG and PGF backends write, by file suffix.
PICTURE_SUFFIXES = (".png", ".pdf", ".svg", ".svgz", ".jpg", ".jpeg", ".tif", ".tiff", ".webp", ".eps", ".ps",
                    ".pgf", ".raw", ".rgba")


def check_picture(path: str | os.PathLike) -> None:
    """A picture's format comes from its suffix: an unknown one is refused before the work, not after it."""
    suffix = Path(path).suffix.lower()
    if suffix not in PICTURE_SUFFIXES:
        raise UserError(f"--out {path}: {suffix or 'no suffix'} is not a picture format; use one of "
                        f"{', '.join(s[1:] for s in PICTURE_SUFFIXES[:5])}, …")


def fs_error_line(exc: BaseException, hint: Optional[str | os.PathLike] = None) -> Optional[str]:
    """One line for a file-system failure during the work, or None when `exc` is not one."""
    if isinstance(exc, OSError) and exc.errno in _REASONS:
        return os_error_line(exc, hint or "")
    text = str(exc)
    if isinstance(exc, RuntimeError) and any(s in text for s in _TORCH_WRITE_FAILURES) and hint is not None:
        try:
            st = os.statvfs(_existing_ancestor(Path(hint)))
            full = st.f_bavail * st.f_frsize < 64 * 2**20
        except OSError:
            full = False
        if full:
            reason = f"no space left on {device_of(hint)}"
        elif file_size_limited():  # torch's writer says only "unexpected pos" when a write hits `ulimit -f`
            reason = _REASONS[errno.EFBIG]
        else:
            reason = f"writing failed ({text.splitlines()[0][:200]})"
        return f"{hint}: {reason}"
    return None


def file_size_limited() -> bool:
    """Whether this process runs under a file-size limit (`ulimit -f`, RLIMIT_FSIZE)."""
    return resource.getrlimit(resource.RLIMIT_FSIZE)[0] != resource.RLIM_INFINITY


# --- writing files whole ---------------------------------------------------------------------------


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a written file (or a directory's entries) to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _naming(exc: OSError, path: Path) -> OSError:
    """`exc` as if it had happened on `path`: the user never sees the name of a temporary file."""
    return OSError(exc.errno, exc.strerror, str(path)) if exc.errno is not None else exc


@contextmanager
def replaced_whole(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary file beside `path` for the block to write (hidden, same folder: the rename is atomic).
    When the block succeeds it is fsynced and renamed over `path`; when anything fails it is removed, so
    an existing `path` is never truncated and a failed write leaves no file behind. An OSError names `path`.

    CPython ignores SIGXFSZ, so a write over the file-size limit fails with EFBIG instead of killing us."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        try:
            tmp.unlink()
        except OSError:
            pass
        if isinstance(e, OSError) and e.filename in (None, str(tmp)):
            raise _naming(e, path) from None
        raise


def write_text_whole(path: str | os.PathLike, text: str) -> None:
    with replaced_whole(path) as tmp:
        tmp.write_text(text)


def write_result(path: str | os.PathLike, text: str, what: str = "--json") -> None:
    """Write a result file whole or not at all. When the write fails (a full disk, the file-size limit)
    the text goes to stdout instead and a UserError says so: the results of the work are never lost to a
    truncated file or a traceback."""
    try:
        write_text_whole(path, text)
    except OSError as e:
        sys.stdout.write(text)
        sys.stdout.flush()
        raise UserError(f"{what} {os_error_line(e, path)}: not written; the results are printed on stdout "
                        "above instead") from None


def check_outputs(json_out=None, save_pred=None, out=None, out_file=None) -> None:
    """Every output place of a command, checked before its work starts, so that no result is lost at the end.

    `--json` files and `--out` files (a picture, an export) need an existing directory, which is never
    created for them; `--save-pred`/`--out` directories are created by the writer, once the command has
    passed every other check.
    """
    if json_out is not None:
        writable_file(json_out, "--json")
    if save_pred is not None:
        creatable_dir(save_pred, "--save-pred")
    if out is not None:
        creatable_dir(out, "--out")
    if out_file is not None:
        writable_file(out_file, "--out")
