"""The Milvus adapter on the real server: collections are created on purpose, reads never create."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from devstack.stack import LocalStack
from engine.errors import InvalidRowError, UnknownCollectionError
from engine.indexes import IndexSpec
from engine.records import VectorRecord
from engine.store import VectorStore

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
        assert sorted(store.ids(name)) == ["g0", "g1", "g2"]
        with pytest.raises(InvalidRowError) as wrong:
            store.validate(VectorRecord(id="short", vector=np.ones(5, np.float32)), name)
        assert wrong.value.reason == "wrong_dimension"
    finally:
        store.drop_collection(name)
        store.close()


def test_the_stacks_milvus_runs_with_the_measured_write_settings(stack: LocalStack) -> None:
    # docs/PERFORMANCE.md's figures come from these settings; a stack started without them
    # would quietly measure (and test) another server.
    pid = stack.milvus.process.pid()
    assert pid is not None
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    assert {b"GOGC=400", b"GODEBUG=madvdontneed=0"} <= set(environ)
    config = yaml.safe_load((stack.milvus.configs / "milvus.yaml").read_text())
    assert config["queryNode"]["segcore"]["interimIndex"]["enableIndex"] is False
    assert config["rocksmq"]["compressionTypes"] == [0, 0, 0, 0, 0]
    assert config["dataNode"]["segment"]["insertBufSize"] == 64 * 1024 * 1024
