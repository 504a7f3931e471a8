"""Slow and silent tracker servers on 127.0.0.1, for the tests: a TCP proxy that holds every answer of the
server behind it for a while, and a server that accepts connections and never answers."""

from __future__ import annotations

import re
import socket
import threading
import time

REQUEST_LINE = re.compile(rb"^[A-Z]+ /\S* HTTP/1\.[01]\r$", re.M)


class SlowProxy:
    """Passes bytes between a client and `127.0.0.1:upstream`, holding the first bytes of every answer
    `delay` seconds. With `upstream=None` nothing is ever answered. `requests` counts HTTP request lines."""

    def __init__(self, upstream: int | None, delay: float = 0.0):
        self.upstream, self.delay, self.requests = upstream, delay, 0
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.uri = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self._listener.close()

    def __enter__(self) -> "SlowProxy":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        asked = threading.Event()
        upstream = socket.create_connection(("127.0.0.1", self.upstream)) if self.upstream else None
        threading.Thread(target=self._requests, args=(client, upstream, asked), daemon=True).start()
        if upstream is None:
            return
        try:
            while data := upstream.recv(65536):
                if asked.is_set():  # the first bytes of an answer
                    asked.clear()
                    time.sleep(self.delay)
                client.sendall(data)
        except OSError:
            pass
        finally:
            client.close()
            upstream.close()

    def _requests(self, client: socket.socket, upstream: socket.socket | None, asked: threading.Event) -> None:
        try:
            while data := client.recv(65536):
                with self._lock:
                    self.requests += len(REQUEST_LINE.findall(data))
                asked.set()
                if upstream is not None:
                    upstream.sendall(data)
        except OSError:
            pass
        finally:
            if upstream is not None:
                try:
                    upstream.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
