"""<run>/trackers.json: per tracker, the id of its run and the last step it acknowledged."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path


class TrackerState:
    """The file's contents, shared by the trackers' threads; every update rewrites it atomically."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._data = self._read()

    def _read(self) -> dict:
        try:
            data = json.loads(self.path.read_text())
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def get(self, name: str) -> dict:
        with self._lock:
            return dict(self._data.get(name) or {})

    def update(self, name: str, **fields) -> None:
        with self._lock:
            self._data[name] = {**(self._data.get(name) or {}), **fields}
            # The pid keeps apart an older launch still closing its trackers beside a requeued one.
            tmp = self.path.with_name(f"{self.path.name}.tmp-{os.getpid()}")
            tmp.write_text(json.dumps(self._data, indent=2) + "\n")
            os.replace(tmp, self.path)
