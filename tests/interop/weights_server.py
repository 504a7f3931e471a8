"""A real HTTP server on 127.0.0.1 (the standard library's) serving files made in a test.

Modes, per server: byte ranges with If-Range on the ETag (`ranges`, on by default), a slow mode (`hold`:
the body stops after that many bytes until the test calls `release()`), a drop-mid-file mode (`drop`:
the first answer of each file, or every answer, ends after half its body, the connection closed) and
content types. Every GET is recorded with its Range header.
"""

from __future__ import annotations

import hashlib
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

CHUNK = 2**14


class WeightsServer:
    def __init__(self, ranges: bool = True, drop: str | None = None, hold: int | None = None):
        assert drop in (None, "first", "always")
        self.files: dict[str, tuple[bytes, str]] = {}
        self.gets: list[tuple[str, str | None]] = []
        self.ranges, self.drop, self.hold = ranges, drop, hold
        self.released = threading.Event()
        self._dropped: set[str] = set()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def port(self) -> int:
        return self.httpd.server_address[1]

    def add(self, name: str, data: bytes, content_type: str = "application/octet-stream") -> str:
        self.files["/" + name] = (data, content_type)
        return self.url(name)

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/{name}"

    def release(self) -> None:
        self.released.set()

    def stop(self) -> None:
        self.release()
        self.httpd.shutdown()
        self.httpd.server_close()

    def body_start(self, path: str, range_header: str | None, if_range: str | None, etag: str) -> int:
        if not (self.ranges and range_header and range_header.startswith("bytes=")):
            return 0
        if if_range is not None and if_range != etag:
            return 0
        return int(range_header[len("bytes="):].split("-")[0])

    def cuts(self, path: str) -> bool:
        """Whether the drop mode cuts this answer: every one, or the first of each file."""
        first = path not in self._dropped
        self._dropped.add(path)
        return self.drop == "always" or (self.drop == "first" and first)


def _handler(server: WeightsServer):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # quiet
            pass

        def do_GET(self):
            server.gets.append((self.path, self.headers.get("Range")))
            if self.path not in server.files:
                self.send_error(404, "Not Found")
                return
            data, kind = server.files[self.path]
            etag = '"' + hashlib.sha256(data).hexdigest()[:16] + '"'
            start = server.body_start(self.path, self.headers.get("Range"), self.headers.get("If-Range"), etag)
            self.send_response(206 if start else 200)
            if start:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.send_header("Content-Length", str(len(data) - start))
            self.send_header("Content-Type", kind)
            self.send_header("ETag", etag)
            if server.ranges:
                self.send_header("Accept-Ranges", "bytes")
            self.end_headers()
            self._body(data[start:])

        def _body(self, body: bytes) -> None:
            stop = len(body) // 2 if server.cuts(self.path) else len(body)
            sent = 0
            try:
                while sent < stop:
                    if server.hold is not None and sent >= server.hold:
                        server.released.wait()
                    piece = body[sent:min(sent + CHUNK, stop)]
                    self.wfile.write(piece)
                    self.wfile.flush()
                    sent += len(piece)
            except OSError:  # the client went away (a killed download)
                return
            if stop < len(body):
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)

    return Handler


def dead_server() -> tuple[socket.socket, str]:
    """A socket that listens and never answers: connections are made (the backlog), nothing comes back."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    return sock, f"http://127.0.0.1:{sock.getsockname()[1]}/never-4f3e2a1b.pth"
