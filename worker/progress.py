"""How far a consumer group is through its topics: a rebuild's progress (``trident-reembed``).

A group's position in a partition is its committed offset (the start of the partition when it
has committed none). Over every partition of the topics it reads (the ingest and retry topics):

- ``total``: records between each partition's start and end (``high - low``);
- ``done``: those before the group's position; ``lag``: those after it (``total - done``);
- ``rate``: records done per second, ``eta_s``: ``lag / rate``.

Offsets, not records: the ingest topic is compacted, so a partition's offsets have gaps and
``done`` counts offsets passed, not events written (both reach ``total`` together).

:class:`ProgressReporter` keeps the ``trident_reembed_*`` gauges of a rebuild worker current.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from confluent_kafka import Consumer, KafkaException, TopicPartition

from engine.errors import BrokerUnavailableError
from engine.kafka import consumer_config
from engine.settings import KafkaSettings
from worker.metrics import RebuildMetrics

logger = logging.getLogger(__name__)

# The window over which the gauges' rate is measured.
RATE_WINDOW_S = 60.0


@dataclass(frozen=True)
class PartitionOffsets:
    """One partition's start and end, and the group's committed offset there (None: none)."""

    topic: str
    partition: int
    low: int
    high: int
    committed: int | None


@dataclass(frozen=True)
class Progress:
    """A group's progress over its partitions (module docstring)."""

    done: int
    total: int

    @property
    def lag(self) -> int:
        return self.total - self.done

    @classmethod
    def of(cls, offsets: Sequence[PartitionOffsets]) -> Progress:
        done = total = 0
        for part in offsets:
            position = part.low if part.committed is None else part.committed
            position = min(max(position, part.low), part.high)
            done += position - part.low
            total += part.high - part.low
        return cls(done=done, total=total)


def rate_and_eta(done_then: int, done_now: int, seconds: float, lag: int) -> tuple[float, float]:
    """Records per second over ``seconds``, and the seconds left at that rate (``inf`` when
    nothing moved and something is left; 0 when nothing is left)."""
    rate = max(0, done_now - done_then) / seconds if seconds > 0 else 0.0
    if lag <= 0:
        return rate, 0.0
    return rate, (lag / rate if rate > 0 else float("inf"))


def read_offsets(
    settings: KafkaSettings, group: str, topics: Sequence[str], *, timeout_s: float
) -> list[PartitionOffsets]:
    """Every partition of ``topics`` with the ``group``'s committed offset there (the group is
    never joined: nothing is consumed or committed). A topic that does not exist has none.

    Raises:
        BrokerUnavailableError: Kafka did not answer within ``timeout_s``.
    """
    consumer = Consumer(consumer_config(settings, **{"group.id": group}))
    try:
        metadata = consumer.list_topics(timeout=timeout_s)
        parts = [
            TopicPartition(topic, partition)
            for topic in topics
            if topic in metadata.topics and metadata.topics[topic].error is None
            for partition in sorted(metadata.topics[topic].partitions)
        ]
        committed = {
            (tp.topic, tp.partition): tp.offset
            for tp in (consumer.committed(parts, timeout=timeout_s) if parts else [])
        }
        found = []
        for tp in parts:
            low, high = consumer.get_watermark_offsets(tp, timeout=timeout_s)
            offset = committed.get((tp.topic, tp.partition), -1)
            found.append(
                PartitionOffsets(tp.topic, tp.partition, low, high, offset if offset >= 0 else None)
            )
        return found
    except KafkaException as exc:
        raise BrokerUnavailableError(f"reading the offsets of group {group}: {exc}") from exc
    finally:
        consumer.close()


class ProgressReporter:
    """A thread that sets a rebuild's gauges every ``interval_s`` from its group's offsets."""

    def __init__(
        self,
        metrics: RebuildMetrics,
        *,
        collection: str,
        read: Callable[[], list[PartitionOffsets]],
        interval_s: float,
    ) -> None:
        self._metrics = metrics
        self._collection = collection
        self._read = read
        self._interval_s = interval_s
        self._samples: deque[tuple[float, int]] = deque()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="reembed-progress", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self._interval_s + 5)

    def sample(self) -> Progress:
        """Read the offsets once and set the gauges.

        Raises:
            BrokerUnavailableError: Kafka did not answer.
        """
        progress = Progress.of(self._read())
        now = time.monotonic()
        self._samples.append((now, progress.done))
        while self._samples and now - self._samples[0][0] > RATE_WINDOW_S:
            self._samples.popleft()
        then, done_then = self._samples[0]
        rate, eta = rate_and_eta(done_then, progress.done, now - then, progress.lag)
        self._metrics.set(self._collection, progress.done, progress.total, rate, eta)
        return progress

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.sample()
            except BrokerUnavailableError as exc:
                logger.debug("rebuild progress not read: %s", exc)
            self._stop.wait(self._interval_s)
