"""Publish image-ingest events to Kafka.

Events are keyed by id, so every version of one image goes to the same partition and is
consumed in order. Delivery is confirmed per event; :meth:`EventPublisher.flush` reports how
many the brokers acknowledged.
"""

from __future__ import annotations

import hashlib
import logging
import mimetypes
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from confluent_kafka import KafkaError, Message, Producer

from engine.errors import BrokerUnavailableError
from engine.kafka import producer_config
from engine.settings import KafkaSettings
from schemas import (
    IngestEvent,
    InlineImage,
    PathImage,
    UrlImage,
    encode_event,
    reference_from_string,
)

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff"})


@dataclass
class DeliveryReport:
    """What the brokers acknowledged."""

    delivered: int = 0
    failed: int = 0
    errors: list[str] = field(default_factory=list)


class EventPublisher:
    """Publishes ingest events to the ingest topic with idempotent, acknowledged writes."""

    def __init__(self, settings: KafkaSettings, *, topic: str | None = None) -> None:
        self._topic = topic or settings.topic
        self._producer = Producer(producer_config(settings))
        self._report = DeliveryReport()
        self._lock = threading.Lock()

    def publish(self, event: IngestEvent) -> None:
        """Queue one event (non-blocking unless the local queue is full)."""
        self.publish_raw(event.id.encode(), encode_event(event))

    def publish_raw(
        self,
        key: bytes | None,
        value: bytes | None,
        headers: list[tuple[str, str | bytes | None]] | None = None,
    ) -> None:
        """Queue an already-serialised message (used by replay and tests)."""
        while True:
            try:
                self._producer.produce(
                    self._topic,
                    key=key,
                    value=value,
                    headers=headers,
                    on_delivery=self._on_delivery,
                )
                break
            except BufferError:
                # Local queue full: let deliveries drain, which is the backpressure we want.
                self._producer.poll(0.5)
        self._producer.poll(0)

    def publish_many(
        self, events: Iterable[IngestEvent], *, timeout_s: float = 120.0
    ) -> DeliveryReport:
        """Publish every event and wait for the brokers' acknowledgements."""
        for event in events:
            self.publish(event)
        return self.flush(timeout_s)

    def flush(self, timeout_s: float = 120.0) -> DeliveryReport:
        """Wait until every queued event is acknowledged or failed; return the running totals.

        Raises:
            BrokerUnavailableError: events are still unacknowledged after ``timeout_s``.
        """
        remaining = self._producer.flush(timeout_s)
        if remaining:
            raise BrokerUnavailableError(
                f"{remaining} events not acknowledged after {timeout_s:.0f}s"
            )
        with self._lock:
            return DeliveryReport(
                self._report.delivered, self._report.failed, list(self._report.errors)
            )

    def _on_delivery(self, error: KafkaError | None, message: Message) -> None:
        with self._lock:
            if error is None:
                self._report.delivered += 1
            else:
                self._report.failed += 1
                self._report.errors.append(f"{message.key()!r}: {error}")
                logger.error("delivery failed for key %r: %s", message.key(), error)

    def close(self, timeout_s: float = 30.0) -> None:
        self._producer.flush(timeout_s)

    def __enter__(self) -> EventPublisher:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _stable_id(text: str) -> str:
    # Ids are bounded (Milvus primary key); long references are hashed instead of cut.
    return text if len(text) <= 256 else "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def event_for_reference(
    reference: str,
    *,
    inline: bool = False,
    collection: str | None = None,
    metadata: dict[str, Any] | None = None,
    event_id: str | None = None,
) -> IngestEvent:
    """Build an event for a path or an http(s) URL (``inline`` embeds a local file's bytes)."""
    meta = dict(metadata or {})
    ref = reference_from_string(reference)
    if isinstance(ref, UrlImage):
        meta.setdefault("filename", reference.rstrip("/").rsplit("/", 1)[-1])
        return IngestEvent(
            id=event_id or _stable_id(reference), image=ref, metadata=meta, collection=collection
        )
    path = Path(reference).resolve()
    meta.setdefault("filename", path.name)
    content_type = mimetypes.guess_type(path.name)[0]
    if content_type:
        meta.setdefault("content_type", content_type)
    image = InlineImage(data=path.read_bytes()) if inline else PathImage(path=str(path))
    return IngestEvent(
        id=event_id or _stable_id(str(path)), image=image, metadata=meta, collection=collection
    )


def events_from_folder(
    folder: Path,
    *,
    inline: bool = False,
    collection: str | None = None,
    metadata: dict[str, Any] | None = None,
    id_prefix: str = "",
) -> Iterator[IngestEvent]:
    """One event per image file below ``folder`` (recursively, sorted).

    Ids are the file's path relative to the folder (plus ``id_prefix``), so publishing the same
    folder again targets the same records. A file in a subfolder gets that subfolder as its
    ``category`` metadata.
    """
    root = folder.resolve()
    for path in sorted(root.rglob("*")):
        if not path.is_file() or path.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        relative = path.relative_to(root)
        meta = dict(metadata or {})
        if len(relative.parts) > 1:
            meta.setdefault("category", relative.parent.as_posix())
        yield event_for_reference(
            str(path),
            inline=inline,
            collection=collection,
            metadata=meta,
            event_id=_stable_id(id_prefix + relative.as_posix()),
        )
