"""One tracker's background thread, so that the training thread never waits for a tracker or its server.

The thread starts the tracker (creating or continuing its run), gives it the steps of events.jsonl that it
is not known to hold (a launch killed before its tracker had them), then logs what the loop hands over, in
batches: a tracker that answers slowly takes several steps per request instead of holding up a step.
The loop's side only queues, and a queue over its limit drops the step (one warning, counted). A step
counts as the tracker's once its call returned; trackers.json keeps the last one.
"""

from __future__ import annotations

import queue
import sys
import threading
import time
from pathlib import Path

from anncli.train.trackers.history import StepRecord
from anncli.train.trackers.state import TrackerState

BATCH = 100  # records per call at most: a backlog is acknowledged as it goes


class _Close:
    def __init__(self, status: str):
        self.status = status


def warn(line: str) -> None:
    print(f"[ann] warning: {line}", file=sys.stderr, flush=True)


def why(e: BaseException, extra: str) -> str:
    """An exception as a few words on one line."""
    if isinstance(e, ImportError):
        return f"not installed (pip install 'anncli[{extra}]')"
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:300]}"


class TrackerWorker:
    def __init__(self, backend, recipe, run_dir: Path, state: TrackerState, past: list[StepRecord], limit: int):
        self.backend, self.name = backend, backend.name
        self.recipe, self.run_dir, self.state, self.past, self.limit = recipe, run_dir, state, past, limit
        self.queue: queue.Queue = queue.Queue()  # unbounded for the close marker; put() keeps the limit
        self.started = threading.Event()
        self.failed = self.abandoned = False
        self.dropped = 0
        self._thread = threading.Thread(target=self._run, name=f"ann-{self.name}", daemon=True)

    # --- the training thread's side ---

    def start(self) -> None:
        self._thread.start()

    def wait_started(self, deadline: float, waited_s: float) -> None:
        if not self.started.wait(max(0.0, deadline - time.monotonic())):
            warn(f"{self.name}: no answer within {waited_s:.0f} s; training goes on, and up to {self.limit} steps "
                 "wait for it")

    def put(self, record: StepRecord) -> None:
        if self.failed:
            return
        if self.queue.qsize() >= self.limit:
            if not self.dropped:
                warn(f"{self.name}: {self.limit} steps are waiting for it (ANN_TRACKER_QUEUE); dropping the steps "
                     "that come while it is behind (they stay in events.jsonl)")
            self.dropped += 1
            return
        self.queue.put(record)

    def close(self, status: str) -> None:
        self.queue.put(_Close(status))

    def join(self, deadline: float) -> bool:
        """Whether the thread is done (closed the tracker, or failed) by `deadline`."""
        self._thread.join(max(0.0, deadline - time.monotonic()))
        return not self._thread.is_alive()

    def abandon(self) -> None:
        """Leave a tracker that did not finish in time, so that the process can end."""
        self.abandoned = True
        self.backend.abandon()

    # --- the tracker's thread ---

    def _run(self) -> None:
        tracker = self._start()
        if tracker is None:
            return
        try:
            mark = self._catch_up(tracker)
            self._serve(tracker, mark)
        except Exception as e:  # noqa: BLE001 — a tracker never stops training
            self._fail(e)

    def _start(self):
        try:
            tracker = self.backend(self.recipe, self.run_dir, self.state.get(self.name))
            self.state.update(self.name, **tracker.state)
            return tracker
        except Exception as e:  # noqa: BLE001
            self._fail(e)
            return None
        finally:
            self.started.set()

    def _catch_up(self, tracker) -> int:
        """Log the past steps above the last one the tracker holds; return the last step it now has."""
        tracker.describe(self.recipe)
        known = tracker.known_step()
        missing = [r for r in self.past if r.step > known]
        for i in range(0, len(missing), BATCH):
            self._log(tracker, missing[i : i + BATCH])
        return max([known] + [r.step for r in self.past])

    def _serve(self, tracker, mark: int) -> None:
        while True:
            batch = [self.queue.get()]
            while len(batch) < BATCH and not isinstance(batch[-1], _Close):
                try:
                    batch.append(self.queue.get_nowait())
                except queue.Empty:
                    break
            close = batch.pop() if isinstance(batch[-1], _Close) else None
            self._log(tracker, [r for r in batch if r.step > mark])
            if close is not None:
                tracker.close(close.status)
                return

    def _log(self, tracker, records: list[StepRecord]) -> None:
        if records:
            tracker.log(records)
            self.state.update(self.name, last_step=records[-1].step)

    def _fail(self, e: BaseException) -> None:
        self.failed = True
        if not self.abandoned:  # an abandoned tracker fails as its service goes: already said
            warn(f"{self.name}: {why(e, self.name)}; not logging to {self.name} for the rest of this launch")
