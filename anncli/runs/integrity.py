"""Checkpoint integrity: a SHA-256 of every file, recorded in the COMPLETE marker and checked before use.

The marker is JSON: {"step": N, "files": {"model.pt": {"sha256": "…", "bytes": N}, …}} (paths relative to
the checkpoint, DeepSpeed's sub-directory included). SHA-256 rather than a faster non-cryptographic hash:
hashlib's runs at about 330 MB/s on the 2-core test machine while it is loaded (blake2b 220, md5 140), so a
270 MB model.pt costs under a second per save and per resume, next to minutes between checkpoints.
Markers written before checksums (empty, or the bare step number) are accepted unverified, with a warning
line; any other marker that is not a checksum record is damaged. The marker is renamed into place, so a
crash while writing it never leaves an empty one.
Loading goes through `load_torch`, which turns any unreadable file into one line, never a traceback.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

from anncli.errors import UserError
from anncli.paths import write_text_whole

MARKER = "COMPLETE"
READERS = ".readers"  # the read lock of a checkpoint (retention.py), and its O_EXCL siblings: not checkpoint files
_CHUNK = 4 << 20
_noted: set[str] = set()


class DamagedCheckpoint(UserError):
    """A checkpoint whose files do not match its COMPLETE marker, or cannot be read."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _readable_sha256(path: Path, directory: Path) -> str:
    try:
        return sha256_file(path)
    except OSError as e:  # unreadable is not damaged: the file may be fine for its owner
        raise UserError(f"checkpoint {directory}: cannot read {path.name} ({e.strerror}); check its permissions "
                        "or copy the checkpoint somewhere you can read it") from None


def _files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*")
                  if p.is_file() and p.name != MARKER and not p.name.startswith((READERS, f".{MARKER}")))


def write_marker(directory: Path, step: int) -> None:
    """Hash every file of a finished checkpoint and write the marker, fsynced: the checkpoint now counts."""
    directory = Path(directory)
    files = {p.relative_to(directory).as_posix(): {"sha256": sha256_file(p), "bytes": p.stat().st_size}
             for p in _files(directory)}
    # renamed into place (a hidden .COMPLETE.tmp-PID, never hashed): a crash never leaves an empty marker
    write_text_whole(directory / MARKER, json.dumps({"step": step, "files": files}, indent=1, sort_keys=True) + "\n")


def read_marker(directory: Path) -> dict | None:
    """The marker's record, or None for a marker written before checksums."""
    text = (Path(directory) / MARKER).read_text(errors="replace").strip()
    if not text or text.isdigit():  # what ann wrote before checksums
        return None
    if not text.startswith("{"):
        raise DamagedCheckpoint(f"checkpoint {directory} is damaged: its {MARKER} marker is neither a checksum "
                                "record nor an older ann's empty or step-number marker")
    try:
        record = json.loads(text)
    except json.JSONDecodeError:
        raise DamagedCheckpoint(f"checkpoint {directory} is damaged: its {MARKER} marker is not valid JSON") from None
    if not isinstance(record, dict) or not isinstance(record.get("files"), dict):
        raise DamagedCheckpoint(f"checkpoint {directory} is damaged: its {MARKER} marker lists no files")
    return record


def verify(directory: Path) -> bool:
    """Raise DamagedCheckpoint naming the first file that is missing, resized or altered.

    Returns False (after a one-time note) for a checkpoint written before checksums, True otherwise."""
    directory = Path(directory)
    record = read_marker(directory)
    if record is None:
        if str(directory) not in _noted:
            _noted.add(str(directory))
            print(f"[ann] warning: checkpoint {directory} has a {MARKER} marker without checksums (empty or a bare "
                  "step number, as ann wrote before checksums); its files are used unverified", file=sys.stderr,
                  flush=True)
        return False
    for name, want in sorted(record["files"].items()):
        path = directory / name
        if not path.is_file():
            raise DamagedCheckpoint(f"checkpoint {directory} is damaged: {name} is missing")
        size = path.stat().st_size
        if size != want.get("bytes"):
            raise DamagedCheckpoint(f"checkpoint {directory} is damaged: {name} has {size} bytes, "
                                    f"{want.get('bytes')} were written")
        if _readable_sha256(path, directory) != want.get("sha256"):
            raise DamagedCheckpoint(f"checkpoint {directory} is damaged: {name} does not match its SHA-256")
    return True


def load_torch(path: Path, map_location="cpu"):
    """torch.load(weights_only=True), with a damaged or foreign file as one line (torch's own message,
    which recommends weights_only=False, is never shown)."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise DamagedCheckpoint(f"checkpoint {path.parent} is damaged: {path.name} is missing")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except PermissionError as e:
        raise UserError(f"checkpoint {path.parent}: cannot read {path.name} ({e.strerror})") from None
    except Exception as e:  # unpickling, zip and storage errors all mean the same thing here
        raise DamagedCheckpoint(f"checkpoint {path.parent} is damaged: {path.name} cannot be read as a "
                                f"tensor file ({type(e).__name__})") from None
