"""The batch processor with fake services: isolation, classification, retry budget, bisecting
rejected rows, version guard."""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from PIL import Image

from engine.errors import (
    BatchAbandonedError,
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
from schemas import IngestEvent, InlineImage, PathImage, encode_event
from schemas.dead_letter import HEADER_RETRY_ATTEMPTS
from schemas.events import ImageRef
from worker.metrics import WorkerMetrics
from worker.ownership import Ownership
from worker.pipeline import Batch, BatchProcessor, Outcome

DIM = 8
PARTITION = ("ingest", 0)


@dataclass
class FakeMessage:
    payload: bytes | None
    offset_: int
    key_: bytes | None = None
    headers_: list[tuple[str, bytes]] | None = None
    partition_: int = 0

    def value(self) -> bytes | None:
        return self.payload

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
    """What every client of one fake Milvus shares: each write, in order, with its timestamp."""

    history: list[tuple[int, VectorRecord]] = field(default_factory=list)
    clock: int = 0

    def rows_as_of(self, timestamp: int) -> dict[str, VectorRecord]:
        rows: dict[str, VectorRecord] = {}
        for at, record in self.history:
            if at <= timestamp:
                rows[record.id] = record
        return rows


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
    outage: bool = False
    last_write: int = 0
    reads: list[str] = field(default_factory=list)

    @property
    def rows(self) -> dict[str, VectorRecord]:
        return self.backend.rows_as_of(self.backend.clock)

    def _check(self, collection: str | None) -> None:
        if self.outage:
            raise StoreUnavailableError("milvus down")
        if (collection or "images") not in self.collections:
            raise UnknownCollectionError(f"no collection {collection}")

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
        rows = self.backend.rows_as_of(horizon)
        return {
            i: StoredVersion(rows[i].event_version, rows[i].content_sha256, rows[i].model_version)
            for i in ids
            if i in rows
        }

    def upsert(self, records: Sequence[VectorRecord], collection: str | None = None) -> int:
        self._check(collection)
        self.upserts += 1
        if any(record.id in self.refused for record in records):
            raise InvalidRowError("exceeds max length (code 1100)")
        self.backend.clock += 1
        self.last_write = self.backend.clock
        self.backend.history += [(self.backend.clock, record) for record in records]
        return len(records)

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
            attempts=3, initial_backoff_s=0.0, max_backoff_s=0.0, record_attempts=record_attempts
        ),
        model_version="m1",
        default_collection="images",
        metrics=WorkerMetrics(),
    )


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
    result = make_processor(fetcher, FakeEmbedder(), store).process(messages)  # type: ignore[arg-type]
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
    result = make_processor(fetcher, FakeEmbedder(), store).process(messages)  # type: ignore[arg-type]
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
    result = make_processor(fetcher, FakeEmbedder(), FakeStore()).process([again])  # type: ignore[list-item]
    item = result.items[0]
    assert item.outcome is Outcome.DEAD and fetcher.calls == 1
    assert item.dead_letter is not None
    assert (item.dead_letter.stage.value, item.dead_letter.reason) == ("fetch", "retries_exhausted")
    assert item.dead_letter.attempts == 7


def test_a_store_outage_is_never_a_per_record_failure() -> None:
    store = FakeStore(outage=True)
    processor = make_processor(FakeFetcher(), FakeEmbedder(), store)
    with pytest.raises(StoreUnavailableError):
        processor.process([FakeMessage(event("a", InlineImage(data=png(1))), 0)])  # type: ignore[list-item]


def test_rows_the_store_refuses_are_bisected_out_and_the_rest_stored() -> None:
    store = FakeStore(refused={"bad-2", "bad-5"}, invalid={"big-7"})
    messages = [
        FakeMessage(event(name, InlineImage(data=png(10 + i))), i)
        for i, name in enumerate(
            ["ok-0", "ok-1", "bad-2", "ok-3", "ok-4", "bad-5", "ok-6", "big-7", "ok-8"]
        )
    ]
    result = make_processor(FakeFetcher(), FakeEmbedder(), store).process(messages)  # type: ignore[arg-type]
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
    result = make_processor(FakeFetcher(), FakeEmbedder(), store).process(messages)  # type: ignore[arg-type]
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
    result = make_processor(FakeFetcher(), FakeEmbedder(), store).process(messages)  # type: ignore[arg-type]
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
    result = processor.process(messages)  # type: ignore[arg-type]
    assert result.items[0].dead_letter is not None
    assert result.items[0].dead_letter.reason == "unknown_collection"


def test_inference_outage_propagates_after_retries_and_stores_nothing() -> None:
    store = FakeStore()
    processor = make_processor(FakeFetcher(), FakeEmbedder(failures=10), store)
    with pytest.raises(InferenceUnavailableError):
        processor.process([FakeMessage(event("a", InlineImage(data=png(1))), 0)])  # type: ignore[list-item]
    assert store.rows == {}


def test_inference_recovers_within_the_retries() -> None:
    store = FakeStore()
    processor = make_processor(FakeFetcher(), FakeEmbedder(failures=2), store)
    result = processor.process([FakeMessage(event("a", InlineImage(data=png(1))), 0)])  # type: ignore[list-item]
    assert result.items[0].outcome is Outcome.STORED


def test_older_events_never_overwrite_newer_ones() -> None:
    store = FakeStore()
    embedder = FakeEmbedder()
    processor = make_processor(FakeFetcher(), embedder, store)
    processor.process([FakeMessage(event("a", InlineImage(data=png(100)), version=5), 0)])  # type: ignore[list-item]
    result = processor.process([FakeMessage(event("a", InlineImage(data=png(30)), version=4), 1)])  # type: ignore[list-item]
    assert (
        result.items[0].outcome is Outcome.SKIPPED
        and result.items[0].skip_reason == "stale_version"
    )
    assert store.rows["a"].event_version == 5


def test_same_image_and_model_skips_inference_but_updates_newer_metadata() -> None:
    store = FakeStore()
    embedder = FakeEmbedder()
    processor = make_processor(FakeFetcher(), embedder, store)
    processor.process([FakeMessage(event("a", InlineImage(data=png(100)), version=1), 0)])  # type: ignore[list-item]
    assert embedder.batches == [1]
    same = processor.process([FakeMessage(event("a", InlineImage(data=png(100)), version=1), 1)])  # type: ignore[list-item]
    assert same.items[0].skip_reason == "unchanged"
    newer = IngestEvent(
        id="a", image=InlineImage(data=png(100)), version=2, metadata={"tag": "new"}
    )
    result = processor.process([FakeMessage(encode_event(newer), 2)])  # type: ignore[list-item]
    assert result.items[0].outcome is Outcome.STORED
    assert embedder.batches == [1]  # no second inference
    assert store.rows["a"].metadata == {"tag": "new"} and store.rows["a"].event_version == 2


def test_only_the_newest_version_in_a_batch_is_processed() -> None:
    store = FakeStore()
    processor = make_processor(FakeFetcher(), FakeEmbedder(), store)
    result = processor.process(
        [  # type: ignore[list-item]
            FakeMessage(event("a", InlineImage(data=png(10)), version=3), 0),
            FakeMessage(event("a", InlineImage(data=png(20)), version=1), 1),
        ]
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
    processor.process([_at(0, "a", 5, PathImage(path="/new.png"))])
    assert store.reads == ["Strong"]  # the first lookup after the assignment
    replay = FakeMessage(
        event("a", PathImage(path="/old.png"), version=4),
        1,
        headers_=[(HEADER_RETRY_ATTEMPTS, b"2"), ("trident.dlq.reason", b"timeout")],
    )
    result = processor.process([replay])
    assert result.items[0].outcome is Outcome.SKIPPED
    assert result.items[0].skip_reason == "stale_version"
    assert fetcher.paths == ["/new.png"]  # the stale image was never downloaded
    assert store.reads == ["Strong"]  # known from the worker's own write: no read at all
    assert store.rows["a"].event_version == 5


def test_reordered_versions_within_and_across_batches_keep_the_newest() -> None:
    store = FakeStore()
    processor = make_processor(FakeFetcher(), FakeEmbedder(), store)
    first = processor.process(
        [
            _at(0, "a", 3, InlineImage(data=png(10))),
            _at(1, "a", 1, InlineImage(data=png(20))),  # older, after newer, same batch
            _at(2, "b", 1, InlineImage(data=png(30))),
        ]
    )
    assert [i.outcome for i in first.items] == [Outcome.STORED, Outcome.SKIPPED, Outcome.STORED]
    second = processor.process(
        [
            _at(3, "a", 2, InlineImage(data=png(40))),  # older, a later batch
            _at(4, "c", 1, InlineImage(data=png(50))),
        ]
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
    processor.process([record])
    again = processor.process([record])
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
    b.process([_at(0, "y", 1, InlineImage(data=png(5)), partition=1)])
    a.process([_at(7, "x", 5, InlineImage(data=png(6)))])
    a_owns.release([PARTITION])  # the rebalance: A lets go, then B is assigned partition 0
    a.fence()
    b_owns.assign([PARTITION])
    result = b.process([_at(6, "x", 3, InlineImage(data=png(7)))])  # an older replay
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
    a.process([_at(0, "x", 5, InlineImage(data=png(6)))])
    a_owns.release([PARTITION])
    b_owns.assign([PARTITION])
    b.process([_at(1, "x", 7, InlineImage(data=png(8)))])  # B writes a newer version
    b_owns.release([PARTITION])
    a_owns.assign([PARTITION])  # ... and the partition comes back to A
    result = a.process([_at(2, "x", 6, InlineImage(data=png(9)))])
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
