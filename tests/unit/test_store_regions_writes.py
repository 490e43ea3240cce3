"""The store's writes into a collection with regions (issue 24), on a recording fake client:
regions before rows on upsert, regions before rows on delete, what is refused before anything
is written, and a new version of a collection with regions."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from engine.errors import InvalidRowError, ModelSpecError
from engine.indexes import IndexSpec
from engine.models import DEFAULT_MODEL_SPEC, UINT8_MODEL_SPEC
from engine.records import CollectionInfo, ItemRegions, VectorRecord
from engine.settings import MilvusSettings
from engine.store import VectorStore, region_collection, tombstone_collection

DIM = 4
BOXES = ((0.0, 0.0, 0.4, 0.4), (0.6, 0.6, 1.0, 1.0))


class RecordingClient:
    """Every call a store makes, as ``(method, collection, keyword arguments)``."""

    def __init__(self, calls: list[tuple[str, str, dict[str, Any]]]) -> None:
        self.calls = calls

    def __getattr__(self, method: str) -> Any:
        def call(collection: str = "", *args: Any, **kwargs: Any) -> Any:
            self.calls.append((method, collection, kwargs))
            return True

        return call


def store_with(name: str, *, regions: bool) -> tuple[VectorStore, list[tuple[str, str, Any]]]:
    calls: list[tuple[str, str, Any]] = []
    store = VectorStore(MilvusSettings(dimension=DIM))
    store._connect = lambda: RecordingClient(calls)  # type: ignore[method-assign]
    info = CollectionInfo(name=name, dimension=DIM, index=IndexSpec(), regions=regions)
    store._collections[name] = (info, None)  # described for good: no server
    store._tombstones.add(tombstone_collection(name))

    def send(collection: str, requests: list[Any], what: str) -> None:
        calls.append(("upsert_rows", collection, {"requests": len(requests)}))

    store._send_upserts = send  # type: ignore[method-assign]
    return store, calls


def record(item: str, version: int, *, regions: bool = True) -> VectorRecord:
    vectors = np.eye(len(BOXES), DIM, dtype=np.float32)
    return VectorRecord(
        id=item,
        vector=np.ones(DIM, np.float32) / 2,
        event_version=version,
        regions=ItemRegions(item, version, BOXES, vectors) if regions else None,
    )


def test_an_upsert_writes_the_regions_then_deletes_older_ones_then_the_rows() -> None:
    store, calls = store_with("pets", regions=True)
    assert store.upsert([record("a", 3), record("b", 2, regions=False)], "pets") == 2
    companion = region_collection("pets")
    assert [(method, collection) for method, collection, _ in calls] == [
        ("upsert", companion),
        ("delete", companion),
        ("upsert_rows", "pets"),
    ]
    written = calls[0][2]["data"]
    assert [row["id"] for row in written] == ["3:0:a", "3:1:a"]  # b has none: no rows
    older = calls[1][2]["filter"]
    assert '(item_id == "a" and event_version < 3)' in older
    assert '(item_id == "b" and event_version < 2)' in older  # b's older regions go


def test_a_collection_without_regions_ignores_them() -> None:
    store, calls = store_with("plain", regions=False)
    store.upsert([record("a", 1)], "plain")
    assert [method for method, _, _ in calls] == ["upsert_rows"]


def test_regions_not_of_the_record_are_refused_before_anything_is_written() -> None:
    store, calls = store_with("pets", regions=True)
    other = VectorRecord(
        id="a",
        vector=np.ones(DIM, np.float32),
        event_version=2,
        regions=ItemRegions("a", 1, BOXES, np.eye(2, DIM, dtype=np.float32)),
    )
    with pytest.raises(InvalidRowError, match="not of the row's version 2"):
        store.upsert([record("b", 1), other], "pets")
    with pytest.raises(InvalidRowError, match="need vectors"):
        store.validate(
            VectorRecord(
                id="c",
                vector=np.ones(DIM, np.float32),
                event_version=1,
                regions=ItemRegions("c", 1, BOXES, np.ones((2, DIM + 1), np.float32)),
            ),
            "pets",
        )
    store.validate(record("d", 1), "pets")
    assert calls == []


def test_a_delete_writes_tombstones_then_removes_regions_then_rows() -> None:
    store, calls = store_with("pets", regions=True)
    store.delete([("a", 4), ("b", 1)], "pets")
    assert [(method, collection) for method, collection, _ in calls] == [
        ("upsert", tombstone_collection("pets")),
        ("delete", region_collection("pets")),
        ("delete", "pets"),
    ]
    assert calls[1][2]["filter"] == 'item_id in ["a", "b"]'

    plain, plain_calls = store_with("plain", regions=False)
    plain.delete([("a", 4)], "plain")
    assert region_collection("plain") not in [collection for _, collection, _ in plain_calls]


def test_a_new_version_of_a_collection_with_regions_needs_a_model_with_a_recipe() -> None:
    store, calls = store_with("pets_v1", regions=True)
    with pytest.raises(ModelSpecError, match="no region recipe"):
        store.create_version("pets_v1", "pets_v2", DEFAULT_MODEL_SPEC)
    assert calls == []
    made: dict[str, Any] = {}
    store.create_collection = lambda name, **kwargs: made.update(kwargs) or True  # type: ignore[method-assign]
    assert store.create_version("pets_v1", "pets_v2", UINT8_MODEL_SPEC)
    assert made["regions"] is True and made["model_name"] == UINT8_MODEL_SPEC.name
