"""Deletes through the stream, on the real stack: tombstones on the ingest topic, keyed by the
id, remove the row and keep the delete's version, so that no older upsert brings the id back,
not after a restart either; a bad or misaddressed tombstone is dead-lettered, stays a tombstone
there and is replayed as one.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from confluent_kafka import KafkaError, Message, Producer

from engine.kafka import producer_config
from engine.records import StoredVersion, VectorRecord
from engine.settings import Settings
from engine.store import VectorStore
from producer.dead_letters import DeadLetterReader, replay
from producer.publisher import EventPublisher
from schemas import HEADER_VERSION, DeleteEvent, IngestEvent, PathImage, encode_event
from schemas.dead_letter import HEADER_REASON, HEADER_STAGE
from tests.integration.conftest import (
    committed_everything,
    dead_letters,
    running_worker,
    small_images,
    stored_ids,
    wait_for,
)

pytestmark = pytest.mark.stack

# An id with a slash, quotes, a backslash and non-ASCII letters: it must name itself alone.
AWKWARD = "猫/ü 'x\" \\ y"

Record = tuple[bytes | None, bytes | None, list[tuple[str, str | bytes | None]]]


def _produce(settings: Settings, records: list[Record], topic: str | None = None) -> list[int]:
    """Produce ``(key, value, headers)`` records in this order (to ``topic``, default the ingest
    topic); their Kafka timestamps (ms)."""
    producer = Producer(producer_config(settings.kafka))
    timestamps: dict[int, int] = {}

    def delivered(index: int) -> Callable[[KafkaError | None, Message], None]:
        def done(error: KafkaError | None, message: Message) -> None:
            assert error is None, error
            timestamps[index] = message.timestamp()[1]

        return done

    for index, (key, value, headers) in enumerate(records):
        producer.produce(
            topic or settings.kafka.topic,
            key=key,
            value=value,
            headers=headers,
            on_delivery=delivered(index),
        )
    assert producer.flush(30) == 0
    return [timestamps[index] for index in range(len(records))]


def _upsert(event_id: str, image: Path, version: int) -> Record:
    event = IngestEvent(id=event_id, image=PathImage(path=str(image)), version=version)
    return event.id.encode(), encode_event(event), []


def _delete(event_id: str, version: int, collection: str | None = None) -> Record:
    delete = DeleteEvent(id=event_id, version=version, collection=collection)
    headers: list[tuple[str, str | bytes | None]] = [*delete.headers()]
    return delete.key(), None, headers


def _done(settings: Settings, what: str) -> None:
    wait_for(lambda: committed_everything(settings), timeout=180, what=what)
    time.sleep(0.5)  # the metrics of the last batch are counted after its commit


def _rows(store: VectorStore) -> dict[str, int]:
    """The rows stored (Strong), whatever tombstones say: id -> version."""
    rows = store._strong_query(
        store.default_collection, "rows", filter='id != ""', output_fields=["event_version"]
    )
    return {str(row["id"]): int(row["event_version"]) for row in rows}


def _tombstones(store: VectorStore, ids: list[str]) -> dict[str, int]:
    versions = store.stored_versions(ids)
    return {i: v.event_version for i, v in versions.items() if v.deleted}


def test_deletes_remove_rows_and_no_older_upsert_brings_them_back(
    settings: Settings, store: VectorStore, tmp_path: Path
) -> None:
    images = small_images(tmp_path / "images", 4)
    ids = ["keep", "gone/1", AWKWARD, "never-stored"]
    with running_worker(settings, worker_id="deleter") as worker:
        _produce(settings, [_upsert(i, images[n], 10) for n, i in enumerate(ids[:3])])
        _done(settings, "the upserts")
        assert _rows(store) == {"keep": 10, "gone/1": 10, AWKWARD: 10}

        timestamps = _produce(
            settings,
            [
                _delete("keep", 9),  # older than the row: skipped
                _delete("gone/1", 11),
                (AWKWARD.encode(), None, []),  # a plain tombstone: its timestamp is its version
                _delete("never-stored", 5),  # nothing to remove: no error
            ],
        )
        _done(settings, "the deletes")
        assert _rows(store) == {"keep": 10}
        assert _tombstones(store, ids) == {
            "gone/1": 11,
            AWKWARD: timestamps[2] * 1_000 + 999,
            "never-stored": 5,
        }
        assert dead_letters(settings) == []
        deletes = worker.metrics.deletes
        assert deletes.labels("applied")._value.get() == 3
        assert deletes.labels("stale")._value.get() == 1

        # Older upserts (a dead-letter replay, a re-published retry) stay out; a newer one
        # stores the id again.
        _produce(settings, [_upsert("gone/1", images[1], 10), _upsert(AWKWARD, images[2], 10)])
        _done(settings, "the older upserts")
        assert _rows(store) == {"keep": 10}
        assert worker.metrics.skipped.labels("stale_version")._value.get() == 3
        _produce(settings, [_upsert("gone/1", images[1], 12)])
        _done(settings, "the newer upsert")
        assert _rows(store) == {"keep": 10, "gone/1": 12}

    # A restarted worker remembers nothing: the tombstone, read from Milvus, still wins.
    with running_worker(settings, worker_id="restarted") as restarted:
        _produce(settings, [_upsert(AWKWARD, images[2], 10), _upsert("never-stored", images[3], 4)])
        _done(settings, "the upserts after the restart")
        assert restarted.metrics.skipped.labels("stale_version")._value.get() == 2
    assert _rows(store) == {"keep": 10, "gone/1": 12}
    assert store.count() == 2


def test_a_tombstone_that_fails_is_dead_lettered_as_a_tombstone_and_replayed_as_one(
    settings: Settings, store: VectorStore, tmp_path: Path
) -> None:
    later = f"later_{settings.milvus.collection}"
    images = small_images(tmp_path / "images", 1)
    try:
        with running_worker(settings, worker_id="dead-letters") as worker:
            # No key: deletes nothing. The compacted ingest topic refuses a record without a
            # key (INVALID_RECORD), so it comes through the retry topic, which workers read too.
            _produce(settings, [(None, None, [])], topic=settings.kafka.topics().retry)
            timestamps = _produce(
                settings,
                [
                    # No such collection (yet), and no version header: its timestamp is pinned.
                    (b"x", None, [("trident.collection", later.encode())]),
                    _upsert("after", images[0], 1),
                ],
            )
            _done(settings, "the tombstones")
            letters = sorted(dead_letters(settings), key=lambda m: m.key() or b"")
            assert [(m.key(), m.value()) for m in letters] == [(None, None), (b"x", None)]
            reasons = [
                (dict(m.headers())[HEADER_STAGE], dict(m.headers())[HEADER_REASON]) for m in letters
            ]
            assert reasons == [
                (b"decode_event", b"empty_event"),
                (b"delete", b"unknown_collection"),
            ]
            pinned = timestamps[0] * 1_000 + 999
            assert dict(letters[1].headers())[HEADER_VERSION] == str(pinned).encode()
            assert store.count() == 1

            # The collection is made; the replay publishes the tombstone again, as a tombstone
            # with its version: the worker deletes what is there.
            store.create_collection(later)
            vector = np.ones(settings.milvus.dimension, np.float32)
            store.upsert([VectorRecord(id="x", vector=vector, event_version=pinned - 1)], later)
            with DeadLetterReader(settings.kafka) as reader:
                chosen = [r for r in reader.read() if r.key == b"x"]
            with EventPublisher(settings.kafka) as publisher:
                report = replay(chosen, publisher)
            assert report.delivered == 1
            _done(settings, "the replayed tombstone")
            assert store.stored_versions(["x"], later) == {"x": StoredVersion.tombstone(pinned)}
            assert stored_ids(store, later) == []
            assert worker.metrics.deletes.labels("applied")._value.get() == 1
            assert len(dead_letters(settings)) == 2  # it did not fail again
    finally:
        if store.collection_exists(later):
            store.drop_collection(later)
