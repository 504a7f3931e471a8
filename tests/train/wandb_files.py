"""Reading W&B offline runs back from their files, for the tests.

wandb (0.31) has no Python reader of `run-<id>.wandb` files: its public API reads the W&B server, and
the old reader (wandb.sdk.internal.datastore) went with the Go core. The file is a LevelDB-style log:
a 7-byte header (":W&B", magic 0xBEE1, version 0), then 32 KiB blocks of chunks (CRC-32C, length,
type FULL/FIRST/MIDDLE/LAST) whose payloads are `wandb.proto.wandb_internal_pb2.Record` messages. This
reads the chunks and decodes the records with wandb's own protobuf classes.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

BLOCK = 32768
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path) -> list:
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path}: not a W&B run file"
    out, pos, pending = [], HEADER, b""
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # the block's tail is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        if kind == 0 and length == 0:
            pos += left
            continue
        chunk = data[pos + HEADER : pos + HEADER + length]
        pos += HEADER + length
        pending = chunk if kind in (FULL, FIRST) else pending + chunk
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            out.append(record)
            pending = b""
    return out


def history(path: Path) -> dict[int, dict[str, float]]:
    """{step: {key: value}} of the history rows in one run file."""
    rows: dict[int, dict[str, float]] = {}
    for record in records(path):
        if record.WhichOneof("record_type") != "history":
            continue
        items = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in record.history.item}
        step = int(items.pop("_step", record.history.step.num))
        rows.setdefault(step, {}).update({k: v for k, v in items.items() if not k.startswith("_")})
    return rows


def config(path: Path) -> dict:
    """The run's config: what the run record started with and every later update."""
    out = {}
    for record in records(path):
        kind = record.WhichOneof("record_type")
        if kind in ("run", "config"):
            items = record.run.config.update if kind == "run" else record.config.update
            out.update({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in items})
    return out


def run_id(path: Path) -> str:
    return next(r.run.run_id for r in records(path) if r.WhichOneof("record_type") == "run")
