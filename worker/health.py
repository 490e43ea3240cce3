"""Liveness, readiness and Prometheus metrics over HTTP, served from a background thread.

Liveness is a heartbeat: the consumer loop beats once per turn (and while it waits out a pause),
and ``/livez`` fails once the last beat is older than ``worker.liveness_timeout_s``, so a wedged
loop gets the process restarted. Readiness probes run on this server's threads with clients of
their own, never the loop's.

Several workers on one host each need a port of their own (``worker.health_port``, or 0 for any
free port, logged at start); a port already taken is a :class:`ConfigurationError` saying so.
"""

from __future__ import annotations

import errno
import logging
import socket
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import orjson
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from engine.errors import ConfigurationError

logger = logging.getLogger(__name__)

ReadinessCheck = Callable[[], dict[str, bool]]


class Heartbeat:
    """When the consumer loop last made progress; safe to read from any thread."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._last = clock()

    def beat(self) -> None:
        self._last = self._clock()

    def age(self) -> float:
        """Seconds since the last beat."""
        return self._clock() - self._last

    def fresh(self, bound_s: float) -> bool:
        return self.age() <= bound_s


class HealthServer:
    """``GET /livez`` (``is_alive``: the loop's heartbeat is fresh), ``GET /readyz``
    (dependencies), ``GET /metrics``; listening once built (port 0: any free one, see
    :attr:`address`).

    Raises:
        ConfigurationError: the port is taken (another worker on this host?) or the address
            cannot be listened on; the message says which setting to change.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        registry: CollectorRegistry,
        is_alive: Callable[[], bool],
        readiness: ReadinessCheck,
    ) -> None:
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path == "/metrics":
                    self._send(200, generate_latest(registry), CONTENT_TYPE_LATEST)
                elif self.path == "/livez":
                    alive = is_alive()
                    self._json(200 if alive else 503, {"alive": alive})
                elif self.path == "/readyz":
                    checks = readiness()
                    ready = all(checks.values())
                    self._json(200 if ready else 503, {"ready": ready, "checks": checks})
                else:
                    self._json(404, {"error": "not found"})

            def _json(self, status: int, body: object) -> None:
                self._send(status, orjson.dumps(body), "application/json")

            def _send(self, status: int, body: bytes, content_type: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                logger.debug("health: %s", format % args)

        try:
            self._httpd = ThreadingHTTPServer((host, port), Handler)
        except OSError as exc:
            raise ConfigurationError(_cannot_listen(host, port, exc)) from exc
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, name="health", daemon=True
        )
        self.address = f"http://{host}:{self._httpd.server_address[1]}"

    def start(self) -> None:
        self._thread.start()
        logger.info("health and metrics on %s", self.address)

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


def check_port_free(host: str, port: int) -> None:
    """Fail now, not after a long start-up, when the health server could not listen (port 0,
    any free port, always can).

    Raises:
        ConfigurationError: as :class:`HealthServer` does.
    """
    if port == 0:
        return
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        # As the HTTP server binds (allow_reuse_address): only a listening socket blocks it.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise ConfigurationError(_cannot_listen(host, port, exc)) from exc


def _cannot_listen(host: str, port: int, exc: OSError) -> str:
    if exc.errno == errno.EADDRINUSE:
        return (
            f"worker health port {host}:{port} is already in use (another trident-worker on "
            f"this host?): give each worker its own, e.g. --health-port {port + 1} or "
            f"TRIDENT_WORKER__HEALTH_PORT={port + 1}, or 0 for any free port (logged at start)"
        )
    return (
        f"cannot listen on {host}:{port} for health and metrics ({exc.strerror}): set "
        "worker.health_host and worker.health_port (--health-port) to an address of this host"
    )
