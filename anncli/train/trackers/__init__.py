"""Experiment trackers: Weights & Biases and MLflow, logged to by rank 0 beside events.jsonl.

The recipe's `logging.wandb` / `logging.mlflow` turn them on. A run directory has one tracker run per
tracker; its id is kept in <run>/trackers.json, so a resumed launch (a requeue, `--resume`) continues it.
What is logged: the flattened recipe as parameters (when the tracker run is created), every logged
training step and validation pass with its step (the values of events.jsonl), each validation's metrics
JSON (the format of `ann eval --json`), and at the end the training curves and per-class IoU bars drawn
by `ann plot`.

Each tracker runs in a thread of its own (worker.py): the loop hands over one record per step and never
waits, start-up waits at most START_TIMEOUT_S for the trackers, and closing waits at most
ANN_TRACKER_CLOSE_TIMEOUT seconds (the loop closes them after releasing the run lock).

Steps after a resume: a tracker gets every step of events.jsonl above the last one it is known to hold (a
kill can lose what a tracker was still sending; wandb_run.py says how W&B's is known), and the steps this
launch trains again are not logged twice. A tracker that is not installed, unreachable or failing costs
one warning line and is left out for the rest of the launch; training never stops for it.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from anncli.errors import UserError
from anncli.runs.rundir import TRACKERS_FILE
from anncli.train.trackers.history import StepRecord, past_records, val_report_path
from anncli.train.trackers.mlflow_run import MlflowTracker
from anncli.train.trackers.state import TrackerState
from anncli.train.trackers.wandb_run import WandbTracker
from anncli.train.trackers.worker import TrackerWorker, warn, why

BACKENDS = (WandbTracker, MlflowTracker)
START_TIMEOUT_S = 10.0


def _setting(name: str, default: float) -> float:
    text = os.environ.get(name, "")
    try:
        value = float(text) if text else default
    except ValueError:
        raise UserError(f"{name}={text!r}: expected a number") from None
    if value < 0:
        raise UserError(f"{name}={text!r}: expected a number >= 0")
    return value


class Trackers:
    """The trackers of one launch (none on ranks other than 0); every call is safe to make and returns at once."""

    def __init__(self, recipe, run_dir: Path, enabled: bool):
        self.run_dir = Path(run_dir)
        self.val_every, self.iters = recipe.train.val_every, recipe.train.iters
        self.pending: StepRecord | None = None  # the current step, until its validation (if any) is in
        self.last_val: Path | None = None
        backends = [b for b in BACKENDS if enabled and getattr(recipe.logging, b.name) is not None]
        self.workers: list[TrackerWorker] = []
        if not backends:
            return
        limit = max(1, int(_setting("ANN_TRACKER_QUEUE", 10000)))
        self.close_timeout = _setting("ANN_TRACKER_CLOSE_TIMEOUT", 30)
        for backend in backends:
            backend.prepare(recipe)
        state, past = TrackerState(self.run_dir / TRACKERS_FILE), past_records(self.run_dir)
        self.workers = [TrackerWorker(b, recipe, self.run_dir, state, past, limit) for b in backends]
        for worker in self.workers:
            worker.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        for worker in self.workers:
            worker.wait_started(deadline, START_TIMEOUT_S)

    def scalars(self, step: int, values: dict) -> None:
        if not self.workers:
            return
        self._record(step).values.update(values)
        # A step goes to the trackers whole: it waits for its validation, and the last one for the pictures.
        if not (self.val_every and step % self.val_every == 0) and step != self.iters:
            self._flush()

    def validation(self, step: int, report: dict) -> None:
        """One validation pass's metrics JSON (`ann eval --json`'s format, drawn by `ann plot`), as an artifact."""
        if not self.workers:
            return
        from anncli.eval.metrics import json_safe

        path = val_report_path(self.run_dir, step)
        path.parent.mkdir(exist_ok=True)
        path.write_text(json.dumps(json_safe(report), indent=2) + "\n")
        self.last_val = path
        self._record(step).files.append(path)
        if step != self.iters:
            self._flush()

    def finish(self, step: int) -> None:
        """At the last step: the training curves and the last validation's per-class bars, as artifacts."""
        if not self.workers:
            return
        from anncli.interop.plot import plot_classes, plot_curves

        pictures = [(plot_curves, [self.run_dir], self.run_dir / "curves.png")]
        if self.last_val is not None:
            pictures.append((plot_classes, [self.last_val], self.run_dir / "classes.png"))
        record = self._record(step)
        for draw, inputs, out in pictures:
            try:
                draw(inputs, out)
            except Exception as e:  # noqa: BLE001 — e.g. matplotlib missing: the trackers go without the picture
                warn(f"{out.name} for the trackers: {why(e, 'plot')}")
                continue
            record.files.append(out)
        self._flush()

    def close(self, status: str) -> None:
        """status: FINISHED, KILLED (preempted; a requeue continues the run) or FAILED. Waits at most
        ANN_TRACKER_CLOSE_TIMEOUT seconds for the trackers to take their last steps and end their runs."""
        if not self.workers:
            return
        self._flush()
        for worker in self.workers:
            worker.close(status)
        deadline = time.monotonic() + self.close_timeout
        for worker in self.workers:
            if not worker.join(min(deadline, time.monotonic() + 1)):
                print(f"[ann] {worker.name}: waiting up to {self.close_timeout:.0f} s for it to finish",
                      file=sys.stderr, flush=True)
            done = worker.join(deadline)
            if worker.dropped:
                warn(f"{worker.name}: dropped {worker.dropped} steps while it was behind; events.jsonl has them")
            if not done:
                warn(f"{worker.name}: not finished after {self.close_timeout:.0f} s; left as it is (a resume logs "
                     "the steps it is missing from events.jsonl)")
                worker.abandon()
        self.workers = []

    def _record(self, step: int) -> StepRecord:
        if self.pending is not None and self.pending.step != step:
            self._flush()
        if self.pending is None:
            self.pending = StepRecord(step)
        return self.pending

    def _flush(self) -> None:
        if self.pending is not None and (self.pending.values or self.pending.files):
            for worker in self.workers:
                worker.put(self.pending)
        self.pending = None
