"""Prometheus metrics of the query API (served at ``GET /metrics``).

Series (a Grafana dashboard reads these names):

- ``trident_api_requests_total{route,method,status}``: answered requests; ``route`` is the
  route's template (``/items/{collection:str}/{item_path:path}``), so ids do not multiply
  series; multipart searches and embeds count under ``/search/upload`` and ``/embed/upload``.
  Requests matching no route never reach a route's middleware and are not counted.
- ``trident_api_request_seconds{route}``: latency histogram.
- ``trident_api_in_flight_requests``: requests being answered now.
- ``trident_api_stage_seconds{stage}``: time in each stage of a search or embed request
  (``fetch``, ``decode``, ``preprocess``, ``embed``, ``lookup``, ``search``; query_api.timing),
  failed requests included: which step a slow request spent its time in.

Each application has its own registry, so several apps in one process (tests) do not collide.
"""

from __future__ import annotations

import time
from typing import Any

from litestar.enums import ScopeType
from litestar.exceptions import HTTPException
from litestar.middleware import ASGIMiddleware
from litestar.types import ASGIApp, Message, Receive, Scope, Send
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from query_api.timing import StageTimings

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# Stages take from ~1 ms (decode) to tens of ms (embed): finer at the low end.
_STAGE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 5.0)


class ApiMetrics:
    """The API's series in their own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "trident_api_requests",
            "Requests answered, by route template, method and status.",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "trident_api_request_seconds",
            "Time to answer a request, by route template.",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "trident_api_in_flight_requests",
            "Requests being answered now.",
            registry=self.registry,
        )
        self.stages = Histogram(
            "trident_api_stage_seconds",
            "Time in one stage of a search or embed request, by stage.",
            ["stage"],
            buckets=_STAGE_BUCKETS,
            registry=self.registry,
        )

    def observe_stages(self, timings: StageTimings) -> None:
        """Record each stage one request ran."""
        for stage, seconds in timings.stages:
            self.stages.labels(stage).observe(seconds)

    def exposition(self) -> bytes:
        """The Prometheus text format of every series."""
        return bytes(generate_latest(self.registry))


class MetricsMiddleware(ASGIMiddleware):
    """Counts and times every request reaching a route (the outermost route middleware)."""

    scopes = (ScopeType.HTTP,)

    def __init__(self, metrics: ApiMetrics) -> None:
        self._metrics = metrics

    async def handle(self, scope: Scope, receive: Receive, send: Send, next_app: ASGIApp) -> None:
        route = str(scope.get("path_template") or "unmatched")
        status = 500

        async def record_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        self._metrics.in_flight.inc()
        started = time.perf_counter()
        try:
            await next_app(scope, receive, record_status)
        except Exception as exc:
            # Raised by an inner middleware (auth, rate limit); the app's handler answers it.
            status = _status_of(exc)
            raise
        finally:
            self._metrics.in_flight.dec()
            self._metrics.latency.labels(route).observe(time.perf_counter() - started)
            self._metrics.requests.labels(route, str(scope.get("method", "")), str(status)).inc()


def _status_of(exc: Any) -> int:
    return exc.status_code if isinstance(exc, HTTPException) else 500
