"""WebDataset shards: the sample format, writing shards, reading one shard, and the exact-once eval reader.

A shard `<dataset>-<split>-000000.tar` holds, per sample, the tar members `<key>.img.png` or
`<key>.img.jpg` (original bytes), `<key>.seg.png` (uint8 train ids, 255 = ignore) and `<key>.meta.json`.
Which shards make a split: `anncli.data.manifest`; the training stream: `anncli.data.global_stream`.
Training data too broken to go on is a `DataError` (the skip bound: `anncli.data.global_stream`).

Shards are opened by `anncli.data.streams` (local paths, `pipe:CMD`, http(s) URLs); members are read as a
plain tar stream and grouped by key; images are decoded by `anncli.data.images`.
"""

from __future__ import annotations

import contextlib
import glob
import io
import logging
import os
import re
import tarfile
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from anncli.data.guards import Limits, SampleError, hw_text
from anncli.data.images import decode_image, decode_label
from anncli.data.loader import identity, loader_items, worker_init
from anncli.data.manifest import is_remote, manifest_text
from anncli.data.streams import open_shard
from anncli.errors import UserError
from anncli.paths import os_error_line

IMAGE_FIELDS = ("img.png", "img.jpg")
LABEL_FIELD = "seg.png"

log = logging.getLogger("anncli.data")


class DataError(UserError):
    """Training data too broken to go on (too many skipped samples, or nothing readable)."""


def check_label_ids(label: np.ndarray, num_classes: int, url: str, key: str) -> None:
    """Training labels are class ids below `num_classes` or 255 (ignore); any other value stops the run."""
    bad = label[(label >= num_classes) & (label != 255)]
    if bad.size:
        raise DataError(f"{url}: sample {key}: label value {int(bad.max())} is outside model.num_classes="
                        f"{num_classes} (ids 0..{num_classes - 1}, 255 = ignore); check model.num_classes or the "
                        "label map the shards were packed with")


def member_key(name: str) -> tuple[str, str | None]:
    """(sample key, field) of a tar member name `[folder/]key.field`; field None for a name without a dot."""
    folder, _, base = name.rpartition("/")
    stem, dot, field = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), (field if dot else None)


def check_member_name(name: str) -> None:
    """A shard read stops at a member whose name could escape a folder (a crafted or foreign tar)."""
    why = ("contains a backslash" if "\\" in name else "is an absolute path" if name.startswith("/")
           else "has a '..' part" if ".." in name.split("/") else None)
    if why:
        raise tarfile.ReadError(f"unsafe member name {name!r} ({why})")


# ---------------------------------------------------------------- writing


class ShardWriter:
    """Writes `<prefix>-%06d.tar` with byte-identical output for identical input (fixed tar metadata).

    Every file goes to a `.tmp` name first and into place only at `commit()` (or `close()`), so a failed or
    interrupted pack leaves the earlier files as they were and none of its own: a write that fails (a full
    disk, the file-size limit) removes every temporary file and is one UserError line. As a context
    manager, an exception in its block does the same (`abort()`).
    """

    def __init__(self, out: str | Path, prefix: str, max_count: int, max_size: int):
        self.out, self.prefix = Path(out), prefix
        self.max_count, self.max_size = max_count, max_size
        self.shards: list[dict] = []
        self._file = self._tar = None
        self._tmps: list[Path] = []  # written or being written, each renamed to its name without .tmp
        self._made_out = False
        self._count = self._size = 0

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, kind, exc, tb) -> None:
        if kind is not None:
            self.abort()

    def _open_tmp(self, name: str):
        if not self.out.is_dir():
            self.out.mkdir(parents=True)
            self._made_out = True
        self._tmps.append(self.out / f"{name}.tmp")
        return open(self._tmps[-1], "wb")

    def _next(self) -> None:
        self._finish()
        name = f"{self.prefix}-{len(self.shards):06d}.tar"
        self._file = self._open_tmp(name)
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.GNU_FORMAT)
        self.shards.append({"name": name, "count": 0})
        self._count = self._size = 0

    def _finish(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._tar = None
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self.shards[-1]["count"] = self._count

    @contextlib.contextmanager
    def _writing(self):
        try:
            yield
        except OSError as e:
            where = self._tmps[-1].with_suffix("") if self._tmps else self.out  # the file, not its temporary name
            self.abort()
            raise UserError(f"writing shards: {os_error_line(e, where)}; the files of this pack are removed, "
                            "earlier ones kept") from None

    def write(self, key: str, members: dict[str, bytes]) -> None:
        if not key or "." in key or "/" in key or "\\" in key:
            raise UserError(f"sample key {key!r} must be non-empty and free of '.', '/' and '\\'")
        for ext in members:
            if "/" in ext or "\\" in ext:
                raise UserError(f"sample {key}: field {ext!r} is not a plain file name")
        size = sum(len(v) for v in members.values())
        with self._writing():
            if self._tar is None or self._count >= self.max_count or (self._count and self._size + size > self.max_size):
                self._next()
            for ext in sorted(members):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime, info.mode = len(members[ext]), 0, 0o444
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                self._tar.addfile(info, io.BytesIO(members[ext]))
        self._count += 1
        self._size += size

    def finish(self, manifest: Callable[[list[dict]], dict] | None = None) -> dict | None:
        """Finish the last shard and, with `manifest`, write `manifest(shards)` as `<prefix>.json`, all
        under temporary names still; returns the manifest."""
        with self._writing():
            self._finish()
            if manifest is None:
                return None
            written = manifest(self.shards)
            with self._open_tmp(f"{self.prefix}.json") as f:
                f.write(manifest_text(written).encode())
                f.flush()
                os.fsync(f.fileno())
        return written

    def commit(self) -> None:
        """Move every file of this pack into place (the manifest last), then remove the shards of an earlier,
        longer pack under the same prefix (numbered past the new ones), which a glob would still read."""
        with self._writing():
            for tmp in self._tmps:
                os.replace(tmp, tmp.with_suffix(""))
        self._tmps.clear()
        stale = sorted(p for p in (self.out.glob(f"{glob.escape(self.prefix)}-*.tar") if self.out.is_dir() else [])
                       if re.fullmatch(rf"{re.escape(self.prefix)}-(\d{{6}})\.tar", p.name)
                       and int(p.name[-10:-4]) >= len(self.shards))
        for path in stale:
            path.unlink()
        if stale:
            log.warning("removed %d stale shard(s) of an earlier pack from %s: %s", len(stale), self.out,
                        " ".join(p.name for p in stale))

    def close(self) -> list[dict]:
        """`finish()` without a manifest and `commit()`: the shards in place; returns them."""
        self.finish()
        self.commit()
        return self.shards

    def abort(self) -> None:
        """Remove every temporary file of this pack; the files already in place stay as they were."""
        if self._file is not None:
            with contextlib.suppress(OSError):  # the flush of a failed write fails again
                self._file.close()
        self._file = self._tar = None
        for tmp in self._tmps:
            tmp.unlink(missing_ok=True)
        self._tmps.clear()
        if self._made_out and self.out.is_dir() and not any(self.out.iterdir()):
            self.out.rmdir()
        self._made_out = False


# ---------------------------------------------------------------- reading


def iter_shard(url: str, limits: Limits = Limits()) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {field: bytes}) of one shard, in order; raises tarfile/OS errors on a broken stream or a member
    over `limits`."""
    stream = open_shard(url)
    try:
        with tarfile.open(fileobj=stream, mode="r|") as tar:
            key, fields = None, {}
            for info in tar:
                if not info.isreg():
                    continue
                k, field = member_key(info.name)
                if field is not None and k != key and key is not None:  # the previous sample is whole: hand it out
                    yield key, fields
                    key, fields = None, {}
                check_member_name(info.name)
                if field is None:
                    continue
                key = k
                limits.check_member_size(info)
                data = tar.extractfile(info).read()
                if len(data) != info.size:  # a stream read stops quietly at a cut; the header knows better
                    raise tarfile.ReadError(f"unexpected end of data in {info.name}")
                fields[field] = data
            size = os.fstat(stream.fileno()).st_size if not is_remote(url) else None
            if size is not None and size < tar.offset + 2 * tarfile.BLOCKSIZE:
                raise tarfile.ReadError("unexpected end of data (no end-of-archive marker)")
            if key is not None:
                yield key, fields
    finally:
        stream.close()


def decode_sample(key: str, fields: dict[str, bytes], limits: Limits = Limits()) -> tuple[np.ndarray, np.ndarray]:
    """→ (uint8 HxWx3 RGB image, uint8 HxW label); SampleError when a field is missing or broken."""
    img = next((fields[f] for f in IMAGE_FIELDS if f in fields), None)
    if img is None:
        raise SampleError("missing field img.png/img.jpg")
    if LABEL_FIELD not in fields:
        raise SampleError("missing field seg.png")
    image, label = decode_image(img, limits), decode_label(fields[LABEL_FIELD], limits)
    if image.shape[:2] != label.shape:
        raise SampleError(f"image {hw_text(image.shape)} and label {hw_text(label.shape)} (HxW) differ")
    return image, label


def eval_samples(urls: list[str], *, rank: int, world_size: int, num_workers: int = 0,
                 limits: Limits = Limits()) -> Iterator[dict]:
    """Every sample exactly once across ranks × workers: rank r reads shards r, r+world, …; its workers
    split those again. Original resolution, no augmentation. A rank without shards yields nothing."""
    mine = list(urls)[rank::world_size]
    workers = min(num_workers, len(mine))
    if not mine:
        return
    if workers == 0:
        yield from _eval_iter(mine, limits)
        return
    import torch.utils.data as tud

    class _Shards(tud.IterableDataset):
        def __iter__(self):
            info = tud.get_worker_info()
            return _eval_iter(mine[info.id :: info.num_workers] if info else mine, limits)

    # A private generator: starting the workers must not draw their seed from the global RNG, which
    # training checkpoints; in-training validation then leaves the training's random stream untouched.
    import torch

    loader = tud.DataLoader(_Shards(), batch_size=None, num_workers=workers, collate_fn=identity,
                            worker_init_fn=worker_init, generator=torch.Generator().manual_seed(0))
    yield from loader_items(loader)


def _eval_iter(shards: list[str], limits: Limits) -> Iterator[dict]:
    for url in shards:
        last = None
        try:
            for key, fields in iter_shard(url, limits):
                try:
                    image, label = decode_sample(key, fields, limits)
                except SampleError as e:
                    raise UserError(f"{url}: sample {key}: {e}") from None
                yield {"key": key, "image": image, "label": label, "shard": url}
                last = key
        except (tarfile.TarError, OSError, EOFError) as e:
            where = f"after sample {last}" if last else "at its start"
            raise UserError(f"{url}: shard unreadable {where}: {e}") from None
