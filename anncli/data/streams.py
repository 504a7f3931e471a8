"""The bytes of one shard: a local file, the stdout of a `pipe:CMD`, or an http(s) stream via webdataset.

`open_shard` refuses a compressed tar by its first bytes (`guards.refuse_compressed`). Whether a spec may
be a command or a URL at all is decided before, when it is resolved (`manifest.resolve_urls`).
"""

from __future__ import annotations

import subprocess
import tempfile

from anncli.data.guards import refuse_compressed
from anncli.data.manifest import is_remote


class PipeStream:
    """The stdout of a `pipe:CMD` shard; a failing command (exit status ≠ 0 at the end of its output) raises
    OSError with the tail of its stderr, which is captured instead of printed on every try."""

    def __init__(self, command: str):
        self._err = tempfile.TemporaryFile()
        self._proc = subprocess.Popen(command, shell=True, stdout=subprocess.PIPE, stderr=self._err)
        self.closed = self._ended = False

    def read(self, n: int = -1) -> bytes:
        data = self._proc.stdout.read(n)
        if not data and n != 0:
            self._ended = True
            self._check(self._proc.wait())
        return data

    def _check(self, status: int) -> None:
        if status != 0:
            self._err.seek(0)
            tail = " / ".join(self._err.read().decode("utf-8", "replace").split("\n")[-4:]).strip(" /")[-300:]
            raise OSError(f"command exited with status {status}" + (f": {tail}" if tail else " (no stderr)"))

    def __enter__(self) -> "PipeStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if not self.closed:  # closed early, the command is stopped: its exit status is no fault of its own
            self.closed = True
            self._proc.stdout.close()
            if not self._ended:
                self._proc.kill()
            self._proc.wait()
            self._err.close()


class Prefixed:
    """A stream whose first bytes were read already to look at them: they are handed out again first."""

    def __init__(self, head: bytes, stream):
        self._head, self._stream = head, stream

    def read(self, n: int = -1) -> bytes:
        if not self._head:
            return self._stream.read(n)
        if 0 <= n < len(self._head):
            out, self._head = self._head[:n], self._head[n:]
            return out
        out, self._head = self._head, b""
        return out + self._stream.read(-1 if n < 0 else n - len(out))

    def __enter__(self) -> "Prefixed":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._stream.close()


def open_shard(url: str):
    """A binary stream of one shard: a local file, a `pipe:CMD` (PipeStream), or http(s) via webdataset.
    A compressed tar is refused by name (CompressedShard)."""
    if url.startswith("pipe:"):
        stream = PipeStream(url[len("pipe:"):])
    elif is_remote(url):
        from webdataset.gopen import gopen  # http(s), … (imported lazily: it pulls in torch)

        stream = gopen(url, "rb")
    else:
        stream = open(url[len("file:"):] if url.startswith("file:") else url, "rb")
    try:
        head = stream.read(6)
        refuse_compressed(url, head)
    except BaseException:
        stream.close()
        raise
    if is_remote(url):
        return Prefixed(head, stream)
    stream.seek(0)
    return stream
