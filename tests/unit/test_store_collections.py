"""Creating and describing collections with a fake Milvus: a creation the server refuses leaves
nothing behind, an existing collection of another dimension is a conflict, and a collection
without a vector index (made elsewhere) is refused clearly, never a crash."""

from __future__ import annotations

from typing import Any

import pytest
from pymilvus.exceptions import MilvusException

from engine import store as store_module
from engine.errors import CollectionConflictError, InvalidQueryError, TridentError
from engine.indexes import IndexSpec
from engine.records import VECTOR_FIELD
from engine.settings import MilvusSettings
from engine.store import VectorStore
from query_api.errors import _status_of


class _FakeMilvus:
    """Just enough of ``MilvusClient`` for collection management, with a server that refuses
    the index parameters it is told to (as Milvus 2.3.5 does, code 65535, after the collection
    exists)."""

    def __init__(self, *, refuse_index: bool = False) -> None:
        self.refuse_index = refuse_index
        self.collections: dict[str, dict[str, Any]] = {}
        self.dropped: list[str] = []

    def add(self, name: str, dimension: int, *, indexed: bool, field: str = VECTOR_FIELD) -> None:
        """A collection made elsewhere."""
        self.collections[name] = {"dim": dimension, "index": indexed, "field": field}

    def has_collection(self, name: str, **_: object) -> bool:
        return name in self.collections

    def create_collection(self, name: str, *, schema: Any, **_: object) -> None:
        assert "index_params" not in _  # created first, indexed second
        dim = next(f.params["dim"] for f in schema.fields if f.name == VECTOR_FIELD)
        self.add(name, dim, indexed=False)

    def create_index(self, name: str, index_params: Any, **_: object) -> None:
        if self.refuse_index:
            raise MilvusException(65535, "efConstruction out of range: [1, 2147483647]")
        self.collections[name]["index"] = True

    def describe_collection(self, name: str, **_: object) -> dict[str, Any]:
        found = self.collections[name]
        field = {"name": found["field"], "params": {"dim": found["dim"]}}
        return {"fields": [{"name": "id", "params": {}}, field], "description": "{}"}

    def describe_index(self, name: str, index_name: str, **_: object) -> dict[str, Any] | None:
        if not self.collections[name]["index"]:
            return None  # what pymilvus answers for a collection without one
        return {"index_type": "HNSW", "metric_type": "COSINE", "M": "16"}

    def list_indexes(self, name: str, **_: object) -> list[str]:
        return [VECTOR_FIELD] if self.collections[name]["index"] else []

    def drop_collection(self, name: str, **_: object) -> None:
        del self.collections[name]
        self.dropped.append(name)

    def load_collection(self, name: str, **_: object) -> None:
        if not self.collections[name]["index"]:
            raise MilvusException(700, "index not found")

    def query(self, name: str, **_: object) -> list[dict[str, int]]:
        return [{"count(*)": 0}]

    def close(self) -> None:
        pass


def _store(milvus: _FakeMilvus) -> VectorStore:
    store = VectorStore(MilvusSettings(dimension=8))
    store._client = milvus  # type: ignore[assignment]  # the connection, as if opened
    return store


def test_a_refused_index_leaves_no_collection_behind() -> None:
    milvus = _FakeMilvus(refuse_index=True)
    with pytest.raises(InvalidQueryError) as refused:
        _store(milvus).create_collection("c", index=IndexSpec(params={"efConstruction": 100}))
    assert refused.value.reason == "invalid_index"
    assert "efConstruction" in str(refused.value)
    assert milvus.collections == {} and milvus.dropped == ["c"]


def test_an_existing_collection_of_another_dimension_is_a_conflict_naming_both() -> None:
    milvus = _FakeMilvus()
    store = _store(milvus)
    assert store.create_collection("c", dimension=8) is True
    assert store.create_collection("c", dimension=8) is False  # the same: idempotent
    assert store.create_collection("c") is False  # the settings' dimension, 8
    with pytest.raises(CollectionConflictError) as conflict:
        store.create_collection("c", dimension=16)
    assert conflict.value.reason == "collection_conflict"
    assert "dimension 8, not 16" in str(conflict.value)
    assert milvus.collections["c"]["dim"] == 8  # left as it was
    assert _status_of(conflict.value) == 409


def test_a_collection_without_a_vector_index_is_a_clear_conflict(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(store_module, "INDEX_WAIT_S", 0.0)
    milvus = _FakeMilvus()
    milvus.add("bare", 8, indexed=False)
    store = _store(milvus)
    for call in (
        lambda: store.describe_collection("bare"),
        lambda: store.count("bare"),
        lambda: store.search([0.0] * 8, collection="bare"),
        lambda: store.create_collection("bare", dimension=8),
    ):
        with pytest.raises(CollectionConflictError) as conflict:
            call()
        assert conflict.value.reason == "no_vector_index"
        assert "drop it and create it again" in str(conflict.value)
        assert _status_of(conflict.value) == 409
    assert "bare" in milvus.collections  # made elsewhere: never dropped by a read


def test_a_collection_without_the_vector_field_is_a_conflict() -> None:
    milvus = _FakeMilvus()
    milvus.add("other", 8, indexed=True, field="vector")
    with pytest.raises(CollectionConflictError, match="no vector field 'embedding'"):
        _store(milvus).describe_collection("other")


def test_every_failure_of_a_creation_is_a_project_error() -> None:
    # Whatever the server refuses, the caller gets one of ours (the API never answers 500).
    milvus = _FakeMilvus(refuse_index=True)
    with pytest.raises(TridentError):
        _store(milvus).create_collection("c")


def test_a_collection_another_creator_is_still_indexing_is_waited_for() -> None:
    # Workers starting at once: this one finds the collection made a moment ago by another,
    # whose index comes just after.
    milvus = _FakeMilvus()
    milvus.add("c", 8, indexed=False)
    describe_index = milvus.describe_index
    looks: list[str] = []

    def indexed_on_the_second_look(name: str, index_name: str, **_: object) -> Any:
        looks.append(name)
        if len(looks) == 2:
            milvus.collections[name]["index"] = True
        return describe_index(name, index_name)

    milvus.describe_index = indexed_on_the_second_look  # type: ignore[method-assign]
    assert _store(milvus).create_collection("c", dimension=8) is False
    assert len(looks) >= 2
