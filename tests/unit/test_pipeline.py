"""The batch processor with fake services: isolation, classification, retry budget, bisecting
rejected rows, version guard, deletes (tombstones) and their version rules."""

from __future__ import annotations

import io
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from confluent_kafka import TIMESTAMP_CREATE_TIME
from PIL import Image

from engine.errors import (
    BatchAbandonedError,
    CollectionConflictError,
    FetchUnavailableError,
    ImageReferenceError,
    InferenceUnavailableError,
    InvalidRowError,
    Reason,
    StoreUnavailableError,
    TridentError,
    UnknownCollectionError,
)
from engine.records import StoredVersion, VectorRecord
from engine.settings import FetchSettings, RetrySettings
from schemas import (
    HEADER_COLLECTION,
    HEADER_VERSION,
    IngestEvent,
    InlineImage,
    PathImage,
    encode_event,
)
from schemas.dead_letter import HEADER_RETRY_ATTEMPTS
from schemas.events import ImageRef
from worker.metrics import WorkerMetrics
from worker.ownership import Owner, Ownership
from worker.pipeline import Batch, BatchProcessor, Outcome, Router

DIM = 8
PARTITION = ("ingest", 0)


@dataclass
class FakeMessage:
    payload: bytes | None
    offset_: int
    key_: bytes | None = None
    headers_: list[tuple[str, bytes]] | None = None
    partition_: int = 0
    timestamp_ms: int = 1_700_000_000_000

    def value(self) -> bytes | None:
        return self.payload

    def timestamp(self) -> tuple[int, int]:
        return (TIMESTAMP_CREATE_TIME, self.timestamp_ms)

    def key(self) -> bytes | None:
        return self.key_

    def topic(self) -> str:
        return "ingest"

    def partition(self) -> int:
        return self.partition_

    def offset(self) -> int:
        return self.offset_

    def headers(self) -> list[tuple[str, bytes]] | None:
        return self.headers_


class FakeFetcher:
    """Inline images pass through; paths map to scripted results."""

    def __init__(self, scripted: dict[str, list[bytes | TridentError]] | None = None) -> None:
        self.scripted = scripted or {}
        self.calls = 0
        self.paths: list[str] = []  # every path fetched, in order

    def fetch_many(self, refs: Sequence[ImageRef]) -> list[bytes | TridentError]:
        self.calls += 1
        results: list[bytes | TridentError] = []
        for ref in refs:
            if isinstance(ref, InlineImage):
                results.append(ref.data)
            else:
                assert isinstance(ref, PathImage)
                self.paths.append(ref.path)
                script = self.scripted[ref.path]
                results.append(script.pop(0) if len(script) > 1 else script[0])
        return results


class FakePreprocessor:
    def preprocess(self, images: Sequence[npt.NDArray[np.uint8]]) -> npt.NDArray[np.float32]:
        return np.stack([np.full((3, 4, 4), float(img.mean()), dtype=np.float32) for img in images])


class FakeEmbedder:
    def __init__(self, failures: int = 0) -> None:
        self.failures = failures
        self.batches: list[int] = []

    def embed(self, batch: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        if self.failures:
            self.failures -= 1
            raise InferenceUnavailableError("triton down")
        self.batches.append(batch.shape[0])
        vectors = (
            np.ones((batch.shape[0], DIM), dtype=np.float32) * batch.mean(axis=(1, 2, 3))[:, None]
        )
        return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


@dataclass
class FakeMilvus:
    """What every client of one fake Milvus shares: each write, in order, with its timestamp.
    A delete writes its tombstones (kept) and removes the rows, at one timestamp."""

    history: list[tuple[int, VectorRecord]] = field(default_factory=list)
    deletions: list[tuple[int, str, int]] = field(default_factory=list)  # (at, id, version)
    clock: int = 0

    def rows_as_of(self, timestamp: int) -> dict[str, VectorRecord]:
        written: list[tuple[int, str, VectorRecord | None]]
        written = [(at, record.id, record) for at, record in self.history]
        removed: list[tuple[int, str, VectorRecord | None]]
        removed = [(at, record_id, None) for at, record_id, _ in self.deletions]
        rows: dict[str, VectorRecord] = {}
        for at, record_id, record in sorted(written + removed, key=lambda change: change[0]):
            if at > timestamp:
                break
            if record is None:
                rows.pop(record_id, None)
            else:
                rows[record_id] = record
        return rows

    def tombstones_as_of(self, timestamp: int) -> dict[str, tuple[int, int]]:
        """id -> (the delete's version, when it was written)."""
        return {
            record_id: (version, at) for at, record_id, version in self.deletions if at <= timestamp
        }

    def versions_as_of(self, timestamp: int) -> dict[str, StoredVersion]:
        """As ``VectorStore.stored_versions``: the newer of row and tombstone (equal versions:
        the one written last)."""
        found: dict[str, tuple[tuple[int, int], StoredVersion]] = {}
        for at, record in self.history:
            if at <= timestamp:
                fact = StoredVersion(
                    record.event_version, record.content_sha256, record.model_version
                )
                found[record.id] = ((record.event_version, at), fact)
        for record_id, (version, at) in self.tombstones_as_of(timestamp).items():
            row = found.get(record_id)
            if row is None or (version, at) > row[0]:
                found[record_id] = ((version, at), StoredVersion.tombstone(version))
        return {record_id: fact for record_id, (_, fact) in found.items()}


@dataclass
class FakeStore:
    """One client of a fake Milvus. ``refused`` ids make the whole upsert request fail, as
    Milvus does (code 1100); ``invalid`` ids fail validation; ``collections`` are the ones that
    exist. Reads are as consistent as asked and no more: ``Strong`` sees every write, ``Session``
    only those up to this client's last write (the worst Milvus allows); ``reads`` records the
    consistency of each version read."""

    backend: FakeMilvus = field(default_factory=FakeMilvus)
    upserts: int = 0
    refused: set[str] = field(default_factory=set)
    invalid: set[str] = field(default_factory=set)
    collections: set[str] = field(default_factory=lambda: {"images"})
    unindexed: set[str] = field(default_factory=set)  # made elsewhere, without a vector index
    outage: bool = False
    last_write: int = 0
    reads: list[str] = field(default_factory=list)
    deletes: int = 0

    @property
    def rows(self) -> dict[str, VectorRecord]:
        return self.backend.rows_as_of(self.backend.clock)

    def _check(self, collection: str | None) -> None:
        if self.outage:
            raise StoreUnavailableError("milvus down")
        if (collection or "images") not in self.collections:
            raise UnknownCollectionError(f"no collection {collection}")
        if collection in self.unindexed:
            raise CollectionConflictError("no vector index", reason=Reason.NO_VECTOR_INDEX)

    def validate(self, record: VectorRecord, collection: str | None = None) -> None:
        self._check(collection)
        if record.id in self.invalid:
            raise InvalidRowError("too big", reason=Reason.METADATA_TOO_LARGE)

    def stored_versions(
        self, ids: Sequence[str], collection: str | None = None, *, consistency: str = "Strong"
    ) -> dict[str, StoredVersion]:
        self._check(collection)
        self.reads.append(consistency)
        horizon = self.backend.clock if consistency == "Strong" else self.last_write
        versions = self.backend.versions_as_of(horizon)
        return {i: versions[i] for i in ids if i in versions}

    def upsert(self, records: Sequence[VectorRecord], collection: str | None = None) -> int:
        self._check(collection)
        self.upserts += 1
        if any(record.id in self.refused for record in records):
            raise InvalidRowError("exceeds max length (code 1100)")
        self.backend.clock += 1
        self.last_write = self.backend.clock
        self.backend.history += [(self.backend.clock, record) for record in records]
        return len(records)

    def delete(
        self, ids_with_versions: Sequence[tuple[str, int]], collection: str | None = None
    ) -> None:
        self._check(collection)
        self.deletes += 1
        if any(record_id in self.refused for record_id, _ in ids_with_versions):
            raise InvalidRowError("refused (code 1100)")
        self.backend.clock += 1
        self.last_write = self.backend.clock
        self.backend.deletions += [(self.backend.clock, i, v) for i, v in ids_with_versions]

    @property
    def tombstones(self) -> dict[str, int]:
        return {i: v for i, (v, _) in self.backend.tombstones_as_of(self.backend.clock).items()}

    def get(
        self, ids: Sequence[str], collection: str | None = None, *, with_vectors: bool = False
    ) -> list[dict[str, Any]]:
        rows = self.rows
        return [
            {
                "id": i,
                "embedding": rows[i].vector.tolist(),
                "content_sha256": rows[i].content_sha256,
                "model_version": rows[i].model_version,
            }
            for i in ids
            if i in rows
        ]


def png(shade: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 24), (shade, shade, shade)).save(buffer, format="PNG")
    return buffer.getvalue()


def event(event_id: str, image: ImageRef, version: int = 1, collection: str | None = None) -> bytes:
    return encode_event(
        IngestEvent(id=event_id, image=image, version=version, collection=collection)
    )


def make_processor(
    fetcher: FakeFetcher,
    embedder: FakeEmbedder,
    store: FakeStore,
    *,
    record_attempts: int = 7,
    ownership: Ownership | None = None,
    backoff_s: float = 0.0,
    router: Router | None = None,
) -> BatchProcessor:
    """A processor whose worker owns partition 0 of topic ``ingest`` (unless told otherwise)."""
    if ownership is None:
        ownership = Ownership()
        ownership.assign([PARTITION])
    return BatchProcessor(
        fetcher=fetcher,
        preprocessor=FakePreprocessor(),
        embedder=embedder,
        store=store,
        ownership=ownership,
        fetch_settings=FetchSettings(max_pixels=10_000),
        retry_settings=RetrySettings(
            attempts=3,
            initial_backoff_s=backoff_s,
            max_backoff_s=backoff_s,
            record_attempts=record_attempts,
        ),
        model_version="m1",
        default_collection="images",
        metrics=WorkerMetrics(),
        router=router,
    )


def process(processor: BatchProcessor, messages: Sequence[Any]) -> Batch:
    """Every stage of one batch on this thread, each record stamped with the current assignment
    as the consumer loop stamps it (records of partitions not owned are left ``UNFINISHED``)."""
    ownership = processor._ownership
    records = []
    for message in messages:
        key = (message.topic(), message.partition())
        records.append((message, ownership.current(key) or Owner(key, 0)))
    batch = processor.batch(records)
    try:
        processor.prepare(batch)
        processor.embed(batch)
        processor.store(batch)
    finally:
        processor.release(batch)
    return batch


def test_each_bad_record_fails_alone_with_its_reason() -> None:
    truncated = png(10)[:40]
    fetcher = FakeFetcher(
        {"/missing.jpg": [ImageReferenceError("no such file", reason="not_found")]}
    )
    store = FakeStore()
    messages = [
        FakeMessage(event("good-1", InlineImage(data=png(50))), 0),
        FakeMessage(b"{oops", 1),
        FakeMessage(event("missing", PathImage(path="/missing.jpg")), 2),
        FakeMessage(event("not-image", InlineImage(data=b"hello world")), 3),
        FakeMessage(event("truncated", InlineImage(data=truncated)), 4),
        FakeMessage(event("good-2", InlineImage(data=png(200))), 5),
    ]
    result = process(make_processor(fetcher, FakeEmbedder(), store), messages)
    outcomes = {item.message.offset(): item.outcome for item in result.items}
    assert outcomes == {
        0: Outcome.STORED,
        1: Outcome.DEAD,
        2: Outcome.DEAD,
        3: Outcome.DEAD,
        4: Outcome.DEAD,
        5: Outcome.STORED,
    }
    reasons = {
        item.message.offset(): (item.dead_letter.stage.value, item.dead_letter.reason)
        for item in result.items
        if item.dead_letter
    }
    assert reasons[1] == ("decode_event", "malformed_json")
    assert reasons[2] == ("fetch", "not_found")
    assert reasons[3][0] == "decode_image" and reasons[3][1] == "not_an_image"
    assert reasons[4][0] == "decode_image" and reasons[4][1] == "truncated_image"
    assert set(store.rows) == {"good-1", "good-2"}
    assert store.rows["good-1"].content_sha256 and store.rows["good-1"].model_version == "m1"


def test_a_transiently_failing_image_is_requeued_with_its_attempts_never_blocking() -> None:
    flaky = FetchUnavailableError("503", reason=Reason.HTTP_SERVER_ERROR)
    fetcher = FakeFetcher({"/recovers.jpg": [flaky, png(80)], "/down.jpg": [flaky]})
    store = FakeStore()
    messages = [
        FakeMessage(event("recovers", PathImage(path="/recovers.jpg")), 0),
        FakeMessage(event("down", PathImage(path="/down.jpg")), 1),
        FakeMessage(event("fine", InlineImage(data=png(9))), 2),
    ]
    result = process(make_processor(fetcher, FakeEmbedder(), store), messages)
    assert [item.outcome for item in result.items] == [
        Outcome.STORED,
        Outcome.REQUEUE,  # terminal once re-published: its partition moves on
        Outcome.STORED,
    ]
    down = result.items[1]
    assert down.attempts == 3 and down.requeue_reason == "http_server_error"
    assert fetcher.calls == 3  # this pass's share of the budget, then back to the topic
    assert set(store.rows) == {"recovers", "fine"}


def test_the_retry_budget_counts_earlier_deliveries_then_dead_letters() -> None:
    flaky = FetchUnavailableError("timed out", reason=Reason.TIMEOUT)
    fetcher = FakeFetcher({"/down.jpg": [flaky]})
    payload = event("down", PathImage(path="/down.jpg"))
    # Two earlier passes used 6 of 7 attempts: one more, then the dead letter.
    again = FakeMessage(payload, 9, headers_=[(HEADER_RETRY_ATTEMPTS, b"6"), ("origin", b"t")])
    result = process(make_processor(fetcher, FakeEmbedder(), FakeStore()), [again])
    item = result.items[0]
    assert item.outcome is Outcome.DEAD and fetcher.calls == 1
    assert item.dead_letter is not None
    assert (item.dead_letter.stage.value, item.dead_letter.reason) == ("fetch", "retries_exhausted")
    assert item.dead_letter.attempts == 7


def test_a_store_outage_is_never_a_per_record_failure() -> None:
    store = FakeStore(outage=True)
    processor = make_processor(FakeFetcher(), FakeEmbedder(), store)
    with pytest.raises(StoreUnavailableError):
        process(processor, [FakeMessage(event("a", InlineImage(data=png(1))), 0)])


def test_rows_the_store_refuses_are_bisected_out_and_the_rest_stored() -> None:
    store = FakeStore(refused={"bad-2", "bad-5"}, invalid={"big-7"})
    messages = [
        FakeMessage(event(name, InlineImage(data=png(10 + i))), i)
        for i, name in enumerate(
            ["ok-0", "ok-1", "bad-2", "ok-3", "ok-4", "bad-5", "ok-6", "big-7", "ok-8"]
        )
    ]
    result = process(make_processor(FakeFetcher(), FakeEmbedder(), store), messages)
    dead = {
        item.event.id: (item.dead_letter.stage.value, item.dead_letter.reason)
        for item in result.items
        if item.event and item.dead_letter
    }
    assert dead == {
        "bad-2": ("upsert", "row_rejected"),
        "bad-5": ("upsert", "row_rejected"),
        "big-7": ("upsert", "metadata_too_large"),
    }
    assert set(store.rows) == {"ok-0", "ok-1", "ok-3", "ok-4", "ok-6", "ok-8"}
    # Bisecting costs at most two requests per level per refused row, past the first one.
    rows_written = len(messages) - 1  # big-7 never reached the store
    assert store.upserts <= 1 + 2 * math.ceil(math.log2(rows_written)) * 2


def test_an_id_over_the_byte_limit_fails_before_any_lookup() -> None:
    store = FakeStore()
    long_id = "猫" * 256  # 256 characters, 768 UTF-8 bytes: over Milvus's 256-byte VARCHAR
    messages = [
        FakeMessage(event(long_id, InlineImage(data=png(3))), 0),
        FakeMessage(event("short", InlineImage(data=png(4))), 1),
    ]
    result = process(make_processor(FakeFetcher(), FakeEmbedder(), store), messages)
    first = result.items[0]
    assert first.outcome is Outcome.DEAD and first.dead_letter is not None
    assert first.dead_letter.reason == "id_too_long"
    assert set(store.rows) == {"short"}


def test_events_naming_a_missing_collection_are_dead_lettered_not_created() -> None:
    store = FakeStore()
    messages = [
        FakeMessage(event("a", InlineImage(data=png(3)), collection="typo"), 0),
        FakeMessage(event("b", InlineImage(data=png(4))), 1),
    ]
    result = process(make_processor(FakeFetcher(), FakeEmbedder(), store), messages)
    first = result.items[0]
    assert first.dead_letter is not None and first.dead_letter.reason == "unknown_collection"
    assert result.items[1].outcome is Outcome.STORED
    assert store.collections == {"images"}


def test_a_collection_dropped_before_the_write_dead_letters_its_rows() -> None:
    store = FakeStore()
    processor = make_processor(FakeFetcher(), FakeEmbedder(), store)
    messages = [FakeMessage(event("a", InlineImage(data=png(3))), 0)]
    original = store.validate

    def drop_then_validate(record: VectorRecord, collection: str | None = None) -> None:
        original(record, collection)
        store.collections.clear()  # dropped between validation and the upsert

    store.validate = drop_then_validate  # type: ignore[method-assign]
    result = process(processor, messages)
    assert result.items[0].dead_letter is not None
    assert result.items[0].dead_letter.reason == "unknown_collection"


def test_inference_outage_propagates_after_retries_and_stores_nothing() -> None:
    store = FakeStore()
    processor = make_processor(FakeFetcher(), FakeEmbedder(failures=10), store)
    with pytest.raises(InferenceUnavailableError):
        process(processor, [FakeMessage(event("a", InlineImage(data=png(1))), 0)])
    assert store.rows == {}


def test_inference_recovers_within_the_retries() -> None:
    store = FakeStore()
    processor = make_processor(FakeFetcher(), FakeEmbedder(failures=2), store)
    result = process(processor, [FakeMessage(event("a", InlineImage(data=png(1))), 0)])
    assert result.items[0].outcome is Outcome.STORED


def test_older_events_never_overwrite_newer_ones() -> None:
    store = FakeStore()
    embedder = FakeEmbedder()
    processor = make_processor(FakeFetcher(), embedder, store)
    process(processor, [FakeMessage(event("a", InlineImage(data=png(100)), version=5), 0)])
    result = process(processor, [FakeMessage(event("a", InlineImage(data=png(30)), version=4), 1)])
    assert (
        result.items[0].outcome is Outcome.SKIPPED
        and result.items[0].skip_reason == "stale_version"
    )
    assert store.rows["a"].event_version == 5


def test_same_image_and_model_skips_inference_but_updates_newer_metadata() -> None:
    store = FakeStore()
    embedder = FakeEmbedder()
    processor = make_processor(FakeFetcher(), embedder, store)
    process(processor, [FakeMessage(event("a", InlineImage(data=png(100)), version=1), 0)])
    assert embedder.batches == [1]
    same = process(processor, [FakeMessage(event("a", InlineImage(data=png(100)), version=1), 1)])
    assert same.items[0].skip_reason == "unchanged"
    newer = IngestEvent(
        id="a", image=InlineImage(data=png(100)), version=2, metadata={"tag": "new"}
    )
    result = process(processor, [FakeMessage(encode_event(newer), 2)])
    assert result.items[0].outcome is Outcome.STORED
    assert embedder.batches == [1]  # no second inference
    assert store.rows["a"].metadata == {"tag": "new"} and store.rows["a"].event_version == 2


def test_only_the_newest_version_in_a_batch_is_processed() -> None:
    store = FakeStore()
    processor = make_processor(FakeFetcher(), FakeEmbedder(), store)
    result = process(
        processor,
        [
            FakeMessage(event("a", InlineImage(data=png(10)), version=3), 0),
            FakeMessage(event("a", InlineImage(data=png(20)), version=1), 1),
        ],
    )
    assert [item.outcome for item in result.items] == [Outcome.STORED, Outcome.SKIPPED]
    assert store.rows["a"].event_version == 3


# The stale-version guard: own writes, versions in flight, Strong reads only after an assignment.


def _at(offset: int, event_id: str, version: int, image: ImageRef, partition: int = 0) -> Any:
    return FakeMessage(event(event_id, image, version=version), offset, partition_=partition)


def test_a_stale_replay_is_skipped_without_a_download_or_a_strong_read() -> None:
    store = FakeStore()
    fetcher = FakeFetcher({"/new.png": [png(100)], "/old.png": [png(30)]})
    processor = make_processor(fetcher, FakeEmbedder(), store)
    process(processor, [_at(0, "a", 5, PathImage(path="/new.png"))])
    assert store.reads == ["Strong"]  # the first lookup after the assignment
    replay = FakeMessage(
        event("a", PathImage(path="/old.png"), version=4),
        1,
        headers_=[(HEADER_RETRY_ATTEMPTS, b"2"), ("trident.dlq.reason", b"timeout")],
    )
    result = process(processor, [replay])
    assert result.items[0].outcome is Outcome.SKIPPED
    assert result.items[0].skip_reason == "stale_version"
    assert fetcher.paths == ["/new.png"]  # the stale image was never downloaded
    assert store.reads == ["Strong"]  # known from the worker's own write: no read at all
    assert store.rows["a"].event_version == 5


def test_reordered_versions_within_and_across_batches_keep_the_newest() -> None:
    store = FakeStore()
    processor = make_processor(FakeFetcher(), FakeEmbedder(), store)
    first = process(
        processor,
        [
            _at(0, "a", 3, InlineImage(data=png(10))),
            _at(1, "a", 1, InlineImage(data=png(20))),  # older, after newer, same batch
            _at(2, "b", 1, InlineImage(data=png(30))),
        ],
    )
    assert [i.outcome for i in first.items] == [Outcome.STORED, Outcome.SKIPPED, Outcome.STORED]
    second = process(
        processor,
        [
            _at(3, "a", 2, InlineImage(data=png(40))),  # older, a later batch
            _at(4, "c", 1, InlineImage(data=png(50))),
        ],
    )
    assert second.items[0].skip_reason == "stale_version"
    assert second.items[1].outcome is Outcome.STORED
    assert store.rows["a"].event_version == 3
    # Only "c" needed reading, and this worker wrote since the assignment: Session suffices.
    assert store.reads == ["Strong", "Session"]


def test_the_same_record_again_is_unchanged_and_never_embedded_twice() -> None:
    store = FakeStore()
    embedder = FakeEmbedder()
    processor = make_processor(FakeFetcher(), embedder, store)
    record = _at(0, "a", 7, InlineImage(data=png(60)))
    process(processor, [record])
    again = process(processor, [record])
    assert again.items[0].skip_reason == "unchanged"
    assert embedder.batches == [1]


def test_an_older_version_in_a_later_batch_loses_to_a_newer_one_still_in_flight() -> None:
    store = FakeStore()
    ownership = Ownership()
    ownership.assign([PARTITION])
    processor = make_processor(FakeFetcher(), FakeEmbedder(), store, ownership=ownership)
    k = _batch(processor, ownership, [_at(0, "a", 5, InlineImage(data=png(90)))])
    older = _batch(
        processor,
        ownership,
        [_at(1, "a", 3, InlineImage(data=png(10))), _at(2, "b", 1, InlineImage(data=png(11)))],
    )
    newer = _batch(processor, ownership, [_at(3, "a", 8, InlineImage(data=png(12)))])
    # The later batches are screened before batch k is written, as in the pipelined worker.
    for batch in (k, older, newer):
        processor.prepare(batch)
    assert older.items[0].skip_reason == "stale_version"  # k's version 5 is in flight
    assert newer.items[0].pending  # 8 is newer than anything stored or in flight
    for batch in (k, older, newer):
        processor.embed(batch)
        processor.store(batch)
        processor.release(batch)
    assert [r.event_version for _, r in store.backend.history if r.id == "a"] == [5, 8]


def test_a_new_owner_never_writes_an_older_version_over_the_previous_owners() -> None:
    """Partition 0 moves from worker A to worker B, which has written (to partition 1) before
    it got partition 0: its Session horizon predates A's last write, so B must read Strong."""
    milvus = FakeMilvus()
    a_store, b_store = FakeStore(backend=milvus), FakeStore(backend=milvus)
    a_owns, b_owns = Ownership(), Ownership()
    a_owns.assign([PARTITION])
    b_owns.assign([("ingest", 1)])
    a = make_processor(FakeFetcher(), FakeEmbedder(), a_store, ownership=a_owns)
    b = make_processor(FakeFetcher(), FakeEmbedder(), b_store, ownership=b_owns)
    process(b, [_at(0, "y", 1, InlineImage(data=png(5)), partition=1)])
    process(a, [_at(7, "x", 5, InlineImage(data=png(6)))])
    a_owns.release([PARTITION])  # the rebalance: A lets go, then B is assigned partition 0
    a.fence()
    b_owns.assign([PARTITION])
    result = process(b, [_at(6, "x", 3, InlineImage(data=png(7)))])  # an older replay
    assert result.items[0].skip_reason == "stale_version"
    assert b_store.reads[-1] == "Strong"
    assert milvus.rows_as_of(milvus.clock)["x"].event_version == 5


def test_a_partition_given_back_forgets_what_was_written_before_it_left() -> None:
    milvus = FakeMilvus()
    a_store, b_store = FakeStore(backend=milvus), FakeStore(backend=milvus)
    a_owns, b_owns = Ownership(), Ownership()
    a_owns.assign([PARTITION])
    a = make_processor(FakeFetcher(), FakeEmbedder(), a_store, ownership=a_owns)
    b = make_processor(FakeFetcher(), FakeEmbedder(), b_store, ownership=b_owns)
    process(a, [_at(0, "x", 5, InlineImage(data=png(6)))])
    a_owns.release([PARTITION])
    b_owns.assign([PARTITION])
    process(b, [_at(1, "x", 7, InlineImage(data=png(8)))])  # B writes a newer version
    b_owns.release([PARTITION])
    a_owns.assign([PARTITION])  # ... and the partition comes back to A
    result = process(a, [_at(2, "x", 6, InlineImage(data=png(9)))])
    assert result.items[0].skip_reason == "stale_version"  # A's memory of 5 is void
    assert milvus.rows_as_of(milvus.clock)["x"].event_version == 7


def test_rows_of_a_partition_revoked_mid_batch_are_not_written() -> None:
    store = FakeStore()
    ownership = Ownership()
    ownership.assign([PARTITION, ("ingest", 1)])
    processor = make_processor(FakeFetcher(), FakeEmbedder(), store, ownership=ownership)
    batch = _batch(
        processor,
        ownership,
        [
            _at(0, "kept", 1, InlineImage(data=png(1))),
            _at(0, "moved", 1, InlineImage(data=png(2)), partition=1),
        ],
    )
    processor.prepare(batch)
    processor.embed(batch)
    ownership.release([("ingest", 1)])  # revoked while the batch was being embedded
    processor.fence()
    processor.store(batch)
    assert [i.outcome for i in batch.items] == [Outcome.STORED, Outcome.UNFINISHED]
    assert set(store.rows) == {"kept"}


def test_a_cancelled_batch_writes_nothing() -> None:
    store = FakeStore()
    ownership = Ownership()
    ownership.assign([PARTITION])
    processor = make_processor(FakeFetcher(), FakeEmbedder(), store, ownership=ownership)
    batch = _batch(processor, ownership, [_at(0, "a", 1, InlineImage(data=png(1)))])
    processor.prepare(batch)
    processor.embed(batch)
    batch.cancelled.set()
    with pytest.raises(BatchAbandonedError):
        processor.store(batch)
    processor.release(batch)
    assert store.rows == {}


def _batch(processor: BatchProcessor, ownership: Ownership, messages: list[Any]) -> Batch:
    """A batch stamped as the consumer loop stamps it: each record with its assignment."""
    records = []
    for message in messages:
        owner = ownership.current((message.topic(), message.partition()))
        assert owner is not None
        records.append((message, owner))
    return processor.batch(records)


def test_events_naming_a_collection_without_an_index_are_dead_lettered() -> None:
    # Made elsewhere without a vector index: the store refuses it clearly (a conflict), and its
    # records go to the dead-letter topic; the worker goes on.
    store = FakeStore(collections={"images", "bare"}, unindexed={"bare"})
    messages = [
        FakeMessage(event("a", InlineImage(data=png(1)), collection="bare"), 0),
        FakeMessage(event("b", InlineImage(data=png(2))), 1),
    ]
    result = process(make_processor(FakeFetcher(), FakeEmbedder(), store), messages)
    assert [item.outcome for item in result.items] == [Outcome.DEAD, Outcome.STORED]
    dead = result.items[0].dead_letter
    assert dead is not None and dead.reason == "no_vector_index"


def _cancel_after(event: threading.Event, seconds: float) -> threading.Timer:
    timer = threading.Timer(seconds, event.set)
    timer.start()
    return timer


def test_a_cancel_during_the_fetch_backoff_returns_at_once() -> None:
    # An 8 s backoff between fetch rounds: cancelled 0.2 s into it, the stage returns promptly
    # and leaves the image to be fetched again later.
    flaky = FetchUnavailableError("503", reason=Reason.HTTP_SERVER_ERROR)
    fetcher = FakeFetcher({"/down.jpg": [flaky]})
    ownership = Ownership()
    ownership.assign([PARTITION])
    processor = make_processor(
        fetcher, FakeEmbedder(), FakeStore(), ownership=ownership, backoff_s=8.0
    )
    batch = _batch(processor, ownership, [_at(0, "down", 1, PathImage(path="/down.jpg"))])
    timer = _cancel_after(batch.cancelled, 0.2)
    began = time.monotonic()
    processor.prepare(batch)
    elapsed = time.monotonic() - began
    timer.cancel()
    assert elapsed < 1.0
    assert fetcher.calls == 1 and batch.items[0].outcome is Outcome.UNFINISHED
    with pytest.raises(BatchAbandonedError):
        processor.embed(batch)


def test_a_cancel_during_an_outage_backoff_returns_at_once() -> None:
    # Triton down, an 8 s backoff before the next attempt: cancelled 0.2 s into it, the stage
    # gives up with the outage's error at once, without another call.
    embedder = FakeEmbedder(failures=100)
    ownership = Ownership()
    ownership.assign([PARTITION])
    processor = make_processor(
        FakeFetcher(), embedder, FakeStore(), ownership=ownership, backoff_s=8.0
    )
    batch = _batch(processor, ownership, [_at(0, "a", 1, InlineImage(data=png(1)))])
    processor.prepare(batch)
    timer = _cancel_after(batch.cancelled, 0.2)
    began = time.monotonic()
    with pytest.raises(InferenceUnavailableError):
        processor.embed(batch)
    elapsed = time.monotonic() - began
    timer.cancel()
    assert elapsed < 1.0
    assert embedder.failures == 99  # one attempt, none after the cancel


# Deletes: tombstones on the ingest topic, under the same version rules as upserts.


def tombstone(
    offset: int,
    event_id: str | bytes | None,
    version: int | None = None,
    *,
    collection: str | None = None,
    partition: int = 0,
    headers: list[tuple[str, bytes]] | None = None,
) -> FakeMessage:
    """A tombstone as other Kafka tools write it: the id as key, no value, our headers."""
    extra = list(headers or [])
    if version is not None:
        extra.append((HEADER_VERSION, str(version).encode()))
    if collection is not None:
        extra.append((HEADER_COLLECTION, collection.encode()))
    key = event_id.encode() if isinstance(event_id, str) else event_id
    return FakeMessage(None, offset, key_=key, headers_=extra, partition_=partition)


def upsert(offset: int, event_id: str, version: int, shade: int = 40, partition: int = 0) -> Any:
    return _at(offset, event_id, version, InlineImage(data=png(shade)), partition=partition)


def test_a_delete_removes_the_row_keeps_its_tombstone_and_needs_no_inference() -> None:
    store = FakeStore()
    embedder = FakeEmbedder()
    fetcher = FakeFetcher()
    processor = make_processor(fetcher, embedder, store)
    process(processor, [upsert(0, "a", 1), upsert(1, "b", 1, shade=90)])
    calls = (fetcher.calls, list(embedder.batches))
    result = process(processor, [tombstone(2, "a", 2)])
    assert result.items[0].outcome is Outcome.DELETED
    assert set(store.rows) == {"b"} and store.tombstones == {"a": 2}
    assert (fetcher.calls, embedder.batches) == calls  # no fetch, no inference
    assert processor._metrics.deletes.labels("applied")._value.get() == 1


def test_a_delete_older_than_the_stored_row_is_skipped() -> None:
    store = FakeStore()
    processor = make_processor(FakeFetcher(), FakeEmbedder(), store)
    process(processor, [upsert(0, "a", 5)])
    result = process(processor, [tombstone(1, "a", 4)])
    assert result.items[0].outcome is Outcome.SKIPPED
    assert result.items[0].skip_reason == "stale_version"
    assert store.rows["a"].event_version == 5 and store.tombstones == {} and store.deletes == 0
    assert processor._metrics.deletes.labels("stale")._value.get() == 1


def test_an_upsert_older_than_a_delete_never_brings_the_id_back_nor_is_fetched() -> None:
    store = FakeStore()
    fetcher = FakeFetcher({"/old.png": [png(5)]})
    processor = make_processor(fetcher, FakeEmbedder(), store)
    process(processor, [upsert(0, "a", 3)])
    process(processor, [tombstone(1, "a", 5)])
    result = process(processor, [_at(2, "a", 4, PathImage(path="/old.png"))])
    assert result.items[0].skip_reason == "stale_version"
    assert fetcher.paths == [] and "a" not in store.rows


def test_after_a_restart_a_rebalance_or_a_replay_the_tombstone_still_wins() -> None:
    """A new worker (nothing remembered) reads the tombstone from the store, Strong; so does
    one that took the partition over; a replayed older upsert is skipped by both."""
    milvus = FakeMilvus()
    first = make_processor(FakeFetcher(), FakeEmbedder(), FakeStore(backend=milvus))
    process(first, [upsert(0, "a", 3), tombstone(1, "a", 5)])
    assert milvus.versions_as_of(milvus.clock)["a"].deleted

    restarted_store = FakeStore(backend=milvus)
    restarted = make_processor(FakeFetcher(), FakeEmbedder(), restarted_store)
    replayed = FakeMessage(
        event("a", InlineImage(data=png(7)), version=4),
        2,
        headers_=[("trident.replay.count", b"1")],
    )
    result = process(restarted, [replayed])
    assert result.items[0].skip_reason == "stale_version"
    assert restarted_store.reads == ["Strong"]
    # An older delete too: a newer tombstone makes it stale.
    assert process(restarted, [tombstone(3, "a", 4)]).items[0].skip_reason == "stale_version"
    assert "a" not in milvus.rows_as_of(milvus.clock)


def test_a_delete_naming_no_version_takes_the_record_timestamp() -> None:
    store = FakeStore()
    processor = make_processor(FakeFetcher(), FakeEmbedder(), store)
    message = tombstone(0, "a")
    message.timestamp_ms = 1_700_000_000_123
    process(processor, [message])
    assert store.tombstones == {"a": 1_700_000_000_123_999}


def test_equal_versions_the_later_record_wins_across_batches() -> None:
    store = FakeStore()
    processor = make_processor(FakeFetcher(), FakeEmbedder(), store)
    process(processor, [upsert(0, "a", 5)])
    assert process(processor, [tombstone(1, "a", 5)]).items[0].outcome is Outcome.DELETED
    assert "a" not in store.rows
    # The same upsert again, after the delete at its version: written again, never "unchanged".
    again = process(processor, [upsert(2, "a", 5)])
    assert again.items[0].outcome is Outcome.STORED
    assert store.rows["a"].event_version == 5


@pytest.mark.parametrize(
    ("records", "outcomes", "stored"),
    [
        # Same version: the later record (by offset) wins.
        (lambda: [upsert(0, "a", 5), tombstone(1, "a", 5)], ["skipped", "deleted"], False),
        (lambda: [tombstone(0, "a", 5), upsert(1, "a", 5)], ["skipped", "stored"], True),
        # Else the newer version, whatever the order.
        (lambda: [tombstone(0, "a", 6), upsert(1, "a", 5)], ["deleted", "skipped"], False),
        (lambda: [upsert(0, "a", 7), tombstone(1, "a", 6)], ["stored", "skipped"], True),
    ],
    ids=["upsert-then-delete", "delete-then-upsert", "newer-delete-first", "newer-upsert-first"],
)
def test_a_delete_and_an_upsert_of_one_id_in_one_batch(
    records: Callable[[], list[Any]], outcomes: list[str], stored: bool
) -> None:
    store = FakeStore()
    result = process(make_processor(FakeFetcher(), FakeEmbedder(), store), records())
    assert [item.outcome.value for item in result.items] == outcomes
    assert all(i.skip_reason == "superseded" for i in result.items if i.outcome.value == "skipped")
    assert ("a" in store.rows) is stored


def test_a_delete_of_an_id_never_stored_is_no_error_and_keeps_its_tombstone() -> None:
    store = FakeStore()
    processor = make_processor(FakeFetcher(), FakeEmbedder(), store)
    result = process(processor, [tombstone(0, "never-stored", 9)])
    assert result.items[0].outcome is Outcome.DELETED and result.items[0].dead_letter is None
    assert store.tombstones == {"never-stored": 9}
    # ... so an older upsert arriving later (a re-published retry) stays out.
    assert process(processor, [upsert(1, "never-stored", 8)]).items[0].outcome is Outcome.SKIPPED


def test_a_delete_in_flight_makes_an_older_upsert_of_a_later_batch_stale() -> None:
    store = FakeStore()
    ownership = Ownership()
    ownership.assign([PARTITION])
    processor = make_processor(FakeFetcher(), FakeEmbedder(), store, ownership=ownership)
    deleting = _batch(processor, ownership, [tombstone(0, "a", 5)])
    older = _batch(processor, ownership, [upsert(1, "a", 4)])
    for batch in (deleting, older):
        processor.prepare(batch)
    assert older.items[0].skip_reason == "stale_version"  # the delete's claim is in flight
    for batch in (deleting, older):
        processor.embed(batch)
        processor.store(batch)
        processor.release(batch)
    assert store.tombstones == {"a": 5} and store.rows == {}


@pytest.mark.parametrize(
    ("message", "stage", "reason"),
    [
        (lambda: tombstone(0, None, 5), "decode_event", "empty_event"),
        (lambda: tombstone(0, b"", 5), "decode_event", "empty_event"),
        (lambda: tombstone(0, b"\xff\xfe", 5), "decode_event", "schema_invalid"),
        (lambda: tombstone(0, "a\x00b", 5), "decode_event", "schema_invalid"),
        (
            lambda: tombstone(0, "a", headers=[(HEADER_VERSION, b"soon")]),
            "decode_event",
            "schema_invalid",
        ),
        (
            lambda: tombstone(0, "a", headers=[(HEADER_VERSION, b"-3")]),
            "decode_event",
            "schema_invalid",
        ),
        (lambda: tombstone(0, "a", 5, collection="no-dashes"), "decode_event", "schema_invalid"),
        (lambda: tombstone(0, "猫" * 100, 5), "decode_event", "id_too_long"),
        (lambda: tombstone(0, "a", 5, collection="typo"), "delete", "unknown_collection"),
    ],
    ids=[
        "no-key",
        "empty-key",
        "key-not-utf8",
        "key-with-nul",
        "version-not-a-number",
        "version-negative",
        "bad-collection-name",
        "id-too-long",
        "unknown-collection",
    ],
)
def test_a_bad_tombstone_is_dead_lettered_with_its_reason(
    message: Callable[[], FakeMessage], stage: str, reason: str
) -> None:
    store = FakeStore()
    result = process(
        make_processor(FakeFetcher(), FakeEmbedder(), store), [message(), upsert(1, "ok", 1)]
    )
    bad, good = result.items
    assert bad.outcome is Outcome.DEAD and bad.dead_letter is not None
    assert (bad.dead_letter.stage.value, bad.dead_letter.reason) == (stage, reason)
    assert bad.dead_letter.message.value() is None  # the tombstone itself, to replay as it is
    assert good.outcome is Outcome.STORED and store.tombstones == {}


def test_a_delete_the_store_refuses_is_isolated_and_the_others_applied() -> None:
    store = FakeStore(refused={"bad"})
    processor = make_processor(FakeFetcher(), FakeEmbedder(), store)
    result = process(
        processor, [tombstone(0, "x", 1), tombstone(1, "bad", 1), tombstone(2, "y", 1)]
    )
    assert [i.outcome for i in result.items] == [Outcome.DELETED, Outcome.DEAD, Outcome.DELETED]
    dead = result.items[1].dead_letter
    assert dead is not None and (dead.stage.value, dead.reason) == ("delete", "row_rejected")
    assert store.tombstones == {"x": 1, "y": 1}


def test_a_store_outage_during_a_delete_is_never_a_dead_letter() -> None:
    store = FakeStore()
    processor = make_processor(FakeFetcher(), FakeEmbedder(), store)
    ownership = processor._ownership
    batch = _batch(processor, ownership, [tombstone(0, "a", 1)])
    processor.prepare(batch)
    processor.embed(batch)
    store.outage = True
    with pytest.raises(StoreUnavailableError):
        processor.store(batch)
    processor.release(batch)
    assert batch.items[0].dead_letter is None and store.tombstones == {}


def test_a_delete_of_a_partition_revoked_mid_batch_is_not_applied() -> None:
    store = FakeStore()
    ownership = Ownership()
    ownership.assign([PARTITION, ("ingest", 1)])
    processor = make_processor(FakeFetcher(), FakeEmbedder(), store, ownership=ownership)
    batch = _batch(
        processor, ownership, [tombstone(0, "kept", 1), tombstone(0, "moved", 1, partition=1)]
    )
    processor.prepare(batch)
    ownership.release([("ingest", 1)])
    processor.fence()
    processor.store(batch)
    assert [i.outcome for i in batch.items] == [Outcome.DELETED, Outcome.UNFINISHED]
    assert store.tombstones == {"kept": 1}
