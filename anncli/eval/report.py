"""What the user sees and what a run records: progress bars, periodic lines, metric tables, JSONL events,
TensorBoard."""

from __future__ import annotations

import json
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

console = Console(stderr=True)


class EventLog:
    """Append-only JSONL of everything a run did; one JSON object per line, flushed at once."""

    def __init__(self, path: Path | None):
        self._file = open(path, "a", buffering=1) if path is not None else None

    def write(self, event: str, **fields) -> None:
        if self._file is None:
            return
        record = {"event": event, "time": round(time.time(), 3), **fields}
        self._file.write(json.dumps(record) + "\n")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class StepMeter:
    """Images seen since the last logged step, for img/s, and the process's peak memory."""

    def __init__(self):
        self.start, self.images = time.perf_counter(), 0

    def record(self, result, lr: float, scale: float | None, device) -> dict:
        """The fields of a `step` event from a train.StepResult."""
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        record = {"loss": result.loss, "aux_loss": result.aux, "total_loss": result.total, "lr": lr,
                  "img_per_s": self.images / elapsed, "mem_mb": memory_mb(device)}
        if scale is not None:
            record["scale"] = scale
        self.start, self.images = time.perf_counter(), 0
        return record


def memory_mb(device) -> float:
    if device.type == "cuda":
        import torch

        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class TrainProgress:
    """A rich progress bar on a terminal, plain periodic lines otherwise (logs, SLURM output files)."""

    def __init__(self, total: int, start: int, enabled: bool):
        self.enabled = enabled
        self.interactive = enabled and sys.stderr.isatty()
        self._progress = None
        if self.interactive:
            self._progress = Progress(
                TextColumn("[bold]train"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.fields[stats]}"),
                console=console,
            )
            self._task = self._progress.add_task("train", total=total, completed=start, stats="")
            self._progress.start()

    def update(self, step: int, stats: dict, log_line: bool) -> None:
        if not self.enabled:
            return
        text = "  ".join(f"{k} {_fmt(v)}" for k, v in stats.items())
        if self._progress is not None:
            self._progress.update(self._task, completed=step, stats=text)
        elif log_line:
            print(f"step {step}  {text}", file=sys.stderr, flush=True)

    def message(self, text: str) -> None:
        if self.enabled:
            console.print(text) if self.interactive else print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


@contextmanager
def progress(label: str, total: Optional[int] = None, enabled: bool = True):
    """A rich progress bar of `label` on a terminal (nothing in logs); yields a function that advances it by one.

    For evaluation and prediction; training has TrainProgress, which also prints periodic lines."""
    bar_console = Console(stderr=True)
    if not (enabled and bar_console.is_terminal):
        yield lambda: None
        return
    with Progress(TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=bar_console) as bar:
        task = bar.add_task(label, total=total)
        yield lambda: bar.advance(task)


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


class TensorBoard:
    """Optional TensorBoard scalars; a clear error when asked for without the package.

    `purge_step`, a launch's first step: TensorBoard hides what earlier launches logged from there on
    (a resumed launch trains those steps again), so that each step shows once. Every call is flushed:
    a killed launch loses none of its points."""

    def __init__(self, log_dir: Path | None, purge_step: int | None = None):
        self._writer = None
        if log_dir is None:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            from anncli.errors import UserError

            raise UserError("train.tensorboard is on but tensorboard is not installed (pip install 'anncli[tensorboard]')") from None
        self._writer = SummaryWriter(str(log_dir), purge_step=purge_step)

    def scalars(self, step: int, values: dict) -> None:
        if self._writer is not None:
            for k, v in values.items():
                self._writer.add_scalar(k, v, step)
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def val_scalars(metrics: dict) -> dict[str, float]:
    """A validation result as the flat series every logger gets (TensorBoard, trackers): val/mIoU, val/aAcc,
    val/mAcc and val/IoU/<class>. A class with no IoU (absent from the split and never predicted: NaN) is left
    out; class names keep letters, digits, `_ - .` and spaces, anything else becomes `_`."""
    values = {f"val/{k}": float(metrics[k]) for k in ("mIoU", "aAcc", "mAcc")}
    for row in metrics["per_class"]:
        if row["IoU"] == row["IoU"]:
            values[f"val/IoU/{_tag(row['name'])}"] = float(row["IoU"])
    return values


def _tag(name: str) -> str:
    return "".join(c if c.isalnum() or c in "_-. " else "_" for c in str(name).strip()) or "_"


def _pct(value: float) -> str:
    return "nan" if value != value else f"{value * 100:.2f}"


def metrics_table(metrics: dict, title: str = "Evaluation") -> Table:
    """Per-class IoU/Acc and the summary row, in percent with two decimals (mmseg's printout)."""
    table = Table(title=title, title_justify="left")
    table.add_column("class")
    table.add_column("IoU", justify="right")
    table.add_column("Acc", justify="right")
    table.add_column("GT pixels", justify="right")
    for row in metrics["per_class"]:
        table.add_row(row["name"], _pct(row["IoU"]), _pct(row["Acc"]), f"{row['pixels']:,}")
    table.add_section()
    table.add_row("mean", _pct(metrics["mIoU"]), _pct(metrics["mAcc"]), "", style="bold")  # no mean of pixels
    table.caption = f"aAcc {_pct(metrics['aAcc'])}  mIoU {_pct(metrics['mIoU'])}  mAcc {_pct(metrics['mAcc'])}  (%)"
    return table
