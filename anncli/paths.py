"""Output paths checked before the work, and file-system errors as one line.

An evaluation or a benchmark must not run for an hour and then fail to write its result: the CLI
checks every output place first (`writable_dir`, `writable_file`). A write that fails later (a full
disk during a checkpoint) becomes one line naming the device and the path (`fs_error_line`).
No torch here: the CLI calls these before it imports anything heavy.
"""

from __future__ import annotations

import errno
import os
import signal
import sys
import tempfile
from pathlib import Path
from typing import Optional

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


def _probe(directory: Path, what: str) -> None:
    """Create and remove a file in `directory`: the only sure test of writability (root ignores modes)."""
    try:
        fd, name = tempfile.mkstemp(prefix=".ann-write-test-", dir=directory)
        os.close(fd)
        os.unlink(name)
    except OSError as e:
        raise UserError(f"{what} {os_error_line(e, directory)}: cannot write there") from None


def writable_dir(path: str | os.PathLike, what: str) -> Path:
    """Create `path` (and its parents) when missing and check that files can be written into it."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{what} {path}: is a file, not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{what} {os_error_line(e, path)}: cannot create the directory") from None
    _probe(path, what)
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
    _probe(parent, what)
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
        reason = f"no space left on {device_of(hint)}" if full else f"writing failed ({text.splitlines()[0][:200]})"
        return f"{hint}: {reason}"
    return None


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file's or a directory's entries to the disk (a directory: the renames into it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_result(path: str | os.PathLike, text: str, what: str = "--json") -> None:
    """Write a result file whole or not at all (a temporary file, fsynced, renamed). When the write fails
    (a full disk, the file-size limit) the text goes to stdout instead and a UserError says so: the
    results of the work are never lost to a truncated file or a traceback."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    old = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # over the size limit: an error (EFBIG), not a kill
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        try:
            tmp.unlink()
        except OSError:
            pass
        sys.stdout.write(text)
        sys.stdout.flush()
        raise UserError(f"{what} {os_error_line(e, path)}: not written; the results are printed on stdout "
                        "above instead") from None
    finally:
        signal.signal(signal.SIGXFSZ, old)


def check_outputs(json_out=None, save_pred=None, out=None, out_file=None) -> None:
    """Every output place of a command, checked before its work starts, so that no result is lost at the end.

    `--json` files and `--out` files (a picture, an export) need an existing directory, which is never
    created for them; `--save-pred`/`--out` directories are created.
    """
    if json_out is not None:
        writable_file(json_out, "--json")
    if save_pred is not None:
        writable_dir(save_pred, "--save-pred")
    if out is not None:
        writable_dir(out, "--out")
    if out_file is not None:
        writable_file(out_file, "--out")
