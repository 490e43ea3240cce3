"""The ingest topic as the source of truth, on the real broker: created compacted by
``ensure_topics``; the cleaner really runs, and a fresh read from the beginning then yields the
newest record of every live id (inline images included) and nothing of deleted ones; what the
workers re-publish (re-queued records) goes to the retry topic, so an older version never
becomes an id's last record on the ingest topic.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    Message,
    Producer,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient, NewTopic
from confluent_kafka.admin._config import ConfigResource
from confluent_kafka.admin._resource import ResourceType

from engine.errors import ConfigurationError
from engine.kafka import consumer_config, ensure_topics, producer_config
from engine.settings import KafkaSettings, Settings
from engine.store import VectorStore
from producer import Delivery, EventPublisher
from schemas import (
    DeleteEvent,
    IngestEvent,
    InlineImage,
    PathImage,
    UrlImage,
    decode_event,
    encode_event,
)
from schemas.dead_letter import HEADER_RETRY_ATTEMPTS
from schemas.deletes import HEADER_VERSION
from tests.integration.conftest import dead_letters, running_worker, small_images, wait_for
from tests.support.http_host import LoopbackHost, Reply

pytestmark = pytest.mark.stack

# Cleaner settings that make compaction observable within seconds: every record cleanable at
# once, segments rolled after a second, any dirty share worth a pass.
FAST_COMPACTION = {
    "compaction_lag_ms": 0,
    "segment_ms": 1000,
    "ingest_topic_config": {"min.cleanable.dirty.ratio": "0.01"},
}


@dataclass(frozen=True)
class Seen:
    """One record of a fresh read."""

    partition: int
    offset: int
    key: str
    value: bytes | None
    headers: tuple[tuple[str, bytes | None], ...]

    @property
    def version(self) -> int:
        """The upsert's version, or the tombstone's (its header)."""
        if self.value is None:
            return int(dict(self.headers)[HEADER_VERSION] or b"-1")
        return decode_event(self.value).version


def read_from_beginning(kafka: KafkaSettings, topic: str, *, timeout_s: float = 60.0) -> list[Seen]:
    """Every record of ``topic`` now, partition by partition in offset order: what a rebuild
    would read (by assignment, no group, no commits). Offsets may have gaps (compaction)."""
    consumer = Consumer(
        consumer_config(kafka, **{"group.id": f"fresh-read-{uuid.uuid4().hex[:8]}"})
    )
    try:
        partitions = sorted(consumer.list_topics(topic, timeout=10).topics[topic].partitions)
        ends = {
            p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
            for p in partitions
        }
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
        found: list[Seen] = []
        deadline = time.monotonic() + timeout_s
        while True:
            positions = consumer.position([TopicPartition(topic, p) for p in partitions])
            # A partition never read has no position yet (negative): it is done only if empty.
            if all((tp.offset if tp.offset >= 0 else 0) >= ends[tp.partition] for tp in positions):
                break
            assert time.monotonic() < deadline, f"could not read {topic} to its end"
            for message in consumer.consume(500, timeout=0.5):
                if message.error() is not None:
                    assert message.error().code() == KafkaError._PARTITION_EOF, message.error()
                elif (message.offset() or 0) < ends[message.partition() or 0]:
                    found.append(_seen(message))
        return sorted(found, key=lambda s: (s.partition, s.offset))
    finally:
        consumer.close()


def _seen(message: Message) -> Seen:
    received = message.headers() or []
    return Seen(
        partition=message.partition() or 0,
        offset=message.offset() or 0,
        key=(message.key() or b"").decode(),
        value=message.value(),
        headers=tuple((k, v.encode() if isinstance(v, str) else v) for k, v in received),
    )


def last_words(records: list[Seen]) -> dict[str, Seen]:
    """Each key's last record (what compaction keeps)."""
    last: dict[str, Seen] = {}
    for record in records:  # a key lives in one partition, in offset order there
        last[record.key] = record
    return last


def roll_segments(
    kafka: KafkaSettings, topic: str, partitions: int, round_: int, image: str = "/roll.png"
) -> None:
    """Append one record per partition, keyed ``roll-<p>``: the open segment (never compacted)
    rolls on the first append after ``segment.ms``, and the log gets dirty again."""
    producer = Producer(producer_config(kafka))
    for partition in range(partitions):
        event = IngestEvent(id=f"roll-{partition}", image=PathImage(path=image), version=round_ + 1)
        producer.produce(
            topic, key=event.id.encode(), value=encode_event(event), partition=partition
        )
    assert producer.flush(30) == 0


def caught_up(kafka: KafkaSettings) -> bool:
    """The workers' group committed the end of every partition of the topics it consumes (the
    ingest topic and the retry topic)."""
    probe = Consumer(consumer_config(kafka, **{"client.id": "caught-up-probe"}))
    try:
        for topic in kafka.topics().consumed:
            partitions = probe.list_topics(topic, timeout=10).topics[topic].partitions
            for tp in probe.committed([TopicPartition(topic, p) for p in partitions], timeout=10):
                _low, high = probe.get_watermark_offsets(
                    TopicPartition(topic, tp.partition), timeout=10
                )
                if high > 0 and tp.offset < high:
                    return False
        return True
    finally:
        probe.close()


def topic_config(kafka: KafkaSettings, topic: str) -> dict[str, str]:
    admin = AdminClient({"bootstrap.servers": kafka.bootstrap_servers})
    resource = ConfigResource(ResourceType.TOPIC, topic)
    entries = admin.describe_configs([resource])[resource].result(timeout=30)
    return {name: entry.value for name, entry in entries.items()}


@pytest.fixture
def compacting(settings: Settings, unique: str) -> KafkaSettings:
    """This test's own topics, made by ensure_topics with a cleaner that acts within seconds."""
    kafka = settings.kafka.model_copy(
        update={
            "topic": f"compacted-{unique}",
            "retry_topic": "",
            "dead_letter_topic": f"compacted-{unique}.dlq",
            "topic_partitions": 2,
            "delete_retention_ms": 3000,
            **FAST_COMPACTION,
        }
    )
    ensure_topics(kafka)
    return kafka


def test_the_cleaner_leaves_the_newest_record_of_each_live_id_and_nothing_of_deleted_ones(
    compacting: KafkaSettings, tmp_path: Path
) -> None:
    kafka = compacting
    topics = kafka.topics()
    configs = topic_config(kafka, topics.ingest)
    assert {k: configs[k] for k in ("cleanup.policy", "min.compaction.lag.ms", "segment.ms")} == {
        "cleanup.policy": "compact",
        "min.compaction.lag.ms": "0",
        "segment.ms": "1000",
    }
    assert configs["delete.retention.ms"] == "3000"
    assert topic_config(kafka, topics.retry)["cleanup.policy"] == "delete"

    pixels = small_images(tmp_path, 1)[0].read_bytes()
    # Per id, what is published in order: a version, or None for a delete.
    history: dict[str, list[int | None]] = {
        "kept-3": [1, 2, 3],
        "kept-1": [7],
        "deleted": [1, 2, None],
        "deleted-early": [None],
        "back": [1, None, 5],  # deleted, then published again: live
        "inline": [1, 2],  # the newest carries its image bytes
        "twice-deleted": [4, None, None],
    }
    expected: dict[str, tuple[int, bytes]] = {}
    # What was published is counted from the delivery reports: with compaction_lag_ms=0 the
    # cleaner (every second on the stack's broker) may compact the first steps before the last
    # is written, so a read-back here would race it.
    deliveries: list[Delivery] = []
    with EventPublisher(kafka) as publisher:
        for step in range(3):
            for event_id, versions in history.items():
                if step >= len(versions):
                    continue
                version = versions[step]
                if version is None:
                    delete_version = 10 * (step + 1)
                    publisher.publish_delete(
                        DeleteEvent(id=event_id, version=delete_version),
                        on_delivery=deliveries.append,
                    )
                    expected.pop(event_id, None)
                    continue
                image = (
                    InlineImage(data=pixels) if event_id == "inline" else PathImage(path="/a.png")
                )
                event = IngestEvent(
                    id=event_id, image=image, version=version, metadata={"step": step}
                )
                publisher.publish(event, on_delivery=deliveries.append)
                expected[event_id] = (version, encode_event(event))
            publisher.flush(30)
            time.sleep(1.2)  # past segment.ms: the next append starts a new segment
    assert [d for d in deliveries if not d.ok] == []
    assert len(deliveries) == sum(len(v) for v in history.values())

    def compacted() -> list[Seen] | None:
        roll_segments(kafka, topics.ingest, 2, int(time.monotonic()))
        records = [r for r in read_from_beginning(kafka, topics.ingest) if r.key[:5] != "roll-"]
        keys = [r.key for r in records]
        superseded = len(keys) != len(set(keys))
        tombstones = any(r.value is None for r in records)
        return None if superseded or tombstones else records

    # Two cleaner passes at least: one drops the superseded records and starts the tombstones'
    # delete.retention.ms, a later one drops the tombstones.
    records = wait_for(
        compacted, timeout=240, interval=2.0, what="the cleaner to compact the ingest topic"
    )
    assert {r.key: (r.version, r.value) for r in records} == {
        event_id: (version, value) for event_id, (version, value) in expected.items()
    }
    inline = next(r for r in records if r.key == "inline")
    assert decode_event(inline.value or b"").image == InlineImage(data=pixels)
    print(
        f"compaction: published={len(deliveries)} after={len(records)} "
        f"live={sorted(expected)} deleted={sorted(set(history) - set(expected))}"
    )


def test_existing_topics_are_checked_never_changed(
    settings: Settings, unique: str, caplog: pytest.LogCaptureFixture
) -> None:
    # The fixture's ensure_topics made the topics: compacted, a retry topic as wide.
    topics = settings.kafka.topics()
    assert topic_config(settings.kafka, topics.ingest)["cleanup.policy"] == "compact"
    admin = AdminClient({"bootstrap.servers": settings.kafka.bootstrap_servers})
    widths = {
        name: len(admin.list_topics(name, timeout=10).topics[name].partitions)
        for name in topics.all
    }
    assert widths[topics.retry] == widths[topics.ingest] == settings.kafka.topic_partitions
    # An older, uncompacted ingest topic (made as before) with more partitions.
    older = settings.kafka.model_copy(
        update={"topic": f"older-{unique}", "dead_letter_topic": f"older-{unique}.dlq"}
    )
    name = older.topics().ingest
    admin.create_topics([NewTopic(name, 3)])[name].result(timeout=30)
    ensure_topics(older)
    assert topic_config(older, name)["cleanup.policy"] == "delete"  # not changed
    warning = next(r.getMessage() for r in caplog.records if "not compact" in r.getMessage())
    assert f"--entity-name {name} --add-config cleanup.policy=compact" in warning
    retry = older.topics().retry
    assert len(admin.list_topics(retry, timeout=10).topics[retry].partitions) == 3
    # A retry topic narrower than the ingest topic: partition p of both would not go to one
    # worker. The worker refuses to start, saying how to widen it.
    narrow = settings.kafka.model_copy(
        update={"topic": f"narrow-{unique}", "dead_letter_topic": f"narrow-{unique}.dlq"}
    )
    made = narrow.topics()
    created = admin.create_topics([NewTopic(made.ingest, 2), NewTopic(made.retry, 1)])
    for future in created.values():
        future.result(timeout=30)
    with pytest.raises(ConfigurationError, match=rf"--alter --topic {made.retry} --partitions 2"):
        ensure_topics(narrow)


class StallingServer(LoopbackHost):
    """A loopback image host answering 503 until ``release`` is set, then a PNG."""

    def __init__(self, png: bytes) -> None:
        self.release = threading.Event()
        super().__init__(
            lambda _path, _nth: Reply(200, png) if self.release.is_set() else Reply(503)
        )


@pytest.fixture
def stalling_server(tmp_path: Path) -> Iterator[StallingServer]:
    server = StallingServer(small_images(tmp_path / "served", 1)[0].read_bytes())
    yield server
    server.close()


def test_a_requeued_older_version_goes_to_the_retry_topic_and_never_wins(
    settings: Settings, store: VectorStore, tmp_path: Path, stalling_server: StallingServer
) -> None:
    """v1's image host fails transiently: the worker re-queues v1, to the retry topic's
    partition of v1's number. v2 is published meanwhile and stored; the re-queued v1 is then
    stale. The ingest topic holds v1 then v2 (its last word, what compaction keeps), nothing
    more; the collection holds v2. (The copy screened while v2 is being written reads Milvus
    before v2 lands: only the worker's memory of writing v2 from the ingest topic's partition
    of the same number, which it owns with the retry topic's, keeps v1 out: worker.versions.)"""
    settings = settings.model_copy(
        update={
            "fetch": settings.fetch.model_copy(update={"allowed_hosts": ["127.0.0.1"]}),
            "retry": settings.retry.model_copy(update={"record_attempts": 50}),
        }
    )
    topics = settings.kafka.topics()
    image = small_images(tmp_path / "images", 1)[0]
    v1 = IngestEvent(
        id="photo",
        image=UrlImage.model_validate({"url": f"{stalling_server.url}/v1.png"}),
        version=1,
        metadata={"v": 1},
    )
    v2 = IngestEvent(id="photo", image=PathImage(path=str(image)), version=2, metadata={"v": 2})
    with running_worker(settings, worker_id="requeuer") as worker:
        with EventPublisher(settings.kafka) as publisher:
            assert publisher.publish_and_wait([v1]).failed == 0
            requeued = wait_for(
                lambda: read_from_beginning(settings.kafka, topics.retry),
                timeout=180,
                what="v1 re-queued to the retry topic",
            )
            assert publisher.publish_and_wait([v2]).failed == 0
        wait_for(
            lambda: (row := store.get_record("photo")) is not None and row.event_version == 2,
            timeout=120,
            what="v2 stored",
        )
        stalling_server.release.set()  # v1 could now be fetched: it must still lose
        wait_for(lambda: caught_up(settings.kafka), timeout=120, what="both topics committed")
        skipped = worker.metrics.skipped
        # Stale (v2 stored first) or superseded (v2 in the same batch): never written.
        assert sum(skipped.labels(why)._value.get() for why in ("stale_version", "superseded"))
    ingest = read_from_beginning(settings.kafka, topics.ingest)
    assert [(r.key, r.version) for r in ingest] == [("photo", 1), ("photo", 2)]
    assert last_words(ingest)["photo"].version == 2
    copy = requeued[0]
    assert (copy.key, copy.value, copy.partition) == (
        "photo",
        encode_event(v1),
        ingest[0].partition,
    )
    assert int(dict(copy.headers)[HEADER_RETRY_ATTEMPTS] or b"0") >= 1
    record = store.get_record("photo")
    assert record is not None
    assert (record.event_version, record.metadata) == (2, {"v": 2})
    assert dead_letters(settings) == []
