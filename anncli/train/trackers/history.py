"""What the trackers are given: one record per step (its training values, its validation values, the files
that go with them), live from the loop or read back from events.jsonl for the steps a tracker may lack."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

EVENTS_FILE = "events.jsonl"
_NOT_SERIES = ("event", "time", "step", "samples_sha256")


@dataclass
class StepRecord:
    step: int
    values: dict[str, float] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)


def train_series(record: dict) -> dict[str, float]:
    """The fields of a `step` event as the series every logger gets: train/loss, train/lr, …"""
    return {f"train/{k}": v for k, v in record.items() if k not in _NOT_SERIES}


def val_report_path(run_dir: Path, step: int) -> Path:
    """Where a validation's metrics JSON (`ann eval --json`'s format) is kept for the trackers."""
    return Path(run_dir) / "val" / f"step-{step:06d}.json"


def past_records(run_dir: Path) -> list[StepRecord]:
    """Every logged step of events.jsonl, in step order, as the trackers get it live.

    A step that events.jsonl holds twice (a resume from an older checkpoint trains it again) gives its first
    values: the trackers keep what was logged first."""
    records: dict[int, StepRecord] = {}
    seen: set[tuple[str, int]] = set()
    for event in _read_events(Path(run_dir) / EVENTS_FILE):
        kind, step = event.get("event"), event.get("step")
        if kind not in ("step", "val") or not isinstance(step, int) or (kind, step) in seen:
            continue
        seen.add((kind, step))
        record = records.setdefault(step, StepRecord(step))
        if kind == "step":
            record.values.update(train_series(event))
            continue
        record.values.update(_val_series(event))
        report = val_report_path(run_dir, step)
        if report.is_file():
            record.files.append(report)
    return [records[s] for s in sorted(records)]


def _val_series(event: dict) -> dict[str, float]:
    """A `val` event as the series of eval.report.val_scalars (a class without IoU is stored as null)."""
    from anncli.eval.report import val_scalars

    rows = [{"name": name, "IoU": float("nan") if iou is None else iou} for name, iou in event.get("IoU", {}).items()]
    return val_scalars({"mIoU": event["mIoU"], "aAcc": event["aAcc"], "mAcc": event["mAcc"], "per_class": rows})


def _read_events(path: Path) -> list[dict]:
    """The events of `path`; a line that is not one JSON object (cut short by a kill) is passed over."""
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return []
    events = []
    for line in lines:
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict):
            events.append(event)
    return events
