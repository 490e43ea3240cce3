"""A loopback HTTP image host for URL sources in tests: each test says how it answers.

``respond(path, nth)`` gets the request's path and how many times that path was asked for
(1 for the first request) and returns a :class:`Reply`, or None to hang: the request is held,
unanswered, until the host closes (what a wedged origin looks like to the worker's fetch).
``requests`` counts the requests per path.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass(frozen=True)
class Reply:
    """An answer: a status, and for a 2xx status the body and its content type."""

    status: int
    body: bytes = b""
    content_type: str = "image/png"


Respond = Callable[[str, int], "Reply | None"]


class LoopbackHost:
    """Serves on ``url`` (``http://127.0.0.1:<free port>``) from a thread until :meth:`close`."""

    def __init__(self, respond: Respond) -> None:
        self.requests: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._closing = threading.Event()
        host = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                with host._lock:
                    host.requests[self.path] += 1
                    nth = host.requests[self.path]
                reply = respond(self.path, nth)
                if reply is None:
                    host._closing.wait(60)
                elif reply.status >= 300:
                    self.send_error(reply.status)
                else:
                    self.send_response(reply.status)
                    self.send_header("Content-Type", reply.content_type)
                    self.send_header("Content-Length", str(len(reply.body)))
                    self.end_headers()
                    self.wfile.write(reply.body)

            def log_message(self, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    @property
    def total(self) -> int:
        """All requests so far."""
        with self._lock:
            return sum(self.requests.values())

    def close(self) -> None:
        self._closing.set()
        self._server.shutdown()
        self._server.server_close()


@contextmanager
def loopback_host(respond: Respond) -> Iterator[LoopbackHost]:
    """A :class:`LoopbackHost` for the block."""
    host = LoopbackHost(respond)
    try:
        yield host
    finally:
        host.close()
