"""Re-publishing consumed records: to the dead-letter topic, or to the retry topic.

Dead letters keep the original key, value and headers byte for byte, so a replay publishes
exactly what the producer sent; the headers of ``schemas.dead_letter`` say why (Kafka Connect's
``__connect.errors.*`` names, so existing DLQ tooling understands them, plus ``trident.*``).
A tombstone (a delete) stays a tombstone: its null value is kept. One without a version header
gets one, from its original timestamp (``schemas.deletes``): its version came from that
timestamp, which neither the dead letter nor a replay of it would keep.

A re-queued record (its image host failed transiently) goes to the retry topic
(``kafka.retry_topic``), to the partition of the number it was read from, unchanged but for the
``trident.retry.attempts`` header: see :meth:`RecordPublisher.requeue` for why there, and why a
header on the record itself.

Every publish waits for the brokers' acknowledgement: only then may the consumer commit past
the original record.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from datetime import UTC, datetime

from confluent_kafka import TIMESTAMP_NOT_AVAILABLE, KafkaError, Message, Producer

from engine.errors import BrokerUnavailableError, Stage
from engine.kafka import producer_config
from engine.settings import KafkaSettings
from schemas.dead_letter import (
    DEAD_LETTER_HEADERS,
    HEADER_ATTEMPTS,
    HEADER_EXCEPTION_CLASS,
    HEADER_EXCEPTION_MESSAGE,
    HEADER_FIRST_FAILED,
    HEADER_MODEL,
    HEADER_OFFSET,
    HEADER_PARTITION,
    HEADER_REASON,
    HEADER_RETRY_ATTEMPTS,
    HEADER_STAGE,
    HEADER_TOPIC,
    HEADER_WORKER,
)
from schemas.deletes import HEADER_VERSION, timestamp_version

logger = logging.getLogger(__name__)

_Headers = list[tuple[str, str | bytes | None]]
# (topic, partition or None for the partitioner's choice, original record, headers)
_Record = tuple[str, int | None, Message, _Headers]


@dataclass(frozen=True)
class DeadLetter:
    """A consumed record that cannot be processed, and why."""

    message: Message
    stage: Stage
    reason: str
    error: BaseException
    attempts: int = 1
    first_failed_at: datetime | None = None


@dataclass(frozen=True)
class Requeue:
    """A consumed record to try again later, with the attempts it has used so far."""

    message: Message
    attempts: int


class RecordPublisher:
    """Publishes dead letters and re-queued records; returns once every one is acknowledged."""

    def __init__(self, settings: KafkaSettings, *, worker_id: str, model_version: str) -> None:
        topics = settings.topics()
        self._topic = topics.dead_letter
        self._retry_topic = topics.retry
        self._producer = Producer(producer_config(settings, **{"linger.ms": 0}))
        self._worker_id = worker_id
        self._model_version = model_version
        self._lock = threading.Lock()
        self._failures: list[str] = []

    def publish(self, letters: list[DeadLetter], *, timeout_s: float = 30.0) -> None:
        """Publish dead letters and block until every one is acknowledged.

        Raises:
            BrokerUnavailableError: a write failed or was not acknowledged in time; the caller
                must not commit those records' offsets.
        """
        records: list[_Record] = [
            (self._topic, None, letter.message, self._letter_headers(letter)) for letter in letters
        ]
        self._send(records, timeout_s, what=f"dead-letter topic {self._topic}")

    def requeue(self, requeues: list[Requeue], *, timeout_s: float = 30.0) -> None:
        """Append each record again, to the retry topic's partition of the number it was read
        from (of the ingest topic or of the retry topic itself).

        Not to the ingest topic: that one is compacted and is the log's last word for each id, and
        an older version appended after a newer one would become it (compaction keeps an id's
        last record). The retry topic has as many partitions as the ingest topic and the group's
        range assignment gives partition p of both to one member (``engine.kafka``), so the
        record is consumed by the worker that owns its id, the only writer of that id: the
        stale-version guard then keeps any newer version, whichever topic brought it. The attempt
        count rides in a header of the record itself, not in the worker's memory: it survives
        pause/rewind cycles, restarts and rebalances with no state to keep. The backoff is the
        time the partition takes to come round.

        Raises:
            BrokerUnavailableError: as :meth:`publish`.
        """
        records: list[_Record] = []
        for requeue in requeues:
            message = requeue.message
            headers = _kept_headers(message)
            headers.append((HEADER_RETRY_ATTEMPTS, str(requeue.attempts).encode()))
            records.append((self._retry_topic, message.partition(), message, headers))
        self._send(records, timeout_s, what=f"re-queue to {self._retry_topic}")

    def _send(
        self,
        records: list[_Record],
        timeout_s: float,
        *,
        what: str,
    ) -> None:
        if not records:
            return
        self._failures.clear()
        for topic, partition, message, headers in records:
            self._produce(topic, partition, message, headers)
        remaining = self._producer.flush(timeout_s)
        if remaining or self._failures:
            raise BrokerUnavailableError(
                f"{what}: {remaining} unacknowledged, "
                f"{len(self._failures)} failed ({'; '.join(self._failures[:3])})",
                stage=Stage.DEAD_LETTER,
            )

    def _letter_headers(self, letter: DeadLetter) -> _Headers:
        message = letter.message
        failed_at = (letter.first_failed_at or datetime.now(UTC)).isoformat()
        ours = {
            HEADER_TOPIC: message.topic() or "",
            HEADER_PARTITION: str(message.partition()),
            HEADER_OFFSET: str(message.offset()),
            HEADER_EXCEPTION_CLASS: _class_name(letter.error),
            HEADER_EXCEPTION_MESSAGE: str(letter.error)[:4000],
            HEADER_STAGE: letter.stage.value,
            HEADER_REASON: letter.reason,
            HEADER_ATTEMPTS: str(letter.attempts),
            HEADER_FIRST_FAILED: failed_at,
            HEADER_WORKER: self._worker_id,
            HEADER_MODEL: self._model_version,
        }
        kept = _kept_headers(message) + _pinned_version(message)
        return kept + [(key, value.encode()) for key, value in ours.items()]

    def _produce(
        self, topic: str, partition: int | None, message: Message, headers: _Headers
    ) -> None:
        while True:
            try:
                self._producer.produce(
                    topic,
                    key=message.key(),
                    value=message.value(),
                    headers=headers,
                    # -1: the partitioner's choice (librdkafka's RD_KAFKA_PARTITION_UA).
                    partition=-1 if partition is None else partition,
                    on_delivery=self._on_delivery,
                )
                return
            except BufferError:
                self._producer.poll(0.5)

    def _on_delivery(self, error: KafkaError | None, message: Message) -> None:
        if error is not None:
            with self._lock:
                self._failures.append(str(error))
            logger.warning("re-publish to %s failed: %s", message.topic(), error)

    def close(self, timeout_s: float = 10.0) -> None:
        self._producer.flush(timeout_s)


def _kept_headers(message: Message) -> _Headers:
    """The producer's own headers, without the bookkeeping we add (it is written afresh)."""
    received = message.headers() or []
    pairs = list(received.items()) if isinstance(received, dict) else received
    return [(key, value) for key, value in pairs if key not in DEAD_LETTER_HEADERS]


def _pinned_version(message: Message) -> _Headers:
    """For a tombstone without a version header, the version it was read with, as a header."""
    if message.value() is not None:
        return []
    if any(key == HEADER_VERSION for key, _ in _kept_headers(message)):
        return []
    kind, timestamp_ms = message.timestamp()
    if kind == TIMESTAMP_NOT_AVAILABLE or timestamp_ms <= 0:
        return []
    return [(HEADER_VERSION, str(timestamp_version(timestamp_ms)).encode())]


def _class_name(error: BaseException) -> str:
    return f"{type(error).__module__}.{type(error).__qualname__}"
