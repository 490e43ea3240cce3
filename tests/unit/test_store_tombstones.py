"""Deletes in the Milvus adapter with a fake Milvus: tombstones first, then rows; ids quoted so
they name themselves alone; the newer of row and tombstone answered; companion collections
reserved, hidden and dropped with their collection."""

from __future__ import annotations

import re
from typing import Any

import orjson
import pytest

from engine import store as store_module
from engine.errors import CollectionConflictError, InvalidQueryError, InvalidRowError
from engine.records import VECTOR_FIELD, StoredVersion
from engine.settings import MilvusSettings
from engine.store import (
    TOMBSTONE_SUFFIX,
    VectorStore,
    is_tombstone_collection,
    tombstone_collection,
)
from schemas.search import COLLECTION_NAME_PATTERN

MAIN = "pets"
COMPANION = f"pets{TOMBSTONE_SUFFIX}"


class _FakeMilvus:
    """Just enough of ``MilvusClient``: collections of rows keyed by id, and every call made."""

    def __init__(self) -> None:
        self.rows: dict[str, dict[str, dict[str, Any]]] = {MAIN: {}}
        self.calls: list[tuple[str, str]] = []
        self.reads: list[dict[str, Any]] = []

    def has_collection(self, name: str, **_: object) -> bool:
        return name in self.rows

    def create_collection(self, name: str, *, schema: Any, **_: object) -> None:
        self.calls.append(("create", name))
        self.rows[name] = {}

    def create_index(self, name: str, index_params: Any, **_: object) -> None:
        self.calls.append(("index", name))

    def load_collection(self, name: str, **_: object) -> None:
        self.calls.append(("load", name))

    def drop_collection(self, name: str, **_: object) -> None:
        self.calls.append(("drop", name))
        del self.rows[name]

    def list_collections(self, **_: object) -> list[str]:
        return list(self.rows)

    def describe_collection(self, name: str, **_: object) -> dict[str, Any]:
        field = {"name": VECTOR_FIELD, "params": {"dim": 8}}
        return {"fields": [{"name": "id", "params": {}}, field], "description": "{}"}

    def describe_index(self, name: str, index_name: str, **_: object) -> dict[str, Any]:
        return {"index_type": "HNSW", "metric_type": "COSINE", "M": "16"}

    def upsert(self, name: str, data: list[dict[str, Any]], **_: object) -> None:
        self.calls.append(("upsert", name))
        for row in data:
            self.rows[name][row["id"]] = row

    def delete(self, name: str, *, filter: str, **_: object) -> None:
        self.calls.append(("delete", name))
        for record_id in _ids_of(filter):
            self.rows[name].pop(record_id, None)

    def query(self, name: str, *, filter: str, output_fields: list[str], **kw: Any) -> list[Any]:
        self.reads.append({"name": name, **kw})
        rows = self.rows[name]
        return [{f: rows[i][f] for f in output_fields} for i in _ids_of(filter) if i in rows]

    def close(self) -> None:
        pass


def _ids_of(expression: str) -> list[str]:
    # The store writes ``id in [<JSON strings>]``: the list is a JSON array.
    assert expression.startswith("id in [")
    ids: list[str] = orjson.loads(expression[len("id in ") :])
    return ids


def _store(milvus: _FakeMilvus) -> VectorStore:
    store = VectorStore(MilvusSettings(dimension=8, collection=MAIN))
    store._client = milvus  # the connection, as if opened (the fake is duck-typed)
    return store


def _row(record_id: str, version: int, ingested_at_ms: int) -> dict[str, Any]:
    return {
        "id": record_id,
        "event_version": version,
        "content_sha256": "h",
        "model_version": "m",
        "ingested_at_ms": ingested_at_ms,
    }


def test_a_delete_writes_the_tombstones_first_then_removes_the_rows() -> None:
    milvus = _FakeMilvus()
    milvus.rows[MAIN] = {"a": _row("a", 1, 10), "b": _row("b", 1, 10)}
    _store(milvus).delete([("a", 2), ("never-stored", 3), ("a", 1)])
    assert milvus.calls == [
        ("create", COMPANION),
        ("index", COMPANION),
        ("load", COMPANION),
        ("upsert", COMPANION),
        ("delete", MAIN),
    ]
    assert set(milvus.rows[MAIN]) == {"b"}
    # Of an id given twice the highest version counts; an id never stored is no error.
    tombstones = {i: row["event_version"] for i, row in milvus.rows[COMPANION].items()}
    assert tombstones == {"a": 2, "never-stored": 3}


def test_an_id_holding_quotes_deletes_itself_and_no_other() -> None:
    milvus = _FakeMilvus()
    tricky = "a','b"  # pymilvus's own quoting would make this delete "a" and "b"
    milvus.rows[MAIN] = {i: _row(i, 1, 10) for i in ("a", "b", tricky, 'q"x\\')}
    _store(milvus).delete([(tricky, 2), ('q"x\\', 2)])
    assert set(milvus.rows[MAIN]) == {"a", "b"}


def test_the_newer_of_row_and_tombstone_is_the_stored_version() -> None:
    milvus = _FakeMilvus()
    store = _store(milvus)
    milvus.rows[MAIN] = {i: _row(i, 5, 100) for i in ("newer-row", "same-later-row", "row-only")}
    store.delete([("newer-row", 4), ("deleted", 5), ("same-later-row", 5)])
    milvus.rows[MAIN] = {
        "newer-row": _row("newer-row", 5, 100),
        # Written again at the delete's version, after it (a later record at an equal version).
        "same-later-row": _row("same-later-row", 5, 2**62),
        "row-only": _row("row-only", 5, 100),
        "deleted": _row("deleted", 5, 100),  # the row a delete left (it failed half-way)
    }
    found = store.stored_versions(["newer-row", "same-later-row", "row-only", "deleted", "nothing"])
    assert found == {
        "newer-row": StoredVersion(5, "h", "m"),
        "same-later-row": StoredVersion(5, "h", "m"),
        "row-only": StoredVersion(5, "h", "m"),
        "deleted": StoredVersion.tombstone(5),
    }
    assert store.tombstone("deleted") == StoredVersion.tombstone(5)
    assert store.tombstone("row-only") is None


def test_without_any_delete_no_companion_is_made_or_read() -> None:
    milvus = _FakeMilvus()
    milvus.rows[MAIN] = {"a": _row("a", 1, 10)}
    store = _store(milvus)
    assert store.stored_versions(["a"]) == {"a": StoredVersion(1, "h", "m")}
    assert store.tombstone("a") is None
    assert COMPANION not in milvus.rows and [r["name"] for r in milvus.reads] == [MAIN]


def test_reads_ask_for_the_consistency_they_were_given() -> None:
    milvus = _FakeMilvus()
    store = _store(milvus)
    store.delete([("a", 1)])
    store.stored_versions(["a"], consistency="Strong")
    assert [(r["name"], r["consistency_level"]) for r in milvus.reads] == [
        (MAIN, "Strong"),
        (COMPANION, "Strong"),
    ]
    milvus.reads.clear()
    store.get(["a"])
    assert "consistency_level" not in milvus.reads[0]  # the collection's default (Bounded)


def test_companion_names_are_reserved_hidden_and_dropped_with_their_collection() -> None:
    milvus = _FakeMilvus()
    store = _store(milvus)
    store.delete([("a", 1)])
    assert store.list_collections() == [MAIN]
    assert not store.collection_exists(COMPANION)
    with pytest.raises(CollectionConflictError):
        store.create_collection(COMPANION)
    milvus.calls.clear()
    store.drop_collection(MAIN)
    assert milvus.calls == [("drop", COMPANION), ("drop", MAIN)]  # tombstones first


@pytest.mark.parametrize("length", [1, 243, 244, 255])
def test_every_collection_name_has_a_valid_companion_of_its_own(length: int) -> None:
    name = "c" * length
    companion = tombstone_collection(name)
    assert re.fullmatch(COLLECTION_NAME_PATTERN, companion) and is_tombstone_collection(companion)
    assert companion != tombstone_collection(name[:-1] + "d")


def test_deletes_refused_before_any_call() -> None:
    milvus = _FakeMilvus()
    store = _store(milvus)
    for bad in [("", 1), ("x" * 257, 1), ("a", -1), ("a", 2**63)]:
        with pytest.raises(InvalidRowError) as caught:
            store.delete([bad])
        assert caught.value.stage is not None and caught.value.stage.value == "delete"
    assert milvus.calls == []


def test_ids_matching_refuses_a_blank_filter_and_a_limit_out_of_range() -> None:
    store = _store(_FakeMilvus())
    with pytest.raises(InvalidQueryError):
        store.ids_matching("  ", limit=10)
    for limit in (0, 16_385):
        with pytest.raises(InvalidQueryError):
            store.ids_matching('metadata["k"] == 1', limit=limit)


def test_a_session_read_of_tombstones_waits_for_the_last_write_to_either_collection(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The guard reads Session once this worker wrote to the collection since an assignment:
    the tombstones must be read as of that write too, though it went to the collection."""
    milvus = _FakeMilvus()
    store = _store(milvus)
    store.delete([("a", 1)])
    asked: list[list[str]] = []

    def last_write(client: object, names: list[str]) -> int:
        asked.append(list(names))
        return 42

    monkeypatch.setattr(store_module, "_last_write", last_write)
    store.stored_versions(["a"], consistency="Session")
    assert asked == [[COMPANION, MAIN]]
    assert [
        (r["name"], r["consistency_level"], r.get("guarantee_timestamp")) for r in milvus.reads
    ] == [
        (MAIN, "Session", None),
        (COMPANION, "Customized", 42),
    ]
