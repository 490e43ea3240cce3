"""Health probes of the services (Triton, Milvus, Kafka), run at once under one deadline.

A probe is a callable that returns when its service is up and raises when it is down (the
message says why). :meth:`Prober.probe_all` runs a set of them concurrently and answers within
its deadline whatever they do: a probe still running then is reported down ("no answer within
..."). So a hung service, one that accepts connections and never answers, is "down" within the
bound instead of holding the caller.

Every probe also has a deadline of its own (``PROBE_TIMEOUT_S``, below the bound) so that its
thread ends soon after; and a :class:`Prober` runs at most one probe per name at a time: asked
again while the previous one still runs, it waits for that one (within the new deadline) instead
of starting another, so a service that hangs never piles up threads.

The probes of each service live here, one per service, used by the query API (``/health``,
``/readyz``), the worker's readiness and the earlier pipeline's ``health_check`` and
``jax-embedding health`` alike.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, wait
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from engine.errors import BrokerUnavailableError
from engine.kafka import broker_reachable
from engine.settings import KafkaSettings

if TYPE_CHECKING:
    from engine.inference import TritonEmbedder
    from engine.store import VectorStore

logger = logging.getLogger(__name__)

# The bound: a health or readiness answer comes within this many seconds, whatever the services
# do (docs/OPERATIONS.md, "Health"). Below the probes' timeouts in compose and Kubernetes (4-5 s).
HEALTH_DEADLINE_S = 3.0
# Each probe's own deadline, a little below the bound so that it can still say why.
PROBE_TIMEOUT_S = 2.5

Probe = Callable[[], object]


@dataclass(frozen=True)
class ProbeResult:
    """One service's state: ``up``, or ``down`` with why."""

    up: bool
    detail: str = ""

    @property
    def state(self) -> Literal["up", "down"]:
        return "up" if self.up else "down"


class Prober:
    """Runs named probes concurrently under one deadline, at most one in flight per name.

    Thread-safe. Each name has a daemon thread of its own, started on first use and kept (a
    thread's gevent hub and clients then live as long as the prober); :meth:`close` ends them.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._runners: dict[str, _Runner] = {}
        self._closed = False

    def probe_all(self, probes: Mapping[str, Probe], deadline_s: float) -> dict[str, ProbeResult]:
        """Each probe's result, within ``deadline_s`` seconds (never later); never raises.

        A probe that returned is up; one that raised is down with its message; one still running
        at the deadline is down, "no answer within ``deadline_s`` s".
        """
        deadline = time.monotonic() + deadline_s
        running = {name: self._runner(name).submit(probe) for name, probe in probes.items()}
        wait(running.values(), timeout=max(0.0, deadline - time.monotonic()))
        return {name: _result(future, deadline_s) for name, future in running.items()}

    def _runner(self, name: str) -> _Runner:
        with self._lock:
            if self._closed:
                raise RuntimeError("the prober is closed")
            runner = self._runners.get(name)
            if runner is None:
                runner = self._runners[name] = _Runner(name)
            return runner

    def close(self) -> None:
        """Stop the probe threads (a probe still running finishes on its own); never raises."""
        with self._lock:
            runners, self._runners, self._closed = list(self._runners.values()), {}, True
        for runner in runners:
            runner.stop()


def probe_all(probes: Mapping[str, Probe], deadline_s: float) -> dict[str, ProbeResult]:
    """:meth:`Prober.probe_all` on a prober of its own, for a one-off check (a command)."""
    prober = Prober()
    try:
        return prober.probe_all(probes, deadline_s)
    finally:
        prober.close()


class _Runner:
    """One name's probe thread: runs one probe at a time; a probe asked for while one is still
    running shares that one's result."""

    def __init__(self, name: str) -> None:
        self._jobs: queue.SimpleQueue[tuple[Probe, Future[None]] | None] = queue.SimpleQueue()
        self._current: Future[None] | None = None
        self._lock = threading.Lock()
        # A daemon: a probe stuck in a third-party call must never keep the process alive.
        self._thread = threading.Thread(target=self._run, name=f"probe-{name}", daemon=True)
        self._thread.start()

    def submit(self, probe: Probe) -> Future[None]:
        with self._lock:
            if self._current is not None and not self._current.done():
                return self._current
            future: Future[None] = Future()
            self._current = future
        self._jobs.put((probe, future))
        return future

    def stop(self) -> None:
        self._jobs.put(None)

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            probe, future = job
            if not future.set_running_or_notify_cancel():
                continue
            try:
                probe()
            except BaseException as exc:  # a probe's every failure means "down"
                future.set_exception(exc)
            else:
                future.set_result(None)


def _result(future: Future[None], deadline_s: float) -> ProbeResult:
    if not future.done():
        return ProbeResult(up=False, detail=f"no answer within {deadline_s:g} s")
    error = future.exception()
    if error is None:
        return ProbeResult(up=True)
    return ProbeResult(up=False, detail=str(error) or type(error).__name__)


# The probes, one per service ------------------------------------------------------------------


def triton_probe(embedder: TritonEmbedder, timeout_s: float = PROBE_TIMEOUT_S) -> Probe:
    """Up when Triton serves the model ready (:meth:`TritonEmbedder.check_ready`)."""

    def probe() -> None:
        embedder.check_ready(timeout_s)

    return probe


def milvus_probe(store: VectorStore, timeout_s: float = PROBE_TIMEOUT_S) -> Probe:
    """Up when Milvus answers (:meth:`VectorStore.ping`)."""

    def probe() -> None:
        store.ping(timeout_s)

    return probe


def kafka_probe(settings: KafkaSettings, timeout_s: float = PROBE_TIMEOUT_S) -> Probe:
    """Up when the Kafka cluster answers a metadata request."""

    def probe() -> None:
        if not broker_reachable(settings, timeout_s=timeout_s):
            raise BrokerUnavailableError(
                f"Kafka {settings.bootstrap_servers} did not answer within {timeout_s:g} s"
            )

    return probe
