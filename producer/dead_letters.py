"""Reading and replaying the dead-letter topic, never changing it or anyone's offsets.

:class:`DeadLetterReader` reads a snapshot of the topic (from its beginning, a time or an
offset, up to the end it had when the read began) by manual partition assignment: it joins no
consumer group and commits nothing, so the workers' offsets cannot move, and it only reads.

A replay republishes chosen dead letters to the retry topic (``kafka.retry_topic``, which the
workers consume with the ingest topic), never to the ingest topic: that one is compacted and its
last record of an id must be the newest version published, which a replayed older copy would
displace. Each record keeps its key and value (so the event keeps its id and version, and the
worker's stale-version guard still applies: a replay older than what is stored is skipped) and
the producer's original headers, without the dead-letter headers (a new failure is described
afresh) and with :data:`~schemas.dead_letter.HEADER_REPLAY_COUNT` one higher. It goes to the
partition number it was dead-lettered from, so the worker owning its id's partition consumes it
(``engine.kafka.consumer_config``). A record whose
count has reached the cap is refused, so a record that can never succeed cannot loop. When a
record failed again after a replay, the topic holds several copies of it (same key and value):
:func:`plan_replay` keeps only the latest, whose count is the true one.
"""

from __future__ import annotations

import hashlib
import logging
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from fnmatch import fnmatchcase
from typing import Any

import orjson
from confluent_kafka import (
    TIMESTAMP_NOT_AVAILABLE,
    Consumer,
    KafkaException,
    Message,
    TopicPartition,
)

from engine.errors import BrokerUnavailableError, ConfigurationError
from engine.kafka import consumer_config
from engine.settings import KafkaSettings
from producer.publisher import Delivery, DeliveryReport, EventPublisher, Headers
from schemas.dead_letter import (
    DEAD_LETTER_HEADERS,
    HEADER_ATTEMPTS,
    HEADER_EXCEPTION_CLASS,
    HEADER_EXCEPTION_MESSAGE,
    HEADER_FIRST_FAILED,
    HEADER_OFFSET,
    HEADER_PARTITION,
    HEADER_REASON,
    HEADER_REPLAY_COUNT,
    HEADER_STAGE,
    HEADER_TOPIC,
)

logger = logging.getLogger(__name__)

DEFAULT_MAX_REPLAYS = 3


def record_time(message: Message) -> datetime | None:
    """A Kafka record's timestamp (None when the broker gives none)."""
    kind, millis = message.timestamp()
    return None if kind == TIMESTAMP_NOT_AVAILABLE else datetime.fromtimestamp(millis / 1000, UTC)


@dataclass(frozen=True)
class DeadLetterRecord:
    """One record of the dead-letter topic: the original record plus why it failed."""

    partition: int
    offset: int
    dead_lettered_at: datetime | None
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes | None], ...] = ()

    @classmethod
    def from_message(cls, message: Message) -> DeadLetterRecord:
        return cls(
            partition=message.partition() or 0,
            offset=message.offset() or 0,
            dead_lettered_at=record_time(message),
            key=message.key(),
            value=message.value(),
            headers=_byte_headers(message),
        )

    def header(self, name: str) -> str | None:
        """The last value of header ``name``, decoded (None when absent)."""
        for key, value in reversed(self.headers):
            if key == name:
                return None if value is None else value.decode(errors="replace")
        return None

    @property
    def id(self) -> str:
        """The event id: the record's key, else the id in its value, else ``""``."""
        if self.key:
            return self.key.decode(errors="replace")
        event = self.event()
        event_id = event.get("id") if isinstance(event, dict) else None
        return event_id if isinstance(event_id, str) else ""

    @property
    def stage(self) -> str:
        return self.header(HEADER_STAGE) or "unknown"

    @property
    def reason(self) -> str:
        return self.header(HEADER_REASON) or "unknown"

    @property
    def source_topic(self) -> str:
        return self.header(HEADER_TOPIC) or "unknown"

    @property
    def source_partition(self) -> int | None:
        """The partition the record was read from before it was dead-lettered (None: unknown)."""
        return _int(self.header(HEADER_PARTITION))

    @property
    def replay_count(self) -> int:
        """How many times this record was replayed before it landed here (0: never)."""
        return _int(self.header(HEADER_REPLAY_COUNT)) or 0

    def event(self) -> Any:
        """The original value parsed as JSON, or None when it is not JSON."""
        if not self.value:
            return None
        try:
            return orjson.loads(self.value)
        except orjson.JSONDecodeError:
            return None

    def to_json(self) -> dict[str, Any]:
        """The record as one JSON object, for scripts (``trident-dlq inspect --json``)."""
        event = self.event()
        result: dict[str, Any] = {
            "id": self.id,
            "partition": self.partition,
            "offset": self.offset,
            "dead_lettered_at": self.dead_lettered_at.isoformat()
            if self.dead_lettered_at
            else None,
            "stage": self.stage,
            "reason": self.reason,
            "attempts": _int(self.header(HEADER_ATTEMPTS)),
            "first_failed_at": self.header(HEADER_FIRST_FAILED),
            "replay_count": self.replay_count,
            "source": {
                "topic": self.header(HEADER_TOPIC),
                "partition": _int(self.header(HEADER_PARTITION)),
                "offset": _int(self.header(HEADER_OFFSET)),
            },
            "error": {
                "class": self.header(HEADER_EXCEPTION_CLASS),
                "message": self.header(HEADER_EXCEPTION_MESSAGE),
            },
            "event": event,
        }
        if event is None and self.value:
            result["value"] = self.value.decode(errors="replace")
        return result


def _byte_headers(message: Message) -> tuple[tuple[str, bytes | None], ...]:
    received = message.headers() or []
    pairs = list(received.items()) if isinstance(received, dict) else received
    return tuple((k, v.encode() if isinstance(v, str) else v) for k, v in pairs)


def _int(text: str | None) -> int | None:
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


@dataclass(frozen=True)
class DeadLetterFilter:
    """Which dead letters to take; every criterion given must hold (empty: any)."""

    stages: frozenset[str] = frozenset()
    reasons: frozenset[str] = frozenset()
    ids: frozenset[str] = frozenset()
    id_globs: tuple[str, ...] = ()
    since: datetime | None = None
    until: datetime | None = None
    partitions: frozenset[int] = frozenset()
    from_offset: int | None = None
    to_offset: int | None = None

    def matches(self, record: DeadLetterRecord) -> bool:
        """True when ``record`` meets every criterion (times are when it was dead-lettered)."""
        at = record.dead_lettered_at
        return (
            (not self.stages or record.stage in self.stages)
            and (not self.reasons or record.reason in self.reasons)
            and self._id_matches(record.id)
            and (self.since is None or (at is not None and at >= self.since))
            and (self.until is None or (at is not None and at < self.until))
            and (not self.partitions or record.partition in self.partitions)
            and (self.from_offset is None or record.offset >= self.from_offset)
            and (self.to_offset is None or record.offset <= self.to_offset)
        )

    def _id_matches(self, record_id: str) -> bool:
        if not self.ids and not self.id_globs:
            return True
        return record_id in self.ids or any(fnmatchcase(record_id, g) for g in self.id_globs)


class DeadLetterReader:
    """Reads the dead-letter topic without a consumer group: no commits, no writes."""

    def __init__(
        self, settings: KafkaSettings, *, topic: str | None = None, timeout_s: float = 30.0
    ) -> None:
        self.topic = topic or settings.dead_letter_topic
        self._timeout_s = timeout_s
        # librdkafka wants a group id even for manual assignment; this one never joins or commits.
        self._consumer = Consumer(
            consumer_config(
                settings,
                **{
                    "group.id": f"trident-dlq-reader-{uuid.uuid4().hex[:8]}",
                    "enable.auto.commit": False,
                    "enable.auto.offset.store": False,
                },
            )
        )

    def read(self, selection: DeadLetterFilter | None = None) -> Iterator[DeadLetterRecord]:
        """The records matching ``selection``, partition by partition, in offset order.

        Raises:
            ConfigurationError: the dead-letter topic does not exist.
            BrokerUnavailableError: Kafka did not answer within the reader's timeout.
        """
        selection = selection or DeadLetterFilter()
        for partition in self.partitions():
            if selection.partitions and partition not in selection.partitions:
                continue
            start, end = self._bounds(partition, selection)
            for record in self._read_partition(partition, start, end):
                if selection.matches(record):
                    yield record

    def partitions(self) -> list[int]:
        """The topic's partition numbers.

        Raises:
            ConfigurationError: the topic does not exist.
            BrokerUnavailableError: Kafka did not answer.
        """
        try:
            metadata = self._consumer.list_topics(self.topic, timeout=self._timeout_s)
        except KafkaException as exc:
            raise BrokerUnavailableError(f"Kafka: {exc}") from exc
        topic = metadata.topics.get(self.topic)
        if topic is None or topic.error is not None or not topic.partitions:
            raise ConfigurationError(f"dead-letter topic {self.topic!r} does not exist")
        return sorted(topic.partitions)

    def _bounds(self, partition: int, selection: DeadLetterFilter) -> tuple[int, int]:
        """[start, end) of the offsets to read: the snapshot's end, narrowed by the filter."""
        tp = TopicPartition(self.topic, partition)
        try:
            low, high = self._consumer.get_watermark_offsets(tp, timeout=self._timeout_s)
            start = low
            if selection.since is not None:
                tp.offset = int(selection.since.timestamp() * 1000)
                found = self._consumer.offsets_for_times([tp], timeout=self._timeout_s)[0]
                start = high if found.offset < 0 else max(start, found.offset)
        except KafkaException as exc:
            raise BrokerUnavailableError(f"Kafka: {exc}") from exc
        if selection.from_offset is not None:
            start = max(start, selection.from_offset)
        end = high if selection.to_offset is None else min(high, selection.to_offset + 1)
        return start, end

    def _read_partition(self, partition: int, start: int, end: int) -> Iterator[DeadLetterRecord]:
        if start >= end:
            return
        tp = TopicPartition(self.topic, partition, start)
        self._consumer.assign([tp])
        try:
            deadline = time.monotonic() + self._timeout_s
            while True:
                messages = self._consumer.consume(500, timeout=0.5)
                for message in messages:
                    if message.error() is None and (message.offset() or 0) < end:
                        yield DeadLetterRecord.from_message(message)
                if messages:
                    deadline = time.monotonic() + self._timeout_s
                # The position passes transaction markers too, which no message shows.
                position = self._consumer.position([TopicPartition(self.topic, partition)])[0]
                if position.offset >= end:
                    return
                if time.monotonic() > deadline:
                    raise BrokerUnavailableError(
                        f"{self.topic}[{partition}]: no records for {self._timeout_s:.0f}s "
                        f"at offset {position.offset} (reading up to {end})"
                    )
        finally:
            self._consumer.unassign()

    def close(self) -> None:
        self._consumer.close()

    def __enter__(self) -> DeadLetterReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


@dataclass
class ReplayPlan:
    """What a replay will do with the chosen records."""

    replay: list[DeadLetterRecord] = field(default_factory=list)
    refused: list[tuple[DeadLetterRecord, str]] = field(default_factory=list)
    # Earlier copies of a record that failed again after a replay (the latest copy counts).
    duplicates: list[DeadLetterRecord] = field(default_factory=list)


def plan_replay(records: Iterable[DeadLetterRecord], *, max_replays: int) -> ReplayPlan:
    """Keep the latest copy of each record; refuse those replayed ``max_replays`` times already."""
    latest: dict[tuple[bytes | None, str], DeadLetterRecord] = {}
    plan = ReplayPlan()
    for record in records:
        identity = (record.key, hashlib.sha256(record.value or b"").hexdigest())
        kept = latest.get(identity)
        if kept is None:
            latest[identity] = record
            continue
        newer, older = (
            (record, kept)
            if (record.replay_count, record.offset) > (kept.replay_count, kept.offset)
            else (kept, record)
        )
        latest[identity] = newer
        plan.duplicates.append(older)
    for record in sorted(latest.values(), key=lambda r: (r.partition, r.offset)):
        if record.replay_count >= max_replays:
            plan.refused.append(
                (record, f"replayed {record.replay_count} times already (the cap is {max_replays})")
            )
        else:
            plan.replay.append(record)
    return plan


def replay_headers(record: DeadLetterRecord) -> Headers:
    """The producer's original headers plus the replay count, one higher."""
    ours = DEAD_LETTER_HEADERS | {HEADER_REPLAY_COUNT}
    headers: Headers = [(key, value) for key, value in record.headers if key not in ours]
    headers.append((HEADER_REPLAY_COUNT, str(record.replay_count + 1).encode()))
    return headers


def replay(
    records: Iterable[DeadLetterRecord],
    publisher: EventPublisher,
    *,
    rate_per_s: float | None = None,
    on_delivery: Callable[[DeadLetterRecord, Delivery], None] | None = None,
    timeout_s: float = 150.0,
    keep_partition: bool = True,
) -> DeliveryReport:
    """Republish ``records`` through ``publisher`` (at most ``rate_per_s`` a second); wait for
    every acknowledgement.

    With ``keep_partition`` each record goes to the partition number it was dead-lettered from
    (its id's partition, when the publisher's topic is co-partitioned with the ingest topic, as
    the retry topic is); otherwise, or when that is unknown, to the partitioner's choice by key.

    Raises:
        BrokerUnavailableError: some were still unacknowledged after ``timeout_s``.
    """
    report = DeliveryReport()
    started = time.monotonic()
    for index, record in enumerate(records):
        if rate_per_s:
            time.sleep(max(0.0, started + index / rate_per_s - time.monotonic()))

        def done(delivery: Delivery, record: DeadLetterRecord = record) -> None:
            report.add(delivery)
            if on_delivery is not None:
                on_delivery(record, delivery)

        source = record.source_partition if keep_partition else None
        publisher.publish_raw(
            record.key,
            record.value,
            replay_headers(record),
            on_delivery=done,
            partition=-1 if source is None or source < 0 else source,
        )
    publisher.flush(timeout_s)
    return report
