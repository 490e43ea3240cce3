"""Publish image-ingest events to Kafka: a synchronous and an asyncio publisher.

Both validate every event against :class:`~schemas.EventLimits` before sending (an event over a
limit raises :class:`~schemas.EventLimitError` and nothing is sent), key it by its id (so every
version of one image goes to the same partition and is consumed in order), write through an
idempotent producer with ``acks=all`` (``engine.kafka.producer_config``), and report each
event's delivery: a :class:`Delivery` with the partition and offset, or the error. Kafka's own
errors are translated: a message larger than the broker accepts is an
:class:`EventTooLargeError` (permanent), a broker that does not answer is a
:class:`~engine.errors.BrokerUnavailableError` (retriable).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import mimetypes
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Message, Producer

from engine.errors import BrokerUnavailableError, EventTooLargeError, PermanentError, TridentError
from engine.kafka import producer_config
from engine.settings import KafkaSettings
from schemas import (
    DEFAULT_EVENT_LIMITS,
    EventLimits,
    IngestEvent,
    InlineImage,
    PathImage,
    UrlImage,
    encode_event,
    reference_from_string,
)

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff"})
Headers = list[tuple[str, str | bytes | None]]

# librdkafka gives up on these only after message.timeout.ms; retrying later can succeed.
_TRANSIENT_CODES = frozenset(
    {
        KafkaError._MSG_TIMED_OUT,
        KafkaError._TIMED_OUT,
        KafkaError._TRANSPORT,
        KafkaError._ALL_BROKERS_DOWN,
        KafkaError.NOT_ENOUGH_REPLICAS,
        KafkaError.NOT_ENOUGH_REPLICAS_AFTER_APPEND,
        KafkaError.REQUEST_TIMED_OUT,
    }
)


@dataclass(frozen=True, slots=True)
class Delivery:
    """What became of one published record: where it was written, or why not."""

    key: str
    topic: str
    partition: int | None = None
    offset: int | None = None
    error: TridentError | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class DeliveryReport:
    """Totals of a publisher's deliveries, and the failed ones."""

    delivered: int = 0
    failed: int = 0
    failures: list[Delivery] = field(default_factory=list)

    def add(self, delivery: Delivery) -> None:
        if delivery.ok:
            self.delivered += 1
        else:
            self.failed += 1
            self.failures.append(delivery)

    def copy(self) -> DeliveryReport:
        return DeliveryReport(self.delivered, self.failed, list(self.failures))


def delivery_error(error: KafkaError, size: int | None = None) -> TridentError:
    """Kafka's error for one message, in the engine's error tree."""
    if error.code() == KafkaError.MSG_SIZE_TOO_LARGE:
        sized = f" ({size} bytes)" if size is not None else ""
        return EventTooLargeError(
            f"the event{sized} is larger than the broker accepts (MSG_SIZE_TOO_LARGE): publish "
            "the image as a path or URL reference, or shrink its metadata"
        )
    if error.retriable() or error.code() in _TRANSIENT_CODES:
        return BrokerUnavailableError(f"Kafka did not acknowledge the event: {error.str()}")
    return PermanentError(f"Kafka refused the event: {error.str()}", reason=error.name().lower())


OnDelivery = Callable[[Delivery], None]


class _Sender:
    """The producer both publishers share: produce, translate errors, report each delivery."""

    def __init__(self, settings: KafkaSettings, topic: str | None) -> None:
        self.topic = topic or settings.topic
        self.producer = Producer(producer_config(settings))

    def try_send(
        self, key: bytes | None, value: bytes | None, headers: Headers | None, done: OnDelivery
    ) -> bool:
        """Queue one message; False when the local queue is full (drain deliveries, retry)."""
        name = key.decode(errors="replace") if key is not None else ""

        def on_delivery(error: KafkaError | None, message: Message) -> None:
            if error is None:
                done(Delivery(name, self.topic, message.partition(), message.offset()))
            else:
                logger.debug("delivery of %r failed: %s", name, error)
                done(Delivery(name, self.topic, error=delivery_error(error, len(value or b""))))

        try:
            self.producer.produce(
                self.topic, key=key, value=value, headers=headers, on_delivery=on_delivery
            )
        except BufferError:
            return False
        except KafkaException as exc:
            # Refused locally (too large for message.max.bytes, unknown topic, ...).
            done(Delivery(name, self.topic, error=delivery_error(exc.args[0], len(value or b""))))
        return True


class _Publisher:
    """What both publishers hold: the producer, its topic (default ``settings.topic``) and the
    limits every event is checked against (default ``settings.event_limits``)."""

    def __init__(
        self,
        settings: KafkaSettings,
        *,
        topic: str | None = None,
        limits: EventLimits | None = None,
    ) -> None:
        self._sender = _Sender(settings, topic)
        self._limits = limits if limits is not None else settings.event_limits

    @property
    def topic(self) -> str:
        return self._sender.topic


class EventPublisher(_Publisher):
    """Publishes ingest events synchronously; deliveries are reported while it polls and flushes.

    ``on_delivery`` callbacks run in the calling thread, inside :meth:`publish` (which polls) and
    :meth:`flush`.
    """

    def __init__(
        self,
        settings: KafkaSettings,
        *,
        topic: str | None = None,
        limits: EventLimits | None = None,
    ) -> None:
        super().__init__(settings, topic=topic, limits=limits)
        self._report = DeliveryReport()
        self._lock = threading.Lock()

    def publish(self, event: IngestEvent, *, on_delivery: OnDelivery | None = None) -> None:
        """Validate and queue one event (blocks only while the local queue is full).

        Raises:
            EventLimitError: the event is over one of the publisher's limits; nothing is sent.
        """
        self._limits.check(event)
        self.publish_raw(event.id.encode(), encode_event(event), on_delivery=on_delivery)

    def publish_raw(
        self,
        key: bytes | None,
        value: bytes | None,
        headers: Headers | None = None,
        *,
        on_delivery: OnDelivery | None = None,
    ) -> None:
        """Queue an already-serialised message as it is, unvalidated (replays, tests)."""

        def done(delivery: Delivery) -> None:
            with self._lock:
                self._report.add(delivery)
            if on_delivery is not None:
                on_delivery(delivery)

        while not self._sender.try_send(key, value, headers, done):
            # Local queue full: let deliveries drain, which is the backpressure we want.
            self._sender.producer.poll(0.5)
        self._sender.producer.poll(0)

    def publish_many(
        self, events: Iterable[IngestEvent], *, timeout_s: float = 120.0
    ) -> DeliveryReport:
        """Publish every event and wait for the brokers' answers.

        Raises:
            EventLimitError: an event is over a limit (the ones before it are sent).
            BrokerUnavailableError: events still unanswered after ``timeout_s``.
        """
        for event in events:
            self.publish(event)
        return self.flush(timeout_s)

    def flush(self, timeout_s: float = 120.0) -> DeliveryReport:
        """Wait until every queued event is delivered or failed; return the running totals.

        Raises:
            BrokerUnavailableError: events are still unanswered after ``timeout_s``.
        """
        remaining = self._sender.producer.flush(timeout_s)
        if remaining:
            raise BrokerUnavailableError(
                f"{remaining} events not acknowledged after {timeout_s:.0f}s"
            )
        with self._lock:
            return self._report.copy()

    def close(self, timeout_s: float = 30.0) -> None:
        self._sender.producer.flush(timeout_s)

    def __enter__(self) -> EventPublisher:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class AsyncEventPublisher(_Publisher):
    """Publishes ingest events from asyncio code: ``await publish(event)`` returns its Delivery.

    A background thread serves librdkafka's delivery callbacks and hands each result to the
    event loop, so awaiting never blocks the loop. Use it as ``async with``; publish
    concurrently with :meth:`publish_many` or ``asyncio.gather``.
    """

    def __init__(
        self,
        settings: KafkaSettings,
        *,
        topic: str | None = None,
        limits: EventLimits | None = None,
    ) -> None:
        super().__init__(settings, topic=topic, limits=limits)
        self._stop = threading.Event()
        self._poller = threading.Thread(target=self._poll, name="kafka-delivery", daemon=True)

    async def publish(self, event: IngestEvent) -> Delivery:
        """Validate, send and wait for the brokers' answer (the error is in the Delivery).

        Raises:
            EventLimitError: the event is over one of the publisher's limits; nothing is sent.
        """
        self._limits.check(event)
        return await self.publish_raw(event.id.encode(), encode_event(event))

    async def publish_raw(
        self, key: bytes | None, value: bytes | None, headers: Headers | None = None
    ) -> Delivery:
        """Send an already-serialised message as it is and wait for its Delivery."""
        return await (await self._queue(key, value, headers))

    async def publish_many(self, events: Iterable[IngestEvent]) -> DeliveryReport:
        """Send every event (in order), then wait for all their answers.

        Raises:
            EventLimitError: an event is over a limit (the ones before it are sent).
        """
        pending = []
        for event in events:
            self._limits.check(event)
            pending.append(await self._queue(event.id.encode(), encode_event(event), None))
        report = DeliveryReport()
        for delivery in await asyncio.gather(*pending):
            report.add(delivery)
        return report

    async def _queue(
        self, key: bytes | None, value: bytes | None, headers: Headers | None
    ) -> asyncio.Future[Delivery]:
        """Hand the message to librdkafka (waiting while its queue is full); resolve on answer."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Delivery] = loop.create_future()

        def done(delivery: Delivery) -> None:
            loop.call_soon_threadsafe(_resolve, future, delivery)

        while not self._sender.try_send(key, value, headers, done):
            await asyncio.sleep(0.05)  # the poller drains the queue meanwhile
        return future

    def _poll(self) -> None:
        while not self._stop.is_set():
            self._sender.producer.poll(0.1)

    async def __aenter__(self) -> AsyncEventPublisher:
        self._poller.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self, timeout_s: float = 30.0) -> None:
        """Wait for outstanding deliveries (up to ``timeout_s``), then stop the poller."""
        await asyncio.to_thread(self._sender.producer.flush, timeout_s)
        self._stop.set()
        if self._poller.is_alive():
            await asyncio.to_thread(self._poller.join)


def _resolve(future: asyncio.Future[Delivery], delivery: Delivery) -> None:
    if not future.done():
        future.set_result(delivery)


def stable_id(text: str, limits: EventLimits = DEFAULT_EVENT_LIMITS) -> str:
    """``text`` as an id, or its SHA-256 when it is over the id limit (hashed, not cut)."""
    if len(text.encode()) <= limits.id_max_bytes:
        return text
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def event_for_reference(
    reference: str,
    *,
    inline: bool = False,
    collection: str | None = None,
    metadata: dict[str, Any] | None = None,
    event_id: str | None = None,
    limits: EventLimits = DEFAULT_EVENT_LIMITS,
) -> IngestEvent:
    """Build an event for a path or an http(s) URL (``inline`` embeds a local file's bytes).

    Raises:
        EventLimitError: ``inline`` and the file is over ``limits.inline_image_max_bytes`` (it
            is not read).
        OSError: ``inline`` and the file cannot be read.
        pydantic.ValidationError: an invalid reference, id, collection or metadata.
    """
    meta = dict(metadata or {})
    ref = reference_from_string(reference)
    if isinstance(ref, UrlImage):
        meta.setdefault("filename", reference.rstrip("/").rsplit("/", 1)[-1])
        return IngestEvent(
            id=event_id or stable_id(reference, limits),
            image=ref,
            metadata=meta,
            collection=collection,
        )
    path = Path(reference).resolve()
    meta.setdefault("filename", path.name)
    content_type = mimetypes.guess_type(path.name)[0]
    if content_type:
        meta.setdefault("content_type", content_type)
    image: InlineImage | PathImage
    if inline:
        limits.check_inline_image(path.stat().st_size)
        image = InlineImage(data=path.read_bytes())
    else:
        image = PathImage(path=str(path))
    return IngestEvent(
        id=event_id or stable_id(str(path), limits),
        image=image,
        metadata=meta,
        collection=collection,
    )


def image_files(
    folder: Path, *, include: Sequence[str] = (), exclude: Sequence[str] = ()
) -> Iterator[Path]:
    """The files below ``folder`` (recursively, sorted) to publish.

    A file is taken when its path relative to ``folder`` matches one of the ``include`` glob
    patterns (when none is given: when it has an image suffix) and none of ``exclude``.
    """
    root = folder.resolve()
    for path in sorted(root.rglob("*")):
        if not path.is_file():
            continue
        relative = path.relative_to(root).as_posix()
        if include:
            if not any(fnmatchcase(relative, pattern) for pattern in include):
                continue
        elif path.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        if any(fnmatchcase(relative, pattern) for pattern in exclude):
            continue
        yield path


def events_from_folder(
    folder: Path,
    *,
    inline: bool = False,
    collection: str | None = None,
    metadata: dict[str, Any] | None = None,
    id_prefix: str = "",
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    limits: EventLimits = DEFAULT_EVENT_LIMITS,
) -> Iterator[IngestEvent]:
    """One event per image file below ``folder`` (see :func:`image_files`).

    Ids are the file's path relative to the folder (plus ``id_prefix``), so publishing the same
    folder again targets the same records. A file in a subfolder gets that subfolder as its
    ``category`` metadata.
    """
    root = folder.resolve()
    for path in image_files(root, include=include, exclude=exclude):
        yield event_for_reference(
            str(path),
            inline=inline,
            collection=collection,
            metadata=folder_metadata(path, root, metadata),
            event_id=stable_id(id_prefix + path.relative_to(root).as_posix(), limits),
            limits=limits,
        )


def folder_metadata(path: Path, root: Path, metadata: dict[str, Any] | None) -> dict[str, Any]:
    """``metadata`` plus the file's subfolder below ``root`` as its ``category``."""
    meta = dict(metadata or {})
    relative = path.relative_to(root)
    if len(relative.parts) > 1:
        meta.setdefault("category", relative.parent.as_posix())
    return meta
