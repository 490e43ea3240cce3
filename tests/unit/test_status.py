"""Item statuses without Kafka or Milvus: what a record says of its id, which fact decides the
state, the dead-letter index's newest-version rule and its bound, and the partition of a key."""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime

import orjson
import pytest
from confluent_kafka import TIMESTAMP_CREATE_TIME

from engine.records import StoredVersion
from engine.settings import KafkaSettings
from producer.status import DeadLetterIndex, decide, describe, key_partition, read_record
from schemas import HEADER_COLLECTION, HEADER_VERSION, IngestEvent, PathImage, encode_event
from schemas.api import DeadLetterSummary, PendingRecord


@dataclass
class FakeMessage:
    """The accessors of ``confluent_kafka.Message`` that the status reads."""

    key_: bytes | None
    value_: bytes | None
    headers_: list[tuple[str, bytes]] | None = None
    partition_: int = 0
    offset_: int = 0
    timestamp_ms: int = 1_700_000_000_000

    def key(self) -> bytes | None:
        return self.key_

    def value(self) -> bytes | None:
        return self.value_

    def headers(self) -> list[tuple[str, bytes]] | None:
        return self.headers_

    def timestamp(self) -> tuple[int, int]:
        return (TIMESTAMP_CREATE_TIME, self.timestamp_ms)

    def partition(self) -> int:
        return self.partition_

    def offset(self) -> int:
        return self.offset_

    def error(self) -> None:
        return None


def upsert(item_id: str, version: int, collection: str | None = None) -> bytes:
    event = IngestEvent(
        id=item_id, image=PathImage(path="/a.jpg"), version=version, collection=collection
    )
    return encode_event(event)


def test_a_record_says_its_id_collection_operation_and_version() -> None:
    read = read_record(FakeMessage(b"cats/1", upsert("cats/1", 5, "c")))
    assert read == ("cats/1", "c", "upsert", 5)
    # A keyless event names its id in the value; a default collection is None.
    assert read_record(FakeMessage(None, upsert("dogs/2", 6))) == ("dogs/2", None, "upsert", 6)
    headers = [(HEADER_VERSION, b"9"), (HEADER_COLLECTION, b"c")]
    assert read_record(FakeMessage(b"x", None, headers)) == ("x", "c", "delete", 9)
    # A plain tombstone's version is its timestamp's last microsecond (schemas.deletes).
    plain = read_record(FakeMessage(b"x", None, timestamp_ms=1_000))
    assert plain == ("x", None, "delete", 1_000_999)
    # What cannot be read is None, not a guess.
    assert read_record(FakeMessage(b"x", b"{oops")) == ("x", None, "upsert", None)
    bad = [(HEADER_VERSION, b"soon")]
    assert read_record(FakeMessage(b"x", None, bad)) == ("x", None, "delete", None)
    assert read_record(FakeMessage(b"y", orjson.dumps({"version": True}))).version is None
    assert read_record(FakeMessage(None, b"{}")) is None
    assert read_record(FakeMessage(None, None)) is None


def test_a_key_goes_to_the_partition_of_librdkafkas_default_partitioner() -> None:
    # consistent_random: CRC-32 of the key (checked against a broker in test_items_api.py).
    for key in (b"cats/0001.jpg", "猫/ü x".encode(), b""):
        assert key_partition(key, 4) == zlib.crc32(key) % 4
    assert {key_partition(f"k{n}".encode(), 4) for n in range(50)} == {0, 1, 2, 3}


def pending(
    version: int | None, operation: str = "upsert", published_at: datetime | None = None
) -> PendingRecord:
    return PendingRecord(
        operation=operation,  # type: ignore[arg-type]
        version=version,
        topic="trident.ingest",
        partition=1,
        offset=42,
        published_at=published_at,
    )


def letter(version: int | None) -> DeadLetterSummary:
    return DeadLetterSummary(
        operation="upsert",
        version=version,
        stage="fetch",
        reason="not_found",
        detail="cannot fetch '/a.jpg': No such file",
        dead_lettered_at=datetime(2026, 1, 2, tzinfo=UTC),
        partition=0,
        offset=7,
    )


ROW = StoredVersion(10, "ab", "m")
TOMBSTONE = StoredVersion.tombstone(10)


@pytest.mark.parametrize(
    ("stored", "pending_", "letter_", "state", "version"),
    [
        (None, None, None, "unknown", None),
        (ROW, None, None, "stored", 10),
        (TOMBSTONE, None, None, "deleted", 10),
        (None, None, letter(3), "dead_lettered", 3),
        (None, pending(3), None, "pending", 3),
        # The newest version wins among the settled facts; the store on a tie.
        (ROW, None, letter(11), "dead_lettered", 11),
        (ROW, None, letter(10), "stored", 10),
        (ROW, None, letter(9), "stored", 10),
        (TOMBSTONE, None, letter(12), "dead_lettered", 12),
        (ROW, None, letter(None), "stored", 10),  # a version it cannot read: not newer
        # A pending record wins when newer than what is settled, or unreadable.
        (ROW, pending(11), None, "pending", 11),
        (ROW, pending(10), None, "stored", 10),  # processed between the two reads
        (ROW, pending(9), None, "stored", 10),  # stale: the worker will skip it
        (ROW, pending(None), None, "pending", None),
        (ROW, pending(13, "delete"), letter(12), "pending", 13),
        (ROW, pending(11), letter(12), "dead_lettered", 12),
        (None, pending(1), letter(None), "pending", 1),
        # A tie with a dead letter: its replay when published after it, else settled.
        (None, pending(3, published_at=datetime(2026, 1, 3, tzinfo=UTC)), letter(3), "pending", 3),
        (
            None,
            pending(3, published_at=datetime(2026, 1, 1, tzinfo=UTC)),
            letter(3),
            "dead_lettered",
            3,
        ),
        (None, pending(3), letter(3), "dead_lettered", 3),
        (ROW, pending(10, published_at=datetime(2026, 1, 3, tzinfo=UTC)), None, "stored", 10),
    ],
)
def test_the_newest_fact_decides_the_state(
    stored: StoredVersion | None,
    pending_: PendingRecord | None,
    letter_: DeadLetterSummary | None,
    state: str,
    version: int | None,
) -> None:
    answer = decide("a", "c", stored=stored, pending=pending_, letter=letter_)
    assert (answer.state, answer.version) == (state, version)
    # Every fact found is reported, whichever decided.
    assert answer.pending == pending_ and answer.dead_letter == letter_
    assert (answer.stored is None) == (stored is None)


def test_a_status_reads_as_lines() -> None:
    answer = decide("a/1", "c", stored=ROW, pending=pending(11), letter=letter(3), complete=False)
    lines = describe(answer)
    assert lines[0] == "a/1 in c: pending (version 11)"
    assert "  store:       stored, version 10" in lines
    assert any("fetch/not_found at 2026-01-02T00:00:00+00:00" in line for line in lines)
    assert lines[-1].startswith("  (incomplete")


@pytest.fixture
def index() -> Iterator[DeadLetterIndex]:
    # Nothing is read: the consumer is made, never used.
    made = DeadLetterIndex(KafkaSettings(bootstrap_servers="127.0.0.1:9"), max_entries=10)
    yield made
    made.close()


def test_the_index_keeps_the_newest_version_of_each_id(index: DeadLetterIndex) -> None:
    index._add(read_record(FakeMessage(b"a", upsert("a", 5))), 0, 1)  # type: ignore[arg-type]
    index._add(read_record(FakeMessage(b"a", upsert("a", 4))), 0, 2)  # type: ignore[arg-type]
    assert index.find("a", "images", default=True) == (5, 0, 1)  # an older replay failing later
    index._add(read_record(FakeMessage(b"a", upsert("a", 5))), 0, 3)  # type: ignore[arg-type]
    assert index.find("a", "images", default=True) == (5, 0, 3)  # the same version, later
    # Records naming no collection are the default collection's, and only its.
    assert index.find("a", "other", default=False) is None
    index._add(read_record(FakeMessage(b"a", upsert("a", 7, "other"))), 1, 0)  # type: ignore[arg-type]
    assert index.find("a", "other", default=False) == (7, 1, 0)
    assert index.find("a", "images", default=True) == (5, 0, 3)


def test_the_index_is_bounded_and_forgets_the_oldest_first(index: DeadLetterIndex) -> None:
    for n in range(11):
        index._add(read_record(FakeMessage(f"id{n}".encode(), upsert(f"id{n}", n))), 0, n)  # type: ignore[arg-type]
    assert index.size == 10 and index.evicted == 1
    assert index.find("id0", "images", default=True) is None
    assert index.find("id10", "images", default=True) == (10, 0, 10)
    # An id dead-lettered again moves to the back: the next eviction spares it.
    index._add(read_record(FakeMessage(b"id1", upsert("id1", 20))), 0, 20)  # type: ignore[arg-type]
    index._add(read_record(FakeMessage(b"id11", upsert("id11", 11))), 0, 11)  # type: ignore[arg-type]
    assert index.find("id1", "images", default=True) == (20, 0, 20)
    assert index.find("id2", "images", default=True) is None
