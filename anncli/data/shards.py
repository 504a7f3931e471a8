"""WebDataset shards: manifests, URL resolution, deterministic writing, decoding and eval reading.

Layout: `<out>/<dataset>-<split>-000000.tar …` plus the manifest `<out>/<dataset>-<split>.json` (classes,
palette, ignore_index, shards [{name, count}], total). A sample is the tar members `<key>.img.png` or
`<key>.img.jpg` (original bytes), `<key>.seg.png` (uint8 train ids, 255 = ignore) and `<key>.meta.json`.

Shards are opened with `webdataset.gopen`, so local paths, `pipe:CMD` (e.g. `pipe:aws s3 cp s3://b/k.tar -`)
and http(s) URLs all work; members are read as a plain tar stream and grouped by key.
"""

from __future__ import annotations

import atexit
import io
import json
import logging
import os
import re
import signal
import sys
import tarfile
import weakref
from glob import glob
from pathlib import Path
from typing import Iterator

import cv2
import numpy as np
from braceexpand import braceexpand
from PIL import Image
from anncli.errors import UserError

IGNORE_INDEX = 255
IMAGE_FIELDS = ("img.png", "img.jpg")
LABEL_FIELD = "seg.png"
log = logging.getLogger("anncli.data")


class DataError(UserError):
    """Training data too broken to go on (too many skipped samples, or nothing readable)."""


class SampleError(Exception):
    """One sample that cannot be used; the message says why."""


# ---------------------------------------------------------------- manifests and URLs


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


def _manifest_shards(path: Path) -> list[str]:
    manifest = load_manifest(path)
    urls = [str(path.parent / s["name"]) for s in manifest["shards"]]
    _check_exist(urls, str(path))
    return urls


def _check_exist(paths: list[str], pattern: str) -> None:
    missing = [p for p in paths if not os.path.isfile(p)]
    if not paths or len(missing) == len(paths):
        raise UserError(f"no shard files match {pattern!r}")
    if missing:
        raise UserError(f"{len(missing)} of {len(paths)} shard files of {pattern!r} are missing, first: {missing[0]}")


def _is_remote(spec: str) -> bool:
    return spec.startswith("pipe:") or re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]+://", spec) is not None


def expand_paths(root: str | Path, spec: str) -> list[str]:
    """A path, brace pattern, glob or manifest (relative to root unless absolute; `::` joins lists)."""
    urls: list[str] = []
    for piece in spec.split("::"):
        if _is_remote(piece):
            urls.extend(braceexpand(piece))
            continue
        local = []
        for name in braceexpand(piece):
            path = name if os.path.isabs(name) else os.path.join(str(root), name)
            if name.endswith(".json"):
                local.extend(_manifest_shards(Path(path)))
            elif any(c in name for c in "*?["):
                local.extend(sorted(glob(path)))
            else:
                local.append(path)
        _check_exist(local, piece)
        urls.extend(local)
    return urls


def resolve_urls(root: str, dataset: str, spec: str) -> list[str]:
    """Shard URLs for a split name (read from its manifest) or a path / brace pattern / pipe: / http(s) URL."""
    spec = spec.strip()
    if not spec:
        raise UserError("empty shard specification")
    if re.fullmatch(r"[A-Za-z0-9_]+", spec):
        return _manifest_shards(manifest_path(root, dataset, spec))
    return expand_paths(root, spec)


# ---------------------------------------------------------------- writing


def write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    text = json.dumps(obj, indent=1)
    text = re.sub(r"\[\s+(\d+),\s+(\d+),\s+(\d+)\s+\]", r"[\1, \2, \3]", text)  # palette rows on one line
    tmp.write_text(text + "\n")
    os.replace(tmp, path)


class ShardWriter:
    """Writes `<prefix>-%06d.tar` with byte-identical output for identical input (fixed tar metadata)."""

    def __init__(self, out: str | Path, prefix: str, max_count: int, max_size: int):
        self.out, self.prefix = Path(out), prefix
        self.max_count, self.max_size = max_count, max_size
        self.shards: list[dict] = []
        self._tar = None
        self._count = self._size = 0

    def _next(self) -> None:
        self._finish()
        self.out.mkdir(parents=True, exist_ok=True)
        name = f"{self.prefix}-{len(self.shards):06d}.tar"
        self._path = self.out / name
        self._tar = tarfile.open(self._path.with_name(name + ".tmp"), "w", format=tarfile.GNU_FORMAT)
        self.shards.append({"name": name, "count": 0})
        self._count = self._size = 0

    def _finish(self) -> None:
        if self._tar is not None:
            self._tar.close()
            os.replace(self._path.with_name(self._path.name + ".tmp"), self._path)
            self.shards[-1]["count"] = self._count
            self._tar = None

    def write(self, key: str, members: dict[str, bytes]) -> None:
        if "." in key or "/" in key:
            raise UserError(f"sample key {key!r} must not contain '.' or '/'")
        size = sum(len(v) for v in members.values())
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

    def close(self) -> list[dict]:
        self._finish()
        return self.shards


# ---------------------------------------------------------------- reading


def iter_shard(url: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {field: bytes}) of one shard, in order; raises tarfile/OS errors on a broken stream."""
    if _is_remote(url):
        from webdataset.gopen import gopen  # pipe:, http(s), … (imported lazily: it pulls in torch)

        stream = gopen(url, "rb")
    else:
        stream = open(url[len("file:"):] if url.startswith("file:") else url, "rb")
    try:
        with tarfile.open(fileobj=stream, mode="r|*") as tar:
            key, fields = None, {}
            for info in tar:
                if not info.isreg():
                    continue
                folder, _, base = info.name.rpartition("/")
                stem, dot, field = base.partition(".")
                if not dot:
                    continue
                k = f"{folder}/{stem}" if folder else stem
                if k != key and key is not None:
                    yield key, fields
                    fields = {}
                key = k
                data = tar.extractfile(info).read()
                if len(data) != info.size:  # a stream read stops quietly at a cut; the header knows better
                    raise tarfile.ReadError(f"unexpected end of data in {info.name}")
                fields[field] = data
            size = os.fstat(stream.fileno()).st_size if not _is_remote(url) else None
            if size is not None and size < tar.offset + 2 * tarfile.BLOCKSIZE:
                raise tarfile.ReadError("unexpected end of data (no end-of-archive marker)")
            if key is not None:
                yield key, fields
    finally:
        stream.close()


def _quiet_cv2() -> None:
    # A corrupt image is reported by us in one line; cv2 would add its own multi-line log to stderr.
    try:
        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)
    except AttributeError:
        pass


_quiet_cv2()


def decode_image(data: bytes) -> np.ndarray:
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    if img is None:
        raise SampleError("image cannot be decoded")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def decode_label(data: bytes) -> np.ndarray:
    """The stored ids, never colour-converted; 'L' PNGs go through cv2, anything else ('P') through PIL."""
    if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 25 and data[24] == 8 and data[25] == 0:
        arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    else:
        try:
            with Image.open(io.BytesIO(data)) as im:
                arr = np.array(im) if im.mode in ("L", "P") else None
        except Exception:
            arr = None
    if arr is None or arr.dtype != np.uint8 or arr.ndim != 2:
        raise SampleError("label is not a decodable 8-bit single-channel PNG")
    return arr


def decode_sample(key: str, fields: dict[str, bytes]) -> tuple[np.ndarray, np.ndarray]:
    """→ (uint8 HxWx3 RGB image, uint8 HxW label); SampleError when a field is missing or broken."""
    img = next((fields[f] for f in IMAGE_FIELDS if f in fields), None)
    if img is None:
        raise SampleError("missing field img.png/img.jpg")
    if LABEL_FIELD not in fields:
        raise SampleError("missing field seg.png")
    image, label = decode_image(img), decode_label(fields[LABEL_FIELD])
    if image.shape[:2] != label.shape:
        raise SampleError(f"image {image.shape[1]}x{image.shape[0]} and label {label.shape[1]}x{label.shape[0]} differ")
    return image, label


def worker_init(_worker_id: int = 0) -> None:
    """DataLoader workers leave SIGTERM/SIGUSR1 to the training process, use one torch thread, and die
    with their rank (Linux: SIGKILL when the parent dies, even by SIGKILL; they ignore SIGTERM).

    (cv2's thread count is left alone: calling cv2.setNumThreads in a forked child can deadlock.)
    """
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        import ctypes

        import multiprocessing

        rank = multiprocessing.parent_process()
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # 1 = PR_SET_PDEATHSIG
        if rank is not None and os.getppid() != rank.pid:  # the rank died before prctl
            os._exit(1)
    import torch

    torch.set_num_threads(1)


def identity(x):
    return x


_LIVE_LOADERS: "weakref.WeakSet" = weakref.WeakSet()


@atexit.register
def _stop_live_loaders() -> None:
    # Workers ignore SIGTERM, so multiprocessing's exit hook could not stop them; stop them first.
    for it in list(_LIVE_LOADERS):
        it._shutdown_workers()


def loader_items(loader) -> Iterator:
    """Iterate a DataLoader; its workers stop when this generator ends, is closed, or the process exits.
    A UserError from a worker comes back as the same type with its own one-line message."""
    it = iter(loader)
    _LIVE_LOADERS.add(it)
    try:
        yield from it
    except UserError as e:
        raise reraise_worker_error(e) from None
    finally:
        _LIVE_LOADERS.discard(it)
        it._shutdown_workers()


def reraise_worker_error(exc: Exception) -> Exception:
    """A UserError raised in a DataLoader worker arrives with a traceback text; keep its own one line."""
    msg = str(exc)
    if isinstance(exc, UserError) and "Original Traceback" in msg:
        last = msg.strip().splitlines()[-1]
        return type(exc)(last.split(": ", 1)[1] if ": " in last else last)
    return exc


def eval_samples(urls: list[str], *, rank: int, world_size: int, num_workers: int = 0) -> Iterator[dict]:
    """Every sample exactly once across ranks × workers: rank r reads shards r, r+world, …; its workers
    split those again. Original resolution, no augmentation. A rank without shards yields nothing."""
    mine = list(urls)[rank::world_size]
    workers = min(num_workers, len(mine))
    if not mine:
        return
    if workers == 0:
        yield from _eval_iter(mine)
        return
    import torch.utils.data as tud

    class _Shards(tud.IterableDataset):
        def __iter__(self):
            info = tud.get_worker_info()
            return _eval_iter(mine[info.id :: info.num_workers] if info else mine)

    loader = tud.DataLoader(_Shards(), batch_size=None, num_workers=workers, collate_fn=identity,
                            worker_init_fn=worker_init)
    yield from loader_items(loader)


def _eval_iter(shards: list[str]) -> Iterator[dict]:
    for url in shards:
        last = None
        try:
            for key, fields in iter_shard(url):
                try:
                    image, label = decode_sample(key, fields)
                except SampleError as e:
                    raise UserError(f"{url}: sample {key}: {e}") from None
                yield {"key": key, "image": image, "label": label, "shard": url}
                last = key
        except (tarfile.TarError, OSError, EOFError) as e:
            where = f"after sample {last}" if last else "at its start"
            raise UserError(f"{url}: shard unreadable {where}: {e}") from None



# ---------------------------------------------------------------- inspection


def _manifest_beside(url: str) -> dict | None:
    m = re.match(r"^(.*)-\d{6}\.tar$", url)
    path = Path(m.group(1) + ".json") if m and not _is_remote(url) else None
    try:
        return load_manifest(path) if path and path.is_file() else None
    except UserError:
        return None


def _image_size(name: str, data: bytes) -> tuple[int, int]:
    """(width, height) of an image field; SampleError naming the field when it is not an image."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.size
    except Exception:
        head = data[:8].hex(" ") if data else "empty"
        raise SampleError(f"{name} is not a readable image ({len(data)} bytes, starts {head})") from None


def _inspect_shard(url: str, stats: dict, problems: list[str]) -> int:
    count = 0
    try:
        for key, fields in iter_shard(url):
            count += 1
            name = next((f for f in IMAGE_FIELDS if f in fields), None)
            try:
                if name is None or LABEL_FIELD not in fields:
                    raise SampleError("missing field " + ("img.png/img.jpg" if name is None else LABEL_FIELD))
                w, h = _image_size(name, fields[name])
                label = decode_label(fields[LABEL_FIELD])
            except SampleError as e:
                problems.append(f"{url}: sample {key}: {e}")
                continue
            if label.shape != (h, w):
                problems.append(f"{url}: sample {key}: image {w}x{h} but label {label.shape[1]}x{label.shape[0]}")
            stats["sizes"][f"{h}x{w}"] = stats["sizes"].get(f"{h}x{w}", 0) + 1
            stats["hist"] += np.bincount(label.ravel(), minlength=256)
    except (tarfile.TarError, OSError, EOFError) as e:
        problems.append(f"{url}: shard unreadable after {count} samples: {e}")
    return count



def inspect_shards(spec: str, as_json: bool = False) -> dict:
    """Counts, image sizes, per-class pixel histogram and label sanity of shards; a table or JSON on stdout.

    `spec` is a shard path, brace pattern or manifest JSON (relative to the current directory). Class names
    come from the manifest beside the shards when there is one.
    """
    urls = expand_paths(os.getcwd(), spec)
    manifest = load_manifest(spec) if spec.endswith(".json") else _manifest_beside(urls[0])
    classes = manifest["classes"] if manifest else None
    stats, problems, shards = {"sizes": {}, "hist": np.zeros(256, np.int64)}, [], []
    for url in urls:
        shards.append({"shard": url, "count": _inspect_shard(url, stats, problems)})
    expected = {s["name"]: s["count"] for s in manifest["shards"]} if manifest else {}
    for s in shards:
        want = expected.get(os.path.basename(s["shard"]))
        if want is not None and want != s["count"]:
            problems.append(f"{s['shard']}: {s['count']} samples, manifest says {want}")
    hist = stats["hist"]
    labelled = int(hist[:IGNORE_INDEX].sum())
    ids = range(len(classes)) if classes else [int(i) for i in np.flatnonzero(hist[:IGNORE_INDEX])]
    bad = [int(v) for v in np.flatnonzero(hist[:IGNORE_INDEX]) if classes and v >= len(classes)]
    if bad:
        problems.append(f"label values {bad[:10]} are outside the {len(classes)} class ids and 255")
    report = {
        "spec": spec, "shards": len(urls), "samples": sum(s["count"] for s in shards), "per_shard": shards,
        "image_sizes": dict(sorted(stats["sizes"].items())), "total_pixels": int(hist.sum()),
        "ignore_pixels": int(hist[IGNORE_INDEX]),
        "classes": [{"id": int(i), "name": classes[i] if classes else str(i), "pixels": int(hist[i]),
                     "fraction": float(hist[i] / labelled) if labelled else 0.0} for i in ids],
        "problems": problems, "ok": not problems,
    }
    if as_json:
        print(json.dumps(report, indent=1))
    else:
        _print_report(report)
    return report


def _print_report(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    sizes = ", ".join(f"{k} ({v})" for k, v in report["image_sizes"].items())
    console.print(f"{report['samples']} samples in {report['shards']} shard(s); image sizes: {sizes or '-'}")
    table = Table("id", "class", "pixels", "fraction")
    for c in report["classes"]:
        table.add_row(str(c["id"]), c["name"], f"{c['pixels']:,}", f"{c['fraction']:.2%}")
    table.add_row("255", "ignore", f"{report['ignore_pixels']:,}", "")
    console.print(table)
    problems = report["problems"]
    for p in problems[:20]:  # plain lines: no wrapping, so paths stay whole for grep and CI logs
        print(f"problem: {p}")
    if len(problems) > 20:
        print(f"problem: … and {len(problems) - 20} more (--json lists them all)")
    print("labels ok" if report["ok"] else f"{len(problems)} problem(s)")
