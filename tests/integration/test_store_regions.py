"""Region vectors in Milvus (issue 24): the companion collection, replacing an item's regions,
deleting them, and searching them grouped by item, never past the item's stored version."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import numpy.typing as npt
import pytest

from devstack.stack import LocalStack
from engine.errors import CollectionConflictError, InvalidRowError
from engine.models import UINT8_MODEL_SPEC, Box
from engine.records import RegionHit, VectorRecord
from engine.store import ItemRegions, VectorStore, region_collection
from tests.integration.conftest import wait_for

pytestmark = pytest.mark.stack

DIM = 8
# Milvus's bounded staleness (common.gracefulTime, 5 s by default), with room for a busy machine.
WINDOW_S = 15.0
BOXES: tuple[Box, ...] = ((0.0, 0.0, 0.5, 0.5), (0.5, 0.0, 1.0, 0.5), (0.2, 0.4, 0.6, 0.8))


def _unit(rng: np.random.Generator, rows: int) -> npt.NDArray[np.float32]:
    vectors = rng.normal(size=(rows, DIM)).astype(np.float32)
    out: npt.NDArray[np.float32] = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    return out


@pytest.fixture
def store(stack: LocalStack) -> VectorStore:
    return VectorStore(stack.settings().milvus)


def _item(
    store: VectorStore, name: str, item: str, version: int, vector: npt.NDArray[np.float32]
) -> None:
    store.upsert([VectorRecord(id=item, vector=vector, event_version=version)], name)


def test_a_collection_with_regions_keeps_them_in_its_companion(
    store: VectorStore, unique: str
) -> None:
    name, plain = f"regions_{unique}", f"plain_{unique}"
    try:
        assert store.create_collection(
            name, dimension=DIM, model_name=UINT8_MODEL_SPEC.name, regions=True
        )
        assert store.describe_collection(name).regions
        assert not store.create_collection(name, dimension=DIM, regions=True)  # idempotent
        assert store._has(region_collection(name))
        assert region_collection(name) not in store.list_collections()
        assert not store.collection_exists(region_collection(name))
        store.create_collection(plain, dimension=DIM)
        assert not store.describe_collection(plain).regions
        assert not store._has(region_collection(plain))
        with pytest.raises(CollectionConflictError, match="without region vectors"):
            store.create_collection(plain, dimension=DIM, regions=True)
        with pytest.raises(CollectionConflictError, match="without region vectors"):
            store.search_regions([np.ones(DIM, np.float32)], 3, plain)
        with pytest.raises(CollectionConflictError, match="reserved"):
            store.create_collection(region_collection(name), dimension=DIM)
    finally:
        for each in (name, plain):
            if store.collection_exists(each):
                store.drop_collection(each)
    assert not store._has(region_collection(name))
    store.close()


def _eventually(check: Callable[[], object], what: str) -> object:
    # Searches read at the collection's bounded staleness: a write shows within its window.
    return wait_for(check, timeout=WINDOW_S, what=what, interval=0.2)


def test_regions_are_replaced_deleted_and_searched_per_item_at_its_version(
    store: VectorStore, unique: str
) -> None:
    name = f"regions_{unique}"
    rng = np.random.default_rng(24)
    store.create_collection(name, dimension=DIM, regions=True)
    try:
        regions = {item: _unit(rng, len(BOXES)) for item in ("a", "b", "c")}
        for item, vectors in regions.items():
            _item(store, name, item, 1, _unit(rng, 1)[0])
            assert store.upsert_regions(item, 1, BOXES, vectors, name) == len(BOXES)

        # Searching by b's second region finds b first, with that box; one hit per item.
        def all_three() -> list[RegionHit]:
            hits = store.search_regions([regions["b"][1]], 3, name)
            return hits if len(hits) == 3 else []

        hits = _eventually(all_three, "the three items' regions")
        assert isinstance(hits, list)
        assert hits[0].id == "b" and hits[0].box == BOXES[1] and hits[0].event_version == 1
        assert hits[0].score == pytest.approx(1.0, abs=1e-5)
        assert len({hit.id for hit in hits}) == 3
        # Two query vectors: each item scores its best over both.
        both = store.search_regions([regions["a"][2], regions["c"][0]], 2, name)
        assert {hit.id: hit.box for hit in both} == {"a": BOXES[2], "c": BOXES[0]}

        # Version 2 of b: its item row first, then its regions (other boxes, other vectors).
        new = _unit(rng, 2)
        _item(store, name, "b", 2, _unit(rng, 1)[0])
        store.upsert_regions("b", 2, BOXES[:2], new, name)

        def b_at_2() -> bool:
            found = store.search_regions([new[0]], 1, name)
            return bool(found) and (found[0].id, found[0].box, found[0].event_version) == (
                "b",
                BOXES[0],
                2,
            )

        _eventually(b_at_2, "b's version 2 regions")
        old_query = store.search_regions([regions["b"][1]], 3, name)
        assert all(hit.id != "b" or hit.event_version == 2 for hit in old_query)
        # Older versions' rows are gone from the companion, not only hidden.
        rows = store._strong_query(
            region_collection(name), "probe", filter='item_id == "b"', output_fields=["id"]
        )
        assert sorted(row["id"] for row in rows) == ["2:0:b", "2:1:b"]

        # A late write of version 1 keeps version 2's rows; its own are never returned.
        store.upsert_regions("b", 1, BOXES, regions["b"], name)
        rows = store._strong_query(
            region_collection(name), "probe", filter='item_id == "b"', output_fields=["id"]
        )
        assert len(rows) == len(BOXES) + 2
        stale = store.search_regions([regions["b"][2]], 3, name)
        assert all(hit.id != "b" or hit.event_version == 2 for hit in stale)
        assert store.search_regions([new[1]], 1, name)[0].id == "b"

        # A region whose item row is of another version (or gone) is never returned.
        store.upsert_regions("c", 3, BOXES, regions["c"], name)  # c's item row is still v1
        _eventually(
            lambda: "c" not in {h.id for h in store.search_regions([regions["c"][0]], 3, name)},
            "c's version 1 regions replaced by regions of a version its row does not have",
        )
        store.delete([("a", 5)], name)
        _eventually(
            lambda: "a" not in {h.id for h in store.search_regions([regions["a"][0]], 3, name)},
            "a deleted item's regions no longer found",
        )
        store.delete_regions(["a", "b", "c"], name)
        left = store._strong_query(
            region_collection(name), "probe", filter="", output_fields=["count(*)"]
        )
        assert left[0]["count(*)"] == 0
    finally:
        store.drop_collection(name)
        store.close()


def test_regions_the_store_refuses(store: VectorStore, unique: str) -> None:
    name = f"regions_{unique}"
    store.create_collection(name, dimension=DIM, regions=True)
    rng = np.random.default_rng(1)
    try:
        with pytest.raises(InvalidRowError, match="need vectors"):
            store.upsert_regions("x", 1, BOXES, _unit(rng, 2), name)
        with pytest.raises(InvalidRowError, match="not finite"):
            store.upsert_regions("x", 1, BOXES[:1], np.full((1, DIM), np.nan, np.float32), name)
        with pytest.raises(InvalidRowError, match="empty id"):
            store.upsert_regions("", 1, BOXES[:1], _unit(rng, 1), name)
        awkward = 'it\'s "x"\\y'
        _item(store, name, awkward, 1, _unit(rng, 1)[0])
        vectors = _unit(rng, 1)
        store.upsert_regions(awkward, 1, BOXES[:1], vectors, name)
        _eventually(
            lambda: [h.id for h in store.search_regions([vectors[0]], 1, name)] == [awkward],
            "the awkward id's region",
        )
        store.delete_regions([awkward], name)
        _eventually(lambda: store.search_regions([vectors[0]], 1, name) == [], "no region")
    finally:
        store.drop_collection(name)
        store.close()


def test_many_items_regions_are_written_in_one_call(store: VectorStore, unique: str) -> None:
    name = f"regions_{unique}"
    store.create_collection(name, dimension=DIM, regions=True)
    rng = np.random.default_rng(3)
    try:
        old = ItemRegions("p", 1, BOXES, _unit(rng, len(BOXES)))
        store.upsert_regions_of([old, ItemRegions("q", 4, BOXES[:1], _unit(rng, 1))], name)
        new = ItemRegions("p", 2, BOXES[:1], _unit(rng, 1))
        # The same item twice in one call: the newer version's rows are what stays.
        assert store.upsert_regions_of([old, new], name) == len(BOXES) + 1
        rows = store._strong_query(
            region_collection(name), "probe", filter='item_id in ["p", "q"]', output_fields=["id"]
        )
        assert sorted(row["id"] for row in rows) == ["2:0:p", "4:0:q"]
        assert store.upsert_regions_of([], name) == 0
    finally:
        store.drop_collection(name)
        store.close()


def test_upserts_and_deletes_of_records_carry_their_regions(
    store: VectorStore, unique: str
) -> None:
    name = f"regions_{unique}"
    store.create_collection(name, dimension=DIM, model_name=UINT8_MODEL_SPEC.name, regions=True)
    rng = np.random.default_rng(5)

    def record(item: str, version: int, boxes: tuple[Box, ...]) -> VectorRecord:
        regions = ItemRegions(item, version, boxes, _unit(rng, len(boxes))) if boxes else None
        return VectorRecord(
            id=item, vector=_unit(rng, 1)[0], event_version=version, regions=regions
        )

    def regions_of(item: str) -> list[str]:
        rows = store._strong_query(
            region_collection(name), "probe", filter=f'item_id == "{item}"', output_fields=["id"]
        )
        return sorted(str(row["id"]) for row in rows)

    try:
        assert store.upsert([record("a", 1, BOXES), record("b", 1, BOXES[:1])], name) == 2
        assert regions_of("a") == ["1:0:a", "1:1:a", "1:2:a"] and regions_of("b") == ["1:0:b"]
        store.upsert([record("a", 2, BOXES[:2]), record("b", 2, ())], name)
        assert regions_of("a") == ["2:0:a", "2:1:a"]  # the older version's are gone
        assert regions_of("b") == []  # a record without regions leaves none
        store.delete([("a", 3)], name)
        assert regions_of("a") == []
        # A rebuild's new version of a collection with regions has them too.
        assert store.create_version(name, f"{name}_v2", UINT8_MODEL_SPEC)
        assert store.describe_collection(f"{name}_v2").regions
    finally:
        for each in (name, f"{name}_v2"):
            if store.collection_exists(each):
                store.drop_collection(each)
        store.close()
