"""Publish image-ingest events to Kafka: a synchronous and an asyncio publisher.

Both validate every event against :class:`~schemas.EventLimits` before sending (an event over a
limit raises :class:`~schemas.EventLimitError` and nothing is sent), key it by its id (so every
version of one image goes to the same partition and is consumed in order), write through an
idempotent producer with ``acks=all`` (``engine.kafka.producer_config``), and report each
event's delivery: a :class:`Delivery` with the partition and offset, or the error. Kafka's own
errors are translated (:func:`delivery_error`): a message larger than the broker accepts is an
:class:`EventTooLargeError` (permanent), a broker that does not answer is a
:class:`~engine.errors.BrokerUnavailableError` (retriable), and every other refusal carries a
:class:`~engine.errors.Reason` of its librdkafka error family.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import mimetypes
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Message, Producer

from engine.errors import (
    BrokerUnavailableError,
    ConfigurationError,
    EventTooLargeError,
    PermanentError,
    Reason,
    TridentError,
)
from engine.kafka import producer_config
from engine.settings import KafkaSettings
from schemas import (
    DEFAULT_EVENT_LIMITS,
    DeleteEvent,
    EventLimitError,
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

# librdkafka gives up on these only after message.timeout.ms (or never sent the message: purged,
# client closing); retrying later can succeed.
_TRANSIENT_CODES = frozenset(
    {
        KafkaError._MSG_TIMED_OUT,
        KafkaError._TIMED_OUT,
        KafkaError._TIMED_OUT_QUEUE,
        KafkaError._TRANSPORT,
        KafkaError._ALL_BROKERS_DOWN,
        KafkaError._RESOLVE,
        KafkaError._WAIT_COORD,
        KafkaError._QUEUE_FULL,
        KafkaError._PURGE_QUEUE,
        KafkaError._PURGE_INFLIGHT,
        KafkaError._DESTROY,
        KafkaError.BROKER_NOT_AVAILABLE,
        KafkaError.LEADER_NOT_AVAILABLE,
        KafkaError.NOT_LEADER_FOR_PARTITION,
        KafkaError.REPLICA_NOT_AVAILABLE,
        KafkaError.NETWORK_EXCEPTION,
        KafkaError.KAFKA_STORAGE_ERROR,
        KafkaError.FENCED_LEADER_EPOCH,
        KafkaError.UNKNOWN_LEADER_EPOCH,
        KafkaError.NOT_ENOUGH_REPLICAS,
        KafkaError.NOT_ENOUGH_REPLICAS_AFTER_APPEND,
        KafkaError.REQUEST_TIMED_OUT,
        KafkaError.THROTTLING_QUOTA_EXCEEDED,
        KafkaError.CONCURRENT_TRANSACTIONS,
        KafkaError.COORDINATOR_NOT_AVAILABLE,
        KafkaError.NOT_COORDINATOR,
        KafkaError.COORDINATOR_LOAD_IN_PROGRESS,
    }
)
# Refusals no retry can turn into a write, by family (librdkafka's codes and the broker's).
_TOO_LARGE_CODES = frozenset(
    {KafkaError.MSG_SIZE_TOO_LARGE, KafkaError.RECORD_LIST_TOO_LARGE, KafkaError.INVALID_MSG_SIZE}
)
_UNKNOWN_TOPIC_CODES = frozenset(
    {
        KafkaError.UNKNOWN_TOPIC_OR_PART,
        KafkaError._UNKNOWN_TOPIC,
        KafkaError._UNKNOWN_PARTITION,
        KafkaError.TOPIC_EXCEPTION,
        KafkaError.UNKNOWN_TOPIC_ID,
        KafkaError.INCONSISTENT_TOPIC_ID,
    }
)
_NOT_AUTHORIZED_CODES = frozenset(
    {
        KafkaError.TOPIC_AUTHORIZATION_FAILED,
        KafkaError.CLUSTER_AUTHORIZATION_FAILED,
        KafkaError.TRANSACTIONAL_ID_AUTHORIZATION_FAILED,
        KafkaError.SASL_AUTHENTICATION_FAILED,
        KafkaError.UNSUPPORTED_SASL_MECHANISM,
        KafkaError.ILLEGAL_SASL_STATE,
        KafkaError._AUTHENTICATION,
        KafkaError._SSL,
    }
)
_INVALID_RECORD_CODES = frozenset(
    {
        KafkaError.INVALID_RECORD,
        KafkaError.INVALID_MSG,
        KafkaError._BAD_MSG,
        KafkaError._INVALID_DIFFERENT_RECORD,
        KafkaError.INVALID_TIMESTAMP,
        KafkaError.POLICY_VIOLATION,
    }
)
# The producer instance cannot go on (fenced, sequence lost): only a new one can publish.
_FATAL_CODES = frozenset(
    {
        KafkaError._FATAL,
        KafkaError._FENCED,
        KafkaError.PRODUCER_FENCED,
        KafkaError.INVALID_PRODUCER_EPOCH,
        KafkaError.OUT_OF_ORDER_SEQUENCE_NUMBER,
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


def delivery_error(
    error: KafkaError, size: int | None = None, *, topic: str | None = None
) -> TridentError:
    """Kafka's error for one message, in the engine's error tree; its reason is a
    :class:`~engine.errors.Reason` member of the error's family, never librdkafka's own name.

    Too large: :class:`EventTooLargeError`. Unknown topic, not authorized, or a fatal producer
    error: :class:`~engine.errors.ConfigurationError` (the deployment, not the event, is wrong).
    Broker unavailable or timed out: :class:`~engine.errors.BrokerUnavailableError`. An invalid
    record, or any other refusal: :class:`~engine.errors.PermanentError`.
    """
    code, text = error.code(), error.str()
    where = f"topic {topic!r}" if topic else "the topic"
    if code in _TOO_LARGE_CODES:
        sized = f" ({size} bytes)" if size is not None else ""
        return EventTooLargeError(
            f"the event{sized} is larger than the broker accepts ({error.name()}): publish "
            "the image as a path or URL reference, or shrink its metadata"
        )
    if code in _UNKNOWN_TOPIC_CODES:
        return ConfigurationError(
            f"Kafka has no {where} or partition ({text}): create it (trident-worker creates "
            "its topics when it starts) or publish to an existing one",
            reason=Reason.KAFKA_UNKNOWN_TOPIC,
        )
    if code in _NOT_AUTHORIZED_CODES:
        return ConfigurationError(
            f"Kafka refused to let this client write to {where} ({text}): grant it access or "
            "fix the credentials in kafka.extra",
            reason=Reason.KAFKA_NOT_AUTHORIZED,
        )
    if error.fatal() or code in _FATAL_CODES:
        return ConfigurationError(
            f"the Kafka producer cannot go on ({text}): publish again with a new publisher "
            "(restart the command or service)",
            reason=Reason.KAFKA_FATAL,
        )
    if error.retriable() or code in _TRANSIENT_CODES:
        return BrokerUnavailableError(f"Kafka did not acknowledge the event: {text}")
    if code in _INVALID_RECORD_CODES:
        return PermanentError(
            f"Kafka refused the event as invalid ({text}): check {where}'s settings "
            "(timestamps, policies)",
            reason=Reason.KAFKA_INVALID_RECORD,
        )
    return PermanentError(f"Kafka refused the event: {text}", reason=Reason.KAFKA_REFUSED)


OnDelivery = Callable[[Delivery], None]


class _Sender:
    """The producer both publishers share: produce, translate errors, report each delivery."""

    def __init__(self, settings: KafkaSettings, topic: str | None) -> None:
        self.topic = topic or settings.topic
        self.producer = Producer(producer_config(settings))

    def try_send(
        self,
        key: bytes | None,
        value: bytes | None,
        headers: Headers | None,
        done: OnDelivery,
        partition: int = -1,
    ) -> bool:
        """Queue one message (to ``partition``, -1: the partitioner's choice); False when the
        local queue is full (drain deliveries, retry)."""
        name = key.decode(errors="replace") if key is not None else ""

        def on_delivery(error: KafkaError | None, message: Message) -> None:
            if error is None:
                done(Delivery(name, self.topic, message.partition(), message.offset()))
            else:
                logger.debug("delivery of %r failed: %s", name, error)
                done(Delivery(name, self.topic, error=self._error(error, value)))

        try:
            self.producer.produce(
                self.topic,
                key=key,
                value=value,
                headers=headers,
                partition=partition,
                on_delivery=on_delivery,
            )
        except BufferError:
            return False
        except KafkaException as exc:
            # Refused locally (too large for message.max.bytes, unknown topic, ...).
            done(Delivery(name, self.topic, error=self._error(exc.args[0], value)))
        return True

    def send(
        self,
        key: bytes | None,
        value: bytes | None,
        headers: Headers | None,
        done: OnDelivery,
        partition: int = -1,
    ) -> None:
        """Queue one message, serving deliveries while the local queue is full (backpressure)."""
        while not self.try_send(key, value, headers, done, partition):
            self.producer.poll(0.5)
        self.producer.poll(0)

    def _error(self, error: KafkaError, value: bytes | None) -> TridentError:
        return delivery_error(error, len(value or b""), topic=self.topic)


class _Answers:
    """The deliveries of one call, whichever thread's poll serves them (several threads may
    publish through one producer: each call waits for, and reports, its own records only)."""

    def __init__(self, expected: int) -> None:
        self.report = DeliveryReport()
        self._expected = expected
        self._lock = threading.Lock()
        self._complete = threading.Event()
        if expected == 0:
            self._complete.set()

    def add(self, delivery: Delivery) -> None:
        with self._lock:
            self.report.add(delivery)
            if self.report.delivered + self.report.failed >= self._expected:
                self._complete.set()

    def wait(self, producer: Producer, timeout_s: float) -> int:
        """Serve deliveries until every one of this call's is in; the number still unanswered
        after ``timeout_s`` (0: all answered)."""
        deadline = time.monotonic() + timeout_s
        while not self._complete.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            # Short polls: another thread's poll may serve our deliveries meanwhile.
            producer.poll(min(0.1, remaining))
        with self._lock:
            return self._expected - self.report.delivered - self.report.failed


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
        partition: int = -1,
    ) -> None:
        """Queue an already-serialised message as it is, unvalidated (replays, tests), to
        ``partition`` (-1: the partitioner's choice, by key)."""

        def done(delivery: Delivery) -> None:
            with self._lock:
                self._report.add(delivery)
            if on_delivery is not None:
                on_delivery(delivery)

        self._sender.send(key, value, headers, done, partition)

    def publish_and_wait(
        self, events: Sequence[IngestEvent], *, timeout_s: float = 120.0
    ) -> DeliveryReport:
        """Publish ``events`` and wait for the brokers' answers to these events alone.

        Several threads may call this at once on one publisher: each call's report holds its own
        deliveries and failures, never another call's (they are not added to the running totals
        of :meth:`flush` either).

        Raises:
            EventLimitError: an event is over a limit (the message names its id); nothing of
                the call is sent.
            BrokerUnavailableError: some of these events were unanswered after ``timeout_s``
                (whether they are written is unknown).
        """
        self._check_limits(events)
        answers = _Answers(len(events))
        for event in events:
            self._sender.send(event.id.encode(), encode_event(event), None, answers.add)
        unanswered = answers.wait(self._sender.producer, timeout_s)
        if unanswered:
            raise BrokerUnavailableError(
                f"{unanswered} of {len(events)} events not acknowledged after {timeout_s:.0f}s"
            )
        return answers.report

    def _check_limits(self, events: Sequence[IngestEvent | DeleteEvent]) -> None:
        """Check every ingest event against the limits before anything of a call is sent.

        Raises:
            EventLimitError: the first event over a limit; the message names its id.
        """
        for event in events:
            if not isinstance(event, IngestEvent):
                continue
            try:
                self._limits.check(event)
            except EventLimitError as exc:
                raise EventLimitError(
                    f"event {event.id!r}: {exc}",
                    reason=exc.reason,
                    limit=exc.limit,
                    size=exc.size,
                    maximum=exc.maximum,
                ) from exc

    def publish_delete(self, event: DeleteEvent, *, on_delivery: OnDelivery | None = None) -> None:
        """Queue the tombstone of ``event`` (``schemas.deletes``): key the id, value null, the
        version and collection headers. Blocks only while the local queue is full."""
        self.publish_raw(event.key(), None, _tombstone_headers(event), on_delivery=on_delivery)

    def publish_each(
        self, events: Sequence[IngestEvent | DeleteEvent], *, timeout_s: float = 120.0
    ) -> list[Delivery]:
        """Publish ingest events and deletes, in this order, and wait for the brokers' answers to
        these alone: each one's :class:`Delivery` (partition and offset, or the error), in the
        order given. Like :meth:`publish_and_wait`, safe beside other threads' calls, and its
        deliveries are not added to the running totals of :meth:`flush`.

        Raises:
            EventLimitError: an ingest event is over a limit (the message names its id); nothing
                of the call is sent.
            BrokerUnavailableError: some of them were unanswered after ``timeout_s`` (whether
                they are written is unknown).
        """
        self._check_limits(events)
        answers = _Answers(len(events))
        found: list[Delivery | None] = [None] * len(events)
        for index, event in enumerate(events):

            def done(delivery: Delivery, index: int = index) -> None:
                found[index] = delivery  # before add: the call completes with every slot set
                answers.add(delivery)

            if isinstance(event, DeleteEvent):
                self._sender.send(event.key(), None, _tombstone_headers(event), done)
            else:
                self._sender.send(event.id.encode(), encode_event(event), None, done)
        unanswered = answers.wait(self._sender.producer, timeout_s)
        if unanswered:
            raise BrokerUnavailableError(
                f"{unanswered} of {len(events)} records not acknowledged after {timeout_s:.0f}s"
            )
        return [delivery for delivery in found if delivery is not None]

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

    async def publish_delete(self, event: DeleteEvent) -> Delivery:
        """Send the tombstone of ``event`` (see :meth:`EventPublisher.publish_delete`) and wait
        for its Delivery."""
        return await self.publish_raw(event.key(), None, _tombstone_headers(event))

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


def _tombstone_headers(event: DeleteEvent) -> Headers:
    return [*event.headers()]


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
