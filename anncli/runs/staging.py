"""Writing a checkpoint's directory: a staging sibling `.tmp-step-N/` that every rank writes into, then
(rank 0) every file fsynced, the directory renamed into place, the COMPLETE marker with the checksums
written last, and pruning. A save that fails (a full disk, the file-size limit) leaves neither its staging
directory nor a step directory without marker behind.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from anncli.paths import fsync_path
from anncli.runs.integrity import write_marker
from anncli.runs.retention import prune
from anncli.runs.rundir import checkpoint_path, is_complete


def staging_dir(run_dir: Path, step: int) -> Path:
    final = checkpoint_path(run_dir, step)
    return final.parent / f".tmp-{final.name}"


def begin_save(run_dir: Path, step: int) -> Path:
    """Rank 0: a fresh, empty staging directory for this step."""
    tmp = staging_dir(run_dir, step)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def finish_save(run_dir: Path, step: int, keep_last: int) -> Path:
    """Rank 0, after every rank wrote its files: fsync, rename into place, mark COMPLETE, prune."""
    tmp = staging_dir(run_dir, step)
    for f in tmp.rglob("*"):
        if f.is_file():
            fsync_path(f)
    final = checkpoint_path(run_dir, step)
    if final.exists():  # an incomplete leftover of an earlier, killed save of this step
        shutil.rmtree(final)
    os.replace(tmp, final)
    write_marker(final, step)
    fsync_path(final)
    fsync_path(final.parent)
    prune(run_dir, keep_last, written=final)
    return final


def discard_failed_save(run_dir: Path, step: int) -> None:
    """Rank 0, when a save failed (a full disk, the file-size limit): remove what it staged, and the step's
    directory if it was renamed into place without its marker; a complete checkpoint stays."""
    for path in (staging_dir(run_dir, step), checkpoint_path(run_dir, step)):
        if path.exists() and not is_complete(path):
            shutil.rmtree(path, ignore_errors=True)
