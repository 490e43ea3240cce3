"""The pipelined worker's engine: the processor's three stages, each on a thread of its own.

Batches enter with :meth:`StagedPipeline.submit` (from the consumer loop) and leave, finished
or failed, through :meth:`StagedPipeline.finished` (to the consumer loop, which alone talks to
Kafka). In between, ``prepare`` -> ``embed`` -> ``store`` threads hand each batch on through
queues, so batch k+1 is prepared while k is embedded, and k is stored while k+1 is embedded.
Batches go through every stage in the order they were submitted (one thread per stage, FIFO
queues): the version guard relies on it.

Bounds: at most ``worker.pipeline_depth`` batches are in the pipeline at once (admitted and
not yet taken back), which bounds the memory held (records, images, model inputs).

A batch that fails at a stage (an outage, a bad configuration) skips the later stages and
comes back with its error. :meth:`StagedPipeline.cancel` sets a batch's ``cancelled`` flag: its
later stages and retries give up at once; a call already sent (an upsert) completes.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from worker.metrics import WorkerMetrics
from worker.pipeline import Batch

logger = logging.getLogger(__name__)


class Stages(Protocol):
    """The stages of ``worker.pipeline.BatchProcessor``."""

    def prepare(self, batch: Batch) -> None: ...
    def embed(self, batch: Batch) -> None: ...
    def store(self, batch: Batch) -> None: ...
    def release(self, batch: Batch) -> None: ...


@dataclass(eq=False)
class Flight:
    """A batch in the pipeline, and what became of it."""

    batch: Batch
    admitted_at: float = field(default_factory=time.monotonic)
    error: BaseException | None = None

    @property
    def cancelled(self) -> bool:
        return self.batch.cancelled.is_set()


class StagedPipeline:
    """Runs batches through prepare, embed and store on three threads (module docstring)."""

    def __init__(self, stages: Stages, *, depth: int, metrics: WorkerMetrics) -> None:
        self._stages = stages
        self._depth = depth
        self._metrics = metrics
        self._lock = threading.Lock()
        self._in_flight: list[Flight] = []
        self._finished: queue.Queue[Flight] = queue.Queue()
        # At most ``depth`` batches are admitted, so no queue ever holds more than that.
        self._to_embed: queue.Queue[Flight | None] = queue.Queue(maxsize=depth)
        self._to_store: queue.Queue[Flight | None] = queue.Queue(maxsize=depth)
        self._to_prepare: queue.Queue[Flight | None] = queue.Queue()
        self._threads = [
            threading.Thread(
                target=self._run,
                args=(name, work, inbox, outbox),
                name=f"stage-{name}",
                daemon=True,
            )
            for name, work, inbox, outbox in (
                ("prepare", stages.prepare, self._to_prepare, self._to_embed),
                ("embed", stages.embed, self._to_embed, self._to_store),
                ("store", stages.store, self._to_store, None),
            )
        ]
        self._started = False

    # The consumer loop's side ---------------------------------------------------------------

    def start(self) -> None:
        if not self._started:
            self._started = True
            for thread in self._threads:
                thread.start()

    @property
    def busy(self) -> bool:
        """Batches are in the pipeline (or finished and not yet taken back)."""
        with self._lock:
            return bool(self._in_flight)

    def has_room(self) -> bool:
        with self._lock:
            return len(self._in_flight) < self._depth

    def submit(self, batch: Batch) -> None:
        """Admit a batch; call only when :meth:`has_room` (the loop never blocks on this)."""
        flight = Flight(batch)
        with self._lock:
            self._in_flight.append(flight)
            self._gauge_locked()
        self._to_prepare.put_nowait(flight)

    def finished(self, timeout: float) -> list[Flight]:
        """Batches that left the pipeline, waiting up to ``timeout`` seconds for the first."""
        done: list[Flight] = []
        try:
            first = self._finished.get(timeout=timeout) if timeout > 0 else None
            done.append(first or self._finished.get_nowait())
            while True:
                done.append(self._finished.get_nowait())
        except queue.Empty:
            pass
        if done:
            with self._lock:
                for flight in done:
                    self._in_flight.remove(flight)
                self._gauge_locked()
        return done

    def cancel_all(self) -> int:
        """Cancel every batch in the pipeline; return how many. They still come back through
        :meth:`finished` (to be ignored) once their current step returns."""
        with self._lock:
            flights = list(self._in_flight)
        for flight in flights:
            flight.batch.cancelled.set()
        return len(flights)

    def close(self, timeout_s: float = 2.0) -> None:
        """Cancel what is in flight and end the threads, each after its current step; a step
        still running after ``timeout_s`` (a call to a hung service) is left to its timeout
        (the threads are daemons: they never hold the process)."""
        self.cancel_all()
        if self._started:
            self._to_prepare.put(None)
            deadline = time.monotonic() + timeout_s
            for thread in self._threads:
                thread.join(timeout=max(0.0, deadline - time.monotonic()))
                if thread.is_alive():
                    logger.info("%s still busy at close; left to end on its own", thread.name)

    # The stage threads ----------------------------------------------------------------------

    def _run(
        self,
        name: str,
        work: Callable[[Batch], None],
        inbox: queue.Queue[Flight | None],
        outbox: queue.Queue[Flight | None] | None,
    ) -> None:
        input_wait = self._metrics.pipeline_input_wait.labels(name)
        output_wait = self._metrics.pipeline_output_wait.labels(name)
        while True:
            waiting_since = time.monotonic()
            flight = inbox.get()
            if flight is None:
                if outbox is not None:
                    outbox.put(None)
                return
            # Idle time only counts once the batch existed: before, there was nothing to do.
            input_wait.inc(max(0.0, time.monotonic() - max(waiting_since, flight.admitted_at)))
            if flight.error is None and not flight.cancelled:
                try:
                    work(flight.batch)
                except BaseException as exc:  # handed to the loop, which decides what it means
                    flight.error = exc
            if outbox is None or flight.error is not None or flight.cancelled:
                self._leave(flight)
                continue
            blocked_since = time.monotonic()
            outbox.put(flight)
            output_wait.inc(time.monotonic() - blocked_since)

    def _leave(self, flight: Flight) -> None:
        self._stages.release(flight.batch)
        self._finished.put(flight)

    def _gauge_locked(self) -> None:
        self._metrics.batches_in_flight.set(len(self._in_flight))
        self._metrics.in_flight.set(sum(len(f.batch.items) for f in self._in_flight))
