"""Dead-letter publishing: failed records, unchanged, plus headers saying why.

The original key, value and headers are kept byte for byte so a replay publishes exactly what
the producer sent. Headers follow Kafka Connect's ``__connect.errors.*`` names (so existing DLQ
tooling understands them) plus ``trident.*`` ones for our own stage/attempt bookkeeping.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from datetime import UTC, datetime

from confluent_kafka import KafkaError, Message, Producer

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
    HEADER_STAGE,
    HEADER_TOPIC,
    HEADER_WORKER,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeadLetter:
    """A consumed record that cannot be processed, and why."""

    message: Message
    stage: Stage
    reason: str
    error: BaseException
    attempts: int = 1
    first_failed_at: datetime | None = None


class DeadLetterPublisher:
    """Writes dead letters and waits for the brokers' acknowledgement before returning."""

    def __init__(self, settings: KafkaSettings, *, worker_id: str, model_version: str) -> None:
        self._topic = settings.dead_letter_topic
        self._producer = Producer(producer_config(settings, **{"linger.ms": 0}))
        self._worker_id = worker_id
        self._model_version = model_version
        self._lock = threading.Lock()
        self._failures: list[str] = []

    def publish(self, letters: list[DeadLetter], *, timeout_s: float = 30.0) -> None:
        """Publish all letters and block until every one is acknowledged.

        Raises:
            BrokerUnavailableError: a write failed or was not acknowledged in time; the caller
                must not commit those records' offsets.
        """
        if not letters:
            return
        self._failures.clear()
        for letter in letters:
            self._produce(letter)
        remaining = self._producer.flush(timeout_s)
        if remaining or self._failures:
            raise BrokerUnavailableError(
                f"dead-letter topic {self._topic}: {remaining} unacknowledged, "
                f"{len(self._failures)} failed ({'; '.join(self._failures[:3])})",
                stage=Stage.DEAD_LETTER,
            )

    def _produce(self, letter: DeadLetter) -> None:
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
        received = message.headers() or []
        pairs = list(received.items()) if isinstance(received, dict) else received
        headers = [(key, value) for key, value in pairs if key not in DEAD_LETTER_HEADERS]
        headers += [(key, value.encode()) for key, value in ours.items()]
        while True:
            try:
                self._producer.produce(
                    self._topic,
                    key=message.key(),
                    value=message.value(),
                    headers=headers,
                    on_delivery=self._on_delivery,
                )
                return
            except BufferError:
                self._producer.poll(0.5)

    def _on_delivery(self, error: KafkaError | None, message: Message) -> None:
        if error is not None:
            with self._lock:
                self._failures.append(str(error))
            logger.warning("dead-letter write failed: %s", error)

    def close(self, timeout_s: float = 10.0) -> None:
        self._producer.flush(timeout_s)


def _class_name(error: BaseException) -> str:
    return f"{type(error).__module__}.{type(error).__qualname__}"
