"""The Milvus adapter on the real server: collections are created on purpose, reads never create."""

from __future__ import annotations

import numpy as np
import pytest

from devstack.stack import LocalStack
from engine.errors import UnknownCollectionError
from engine.indexes import IndexSpec
from engine.store import VectorRecord, VectorStore

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
    finally:
        store.close()
