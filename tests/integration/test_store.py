"""The Milvus adapter on the real server: collections are created on purpose, reads never create."""

from __future__ import annotations

import numpy as np
import pytest

from devstack.stack import LocalStack
from engine import indexes
from engine.errors import (
    CollectionConflictError,
    InvalidQueryError,
    InvalidRowError,
    StoreAuthenticationError,
    UnknownCollectionError,
)
from engine.indexes import IndexSpec
from engine.records import StoredRecord, StoredVersion, VectorRecord
from engine.store import VectorStore, collection_schema, tombstone_collection
from tests.integration.conftest import stored_ids, wait_for

pytestmark = pytest.mark.stack


@pytest.mark.parametrize(
    "spec",
    [
        IndexSpec(index_type="FLAT", metric="L2"),
        IndexSpec(index_type="IVF_FLAT", params={"nlist": 16}, search_params={"nprobe": 4}),
        IndexSpec(index_type="HNSW", params={"M": 8, "efConstruction": 64}),
    ],
    ids=lambda spec: spec.index_type,
)
def test_each_index_type_end_to_end(stack: LocalStack, unique: str, spec: IndexSpec) -> None:
    settings = stack.settings()
    store = VectorStore(settings.milvus)
    name = f"idx_{spec.index_type.lower()}_{unique}"
    try:
        assert store.create_collection(
            name, dimension=8, index=spec, description="probe", model_tag="tag-1"
        )
        assert not store.create_collection(name, dimension=8, index=spec)  # idempotent
        info = store.describe_collection(name)
        assert (info.dimension, info.description, info.model_tag) == (8, "probe", "tag-1")
        assert info.index.index_type == spec.index_type
        assert info.index.metric == spec.metric
        assert info.index.build_params() == spec.build_params()
        rng = np.random.default_rng(7)
        vectors = rng.normal(size=(20, 8)).astype(np.float32)
        store.upsert([VectorRecord(id=f"v{i}", vector=v) for i, v in enumerate(vectors)], name)
        assert store.count(name) == 20
        hits = store.search(vectors[3], top_k=3, collection=name)
        assert hits[0].id == "v3"
    finally:
        store.drop_collection(name)
        store.close()


def test_reads_of_a_missing_collection_never_create_it(stack: LocalStack, unique: str) -> None:
    store = VectorStore(stack.settings().milvus)
    name = f"missing_{unique}"
    try:
        for read in (
            lambda: store.count(name),
            lambda: store.get(["x"], name),
            lambda: store.stored_versions(["x"], name),
            lambda: store.search(np.ones(1280, dtype=np.float32), collection=name),
            lambda: store.upsert([VectorRecord(id="x", vector=np.ones(1280, np.float32))], name),
            lambda: store.drop_collection(name),
        ):
            with pytest.raises(UnknownCollectionError):
                read()
        assert not store.collection_exists(name)
        assert name not in store.list_collections()
        # A name Milvus refuses to look up names no collection: unknown, not an outage.
        assert not store.collection_exists("0_not_a_name")
        with pytest.raises(UnknownCollectionError):
            store.count("0_not_a_name")
    finally:
        store.close()


def test_rows_milvus_refuses_are_permanent_errors(stack: LocalStack, unique: str) -> None:
    """What the worker's bisecting relies on: Milvus refuses a whole request for one row (code
    1100), the adapter calls that permanent (not retriable), and the other rows alone pass."""
    store = VectorStore(stack.settings().milvus)
    name = f"refuse_{unique}"
    long_id = "猫" * 256  # 256 characters but 768 UTF-8 bytes: Milvus counts bytes
    try:
        store.create_collection(name, dimension=8, index=IndexSpec(index_type="FLAT"))
        bad = VectorRecord(id=long_id, vector=np.ones(8, np.float32))
        with pytest.raises(InvalidRowError) as checked:
            store.validate(bad, name)  # caught before writing...
        assert checked.value.reason == "id_too_long"
        good = [VectorRecord(id=f"g{i}", vector=np.ones(8, np.float32)) for i in range(3)]
        with pytest.raises(InvalidRowError) as refused:  # ...and by the server when not
            store.upsert([*good, bad], name)
        assert "exceeds max length" in str(refused.value)
        with pytest.raises(InvalidRowError):
            store.upsert([bad], name)
        assert store.upsert(good, name) == 3
        assert sorted(stored_ids(store, name)) == ["g0", "g1", "g2"]
        with pytest.raises(InvalidRowError) as wrong:
            store.validate(VectorRecord(id="short", vector=np.ones(5, np.float32)), name)
        assert wrong.value.reason == "wrong_dimension"
    finally:
        store.drop_collection(name)
        store.close()


def _unchecked(index_type: str, **params: int) -> IndexSpec:
    """A spec past this project's ranges, as if they were wider: what the server does with it."""
    return IndexSpec.model_construct(
        index_type=index_type, metric="COSINE", params=params, search_params={}
    )


def test_the_index_ranges_are_the_servers(stack: LocalStack, unique: str) -> None:
    """Each build parameter's maximum (and minimum) in engine.indexes is built by the server,
    one past the maximum is refused, and a refused creation leaves no collection behind."""
    store = VectorStore(stack.settings().milvus)
    name = f"ranges_{unique}"
    try:
        for index_type, parameters in indexes._BUILD.items():
            for parameter, allowed in parameters.items():
                for value in (allowed.minimum, allowed.maximum):
                    spec = IndexSpec(index_type=index_type, params={parameter: value})
                    assert store.create_collection(name, dimension=8, index=spec)
                    assert store.describe_collection(name).index.build_params()[parameter] == value
                    store.drop_collection(name)
                too_large = _unchecked(index_type, **{parameter: allowed.maximum + 1})
                with pytest.raises(InvalidQueryError) as refused:
                    store.create_collection(name, dimension=8, index=too_large)
                assert refused.value.reason == "invalid_index"
                assert parameter in str(refused.value)
                assert not store.collection_exists(name), (index_type, parameter)
    finally:
        if store.collection_exists(name):
            store.drop_collection(name)
        store.close()


def test_a_collection_without_an_index_is_a_conflict_never_a_crash(
    stack: LocalStack, unique: str
) -> None:
    store = VectorStore(stack.settings().milvus)
    name = f"bare_{unique}"
    try:
        # Made elsewhere (or by an earlier release whose index creation failed): no index.
        store._connect().create_collection(name, schema=collection_schema(8))
        for call in (
            lambda: store.describe_collection(name),
            lambda: store.count(name),
            lambda: store.search(np.ones(8, np.float32), collection=name),
            lambda: store.upsert([VectorRecord(id="x", vector=np.ones(8, np.float32))], name),
            lambda: store.create_collection(name, dimension=8),
        ):
            with pytest.raises(CollectionConflictError) as conflict:
                call()
            assert conflict.value.reason == "no_vector_index"
        assert store.collection_exists(name)  # never dropped by a read
    finally:
        store._connect().drop_collection(name)
        store.close()


def test_creating_a_collection_again_with_another_dimension_is_a_conflict(
    stack: LocalStack, unique: str
) -> None:
    store = VectorStore(stack.settings().milvus)
    name = f"dims_{unique}"
    flat = IndexSpec(index_type="FLAT")
    try:
        assert store.create_collection(name, dimension=8, index=flat)
        assert not store.create_collection(name, dimension=8, index=flat)
        with pytest.raises(CollectionConflictError) as conflict:
            store.create_collection(name, dimension=16, index=flat)
        assert "dimension 8, not 16" in str(conflict.value)
        assert store.describe_collection(name).dimension == 8
    finally:
        store.drop_collection(name)
        store.close()


@pytest.mark.parametrize("token", ["root:not-the-password", ""], ids=["wrong", "missing"])
def test_refused_credentials_are_an_authentication_error_not_an_outage(
    stack: LocalStack, token: str
) -> None:
    settings = stack.settings().milvus.model_copy(update={"token": token})
    store = VectorStore(settings)
    try:
        with pytest.raises(StoreAuthenticationError) as refused:
            store.list_collections()
        assert "authentication failed" in str(refused.value)
        assert "milvus.token" in str(refused.value)
    finally:
        store.close()


# Deletes and single-record reads -------------------------------------------------------------

# Ids whose quotes, backslashes, slashes and non-ASCII letters must name themselves alone.
AWKWARD_IDS = ["a", "b", "a','b", "it's", 'say "hi"', "back\\slash", "猫/子/ü", "dir/file.jpg"]


def test_deletes_keep_tombstones_beside_the_rows_they_remove(
    stack: LocalStack, unique: str
) -> None:
    store = VectorStore(stack.settings().milvus)
    name = f"deletes_{unique}"
    companion = tombstone_collection(name)
    try:
        store.create_collection(name, dimension=8, index=IndexSpec(index_type="FLAT"))
        store.upsert(
            [
                VectorRecord(
                    id=i,
                    vector=np.ones(8, np.float32),
                    metadata={"n": n},
                    source=f"/images/{n}.png",
                    content_sha256="ab" * 32,
                    model_version="m1",
                    event_version=3,
                    ingested_at_ms=1_000 + n,
                )
                for n, i in enumerate(AWKWARD_IDS)
            ],
            name,
        )
        assert set(store.stored_versions(AWKWARD_IDS, name)) == set(AWKWARD_IDS)
        assert not store._has(companion)  # made on the first delete, not before

        deleted = ["a','b", "it's", 'say "hi"', "back\\slash", "猫/子/ü"]
        store.delete([(i, 4) for i in deleted] + [("never-stored", 9)], name)

        assert sorted(stored_ids(store, name)) == sorted({"a", "b", "dir/file.jpg"})
        found = store.stored_versions([*AWKWARD_IDS, "never-stored", "nothing"], name)
        assert {i: f for i, f in found.items() if f.deleted} == {
            **{i: StoredVersion.tombstone(4) for i in deleted},
            "never-stored": StoredVersion.tombstone(9),
        }
        assert found["a"] == StoredVersion(3, "ab" * 32, "m1") and "nothing" not in found
        # A Session read in this process sees them at once, as the version guard relies on.
        assert store.stored_versions(deleted, name, consistency="Session") == {
            i: StoredVersion.tombstone(4) for i in deleted
        }
        # Deleting again is no error and changes nothing.
        store.delete([(i, 4) for i in deleted], name)
        assert sorted(stored_ids(store, name)) == sorted({"a", "b", "dir/file.jpg"})

        # The companion is no collection of its own: hidden, reserved, dropped with its own.
        assert companion not in store.list_collections() and name in store.list_collections()
        assert not store.collection_exists(companion)
        with pytest.raises(UnknownCollectionError):
            store.count(companion)
        with pytest.raises(CollectionConflictError):
            store.create_collection(companion, dimension=8)
    finally:
        store.drop_collection(name)
        assert not store._has(companion) and not store._has(name)
        store.close()


def test_one_record_and_its_tombstone_read_alone(stack: LocalStack, unique: str) -> None:
    store = VectorStore(stack.settings().milvus)
    name = f"item_{unique}"
    record = VectorRecord(
        id="猫/it's",
        vector=np.ones(8, np.float32),
        metadata={"tags": ["x"], "n": 1},
        source="https://example.org/cat.png",
        content_sha256="cd" * 32,
        model_version="m2",
        event_version=7,
        ingested_at_ms=1_700_000_000_000,
    )
    try:
        store.create_collection(name, dimension=8, index=IndexSpec(index_type="FLAT"))
        store.upsert([record], name)
        # get_record and tombstone read Bounded (a few seconds' staleness): wait for the row.
        wait_for(lambda: store.get_record(record.id, name), timeout=15, what="the row")
        assert store.get_record(record.id, name) == StoredRecord(
            id=record.id,
            metadata={"tags": ["x"], "n": 1},
            source="https://example.org/cat.png",
            event_version=7,
            model_version="m2",
            content_sha256="cd" * 32,
            ingested_at_ms=1_700_000_000_000,
        )
        assert store.get_record("a", name) is None and store.tombstone(record.id, name) is None
        store.delete([(record.id, 8)], name)
        wait_for(lambda: store.get_record(record.id, name) is None, timeout=15, what="deleted")
        wait_for(lambda: store.tombstone(record.id, name), timeout=15, what="the tombstone")
        assert store.tombstone(record.id, name) == StoredVersion.tombstone(8)
        with pytest.raises(UnknownCollectionError):
            store.get_record(record.id, f"missing_{unique}")
        with pytest.raises(UnknownCollectionError):
            store.tombstone(record.id, f"missing_{unique}")
        with pytest.raises(UnknownCollectionError):
            store.delete([(record.id, 9)], f"missing_{unique}")
        assert not store._has(tombstone_collection(f"missing_{unique}"))
    finally:
        store.drop_collection(name)
        store.close()


def test_ids_matching_a_filter(stack: LocalStack, unique: str) -> None:
    store = VectorStore(stack.settings().milvus)
    name = f"matching_{unique}"
    try:
        store.create_collection(name, dimension=8, index=IndexSpec(index_type="FLAT"))
        store.upsert(
            [
                VectorRecord(id=f"r{n}", vector=np.ones(8, np.float32), metadata={"n": n})
                for n in range(10)
            ],
            name,
        )
        assert sorted(store.ids_matching('metadata["n"] < 3', name, limit=100)) == [
            "r0",
            "r1",
            "r2",
        ]
        assert len(store.ids_matching('metadata["n"] >= 0', name, limit=4)) == 4
        assert store.ids_matching('metadata["n"] > 100', name, limit=100) == []
        with pytest.raises(InvalidQueryError):
            store.ids_matching('metadata["n"] <', name, limit=10)
        with pytest.raises(InvalidQueryError):
            store.ids_matching("no_such_field == 1", name, limit=10)
    finally:
        store.drop_collection(name)
        store.close()
