"""A download's progress on stderr: a rich bar on a terminal, one line per 10 % otherwise (a SLURM log)."""

from __future__ import annotations

import sys

MB = 2**20


class DownloadProgress:
    def __init__(self, label: str, total: int | None, done: int = 0):
        self.label, self.total, self.done = label, total, done
        self.bar = self.task = None
        if total and sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                                       TransferSpeedColumn)

            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                                TransferSpeedColumn(), TimeRemainingColumn(), console=Console(stderr=True))
            self.bar.start()
            self.task = self.bar.add_task(label, total=total, completed=done)
        self.tenths = self._tenths()
        if done:
            self._say(f"resuming at {done / MB:.1f} MB" + (f" of {total / MB:.1f} MB" if total else ""))
        elif self.bar is None:
            self._say("starting" + (f", {total / MB:.1f} MB" if total else ""))

    def _tenths(self) -> int:
        return 10 * self.done // self.total if self.total else 0

    def _say(self, text: str) -> None:
        if self.bar is None:
            print(f"[ann] {self.label}: {text}", file=sys.stderr, flush=True)

    def update(self, nbytes: int) -> None:
        self.done += nbytes
        if self.bar is not None:
            self.bar.update(self.task, completed=self.done)
            return
        tenths = self._tenths()
        if tenths > self.tenths:
            self.tenths = tenths
            self._say(f"{10 * tenths}% ({self.done / MB:.1f} of {self.total / MB:.1f} MB)")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
        elif not self.total:
            self._say(f"{self.done / MB:.1f} MB")
