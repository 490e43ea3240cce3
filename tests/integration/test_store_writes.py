"""The store's write path on the real server: what ``VectorStore.upsert`` stores is what
pymilvus's rows API stores, replaces by id, refuses rows so that a batch can be bisected, is safe
from several threads, and is seen by the writer's own ``Session``-consistency reads."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest
from pymilvus import MilvusClient
from pymilvus.client import ts_utils

from devstack.stack import LocalStack
from engine.errors import InvalidRowError
from engine.records import RECORD_FIELDS, VECTOR_FIELD, VectorRecord
from engine.store import VectorStore, collection_schema

pytestmark = pytest.mark.stack

DIM = 1280
FIELDS = [*RECORD_FIELDS, VECTOR_FIELD]


@pytest.fixture
def store(stack: LocalStack) -> Iterator[VectorStore]:
    # Small chunks, so that even these small calls are sent as several requests in flight.
    chunked = VectorStore(stack.settings().milvus, upsert_chunk_rows=7, upsert_in_flight=3)
    yield chunked
    chunked.close()


@pytest.fixture(scope="module")
def raw(stack: LocalStack) -> Iterator[MilvusClient]:
    settings = stack.settings().milvus
    client = MilvusClient(uri=settings.uri, token=settings.token)
    yield client
    client.close()


@pytest.fixture(scope="module")
def collections(raw: MilvusClient) -> Iterator[dict[str, str]]:
    """One collection of the store's schema and one with a dynamic schema, as one made
    elsewhere may be; shared by the tests (each writes ids of its own), as creating and
    dropping collections is what costs most here."""
    suffix = uuid.uuid4().hex[:10]
    names = {"schema": f"writes_{suffix}", "dynamic-schema": f"writes_dyn_{suffix}"}
    try:
        for kind, name in names.items():
            schema = collection_schema(DIM)
            schema.enable_dynamic_field = kind == "dynamic-schema"
            index = raw.prepare_index_params()
            index.add_index(field_name=VECTOR_FIELD, index_type="FLAT", metric_type="COSINE")
            raw.create_collection(name, schema=schema, index_params=index)
        yield names
    finally:
        for name in names.values():
            if raw.has_collection(name):
                raw.drop_collection(name)


def _records(count: int, prefix: str, *, seed: int = 0, version: int = 1) -> list[VectorRecord]:
    rng = np.random.default_rng(seed)
    return [
        VectorRecord(
            id=f"{prefix}-{i:03d}-é",
            vector=rng.standard_normal(DIM, np.float32),
            metadata={"n": i, "tags": ["a", "猫"], "nested": {"x": i / 3}},
            source=f"/data/{i}.jpg",
            content_sha256=f"{i:064x}",
            model_version="tag-1",
            event_version=version,
            ingested_at_ms=1_700_000_000_000 + i,
        )
        for i in range(count)
    ]


def _stored(client: MilvusClient, name: str, ids: list[str]) -> dict[str, dict[str, Any]]:
    rows = client.get(name, ids=ids, output_fields=FIELDS, consistency_level="Strong")
    return {row["id"]: dict(row) for row in rows}


@pytest.mark.parametrize("kind", ["schema", "dynamic-schema"])
def test_upsert_stores_exactly_what_the_rows_api_stores(
    store: VectorStore, raw: MilvusClient, collections: dict[str, str], kind: str
) -> None:
    name = collections[kind]
    fast, rows_api = _records(30, "fast"), _records(30, "rows")  # same values, other ids
    assert store.upsert(fast, name) == 30
    raw.upsert(name, data=[r.to_row() for r in rows_api])
    got = _stored(raw, name, [r.id for r in fast])
    expected = _stored(raw, name, [r.id for r in rows_api])
    assert sorted(got) == sorted(r.id for r in fast) and len(expected) == 30
    for record, twin in zip(fast, rows_api, strict=True):
        row = got[record.id]
        assert {**row, "id": twin.id} == expected[twin.id]  # every field, $meta included
        vector = np.asarray(row.pop(VECTOR_FIELD), dtype=np.float32)
        assert vector.tobytes() == record.vector.tobytes()  # bit-equal
        assert row["metadata"] == record.metadata
        assert (row["source"], row["event_version"]) == (record.source, record.event_version)


def test_upserting_an_existing_id_replaces_it(
    store: VectorStore, raw: MilvusClient, collections: dict[str, str]
) -> None:
    name = collections["schema"]
    first = _records(10, "replace", seed=1, version=1)
    second = _records(4, "replace", seed=2, version=2)
    store.upsert(first, name)
    store.upsert(second, name)
    rows = raw.query(
        name, filter='id like "replace-%"', output_fields=["id"], consistency_level="Strong"
    )
    assert len(rows) == 10  # replaced, not added
    stored = _stored(raw, name, [r.id for r in first])
    for old, new in zip(first, second, strict=False):
        vector = np.asarray(stored[new.id][VECTOR_FIELD], np.float32).tobytes()
        assert stored[new.id]["event_version"] == 2
        assert vector == new.vector.tobytes() != old.vector.tobytes()
    assert all(stored[r.id]["event_version"] == 1 for r in first[4:])


def test_a_refused_row_fails_its_call_and_bisecting_isolates_it(
    store: VectorStore, raw: MilvusClient, collections: dict[str, str]
) -> None:
    """The worker's bisecting (``worker.pipeline``), over calls sent as several chunks."""
    name = collections["schema"]
    records = _records(40, "bisect")
    bad = VectorRecord(id="猫" * 256, vector=np.ones(DIM, np.float32))  # 768 UTF-8 bytes
    records.insert(27, bad)
    refused: list[VectorRecord] = []

    def write(batch: list[VectorRecord]) -> None:
        try:
            store.upsert(batch, name)
        except InvalidRowError:
            if len(batch) == 1:
                refused.extend(batch)
                return
            write(batch[: len(batch) // 2])
            write(batch[len(batch) // 2 :])

    with pytest.raises(InvalidRowError, match="exceeds max length"):
        store.upsert(records, name)
    write(records)
    assert refused == [bad]
    good = [r.id for r in records if r is not bad]
    assert sorted(_stored(raw, name, good)) == sorted(good)


def test_concurrent_upserts_from_several_threads(
    store: VectorStore, raw: MilvusClient, collections: dict[str, str]
) -> None:
    name = collections["schema"]
    batches = [_records(25, f"thread{n}", seed=n) for n in range(8)]
    with ThreadPoolExecutor(4) as pool:
        assert sum(pool.map(lambda b: store.upsert(b, name), batches)) == 200
    every = [r for batch in batches for r in batch]
    stored = _stored(raw, name, [r.id for r in every])
    assert len(stored) == 200
    for record in every:
        vector = np.asarray(stored[record.id][VECTOR_FIELD], np.float32)
        assert vector.tobytes() == record.vector.tobytes()


def test_the_writers_session_reads_see_its_upserts(
    stack: LocalStack, collections: dict[str, str]
) -> None:
    """``Session`` consistency (read-your-writes) waits for the timestamp pymilvus recorded at
    the client's last write: the store records it for its own upserts too."""
    name = collections["schema"]
    store = VectorStore(stack.settings().milvus)
    records = _records(20, "session")
    try:
        client = store._connect()
        address = client._get_connection().server_address
        before = ts_utils.get_collection_ts(name, address)
        store.upsert(records, name)
        assert ts_utils.get_collection_ts(name, address) > before
        rows = client.get(
            name, ids=[r.id for r in records], output_fields=["id"], consistency_level="Session"
        )
        assert sorted(row["id"] for row in rows) == sorted(r.id for r in records)
    finally:
        store.close()
