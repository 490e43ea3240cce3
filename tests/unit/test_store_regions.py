"""The store's region pieces that need no server: names, rows, grouping by item, the record."""

from __future__ import annotations

import numpy as np
import pytest

from engine.errors import InvalidRowError
from engine.records import RegionHit
from engine.store import (
    REGION_SUFFIX,
    TOMBSTONE_SUFFIX,
    _best_per_item,
    _records_regions,
    _region_rows,
    collection_schema,
    is_companion_collection,
    is_tombstone_collection,
    region_collection,
    tombstone_collection,
)

BOXES = ((0.0, 0.0, 0.4, 0.4), (0.6, 0.6, 1.0, 1.0))


def test_the_region_companion_is_named_beside_the_tombstones() -> None:
    assert region_collection("pets") == f"pets{REGION_SUFFIX}" == "pets__regions"
    assert tombstone_collection("pets") == f"pets{TOMBSTONE_SUFFIX}"
    long = "x" * 250
    assert len(region_collection(long)) == 255 and region_collection(long).endswith(REGION_SUFFIX)
    assert region_collection(long) != region_collection(long[:-1] + "y")
    assert is_companion_collection("pets__regions") and is_companion_collection("a__tombstones")
    assert not is_tombstone_collection("pets__regions") and not is_companion_collection("pets")


def test_a_collection_records_regions_only_when_it_has_them() -> None:
    assert _records_regions(collection_schema(8, regions=True).description)
    assert not _records_regions(collection_schema(8).description)
    assert "regions" not in collection_schema(8).description  # older readers see no change
    assert not _records_regions("made by hand") and not _records_regions("{broken")


def test_region_rows_carry_item_version_box_and_vector() -> None:
    vectors = np.eye(2, 4, dtype=np.float32)
    rows = _region_rows("a/b", 7, BOXES, vectors, 4)
    assert [row["id"] for row in rows] == ["7:0:a/b", "7:1:a/b"]
    assert rows[1]["item_id"] == "a/b" and rows[1]["event_version"] == 7
    assert (rows[1]["box_x0"], rows[1]["box_y1"]) == (0.6, 1.0)
    assert rows[0]["embedding"] == [1.0, 0.0, 0.0, 0.0]
    with pytest.raises(InvalidRowError, match="need vectors"):
        _region_rows("a", 1, BOXES, vectors, 8)
    with pytest.raises(InvalidRowError, match="outside"):
        _region_rows("a", -1, BOXES, vectors, 4)
    with pytest.raises(InvalidRowError, match="not finite"):
        _region_rows("a", 1, BOXES, np.full((2, 4), np.inf, np.float32), 4)


def _found(item: str, score: float, box: tuple[float, ...], version: int = 1) -> dict[str, object]:
    fields = dict(zip(("box_x0", "box_y0", "box_x1", "box_y1"), box, strict=True))
    return {"distance": score, "entity": {"item_id": item, "event_version": version, **fields}}


def test_each_item_keeps_its_best_region_over_every_query_vector() -> None:
    first = [_found("a", 0.9, BOXES[0]), _found("b", 0.8, BOXES[0]), _found("a", 0.7, BOXES[1])]
    second = [_found("b", 0.95, BOXES[1], 2), _found("a", 0.5, BOXES[1])]
    best = _best_per_item([first, second], higher_is_better=True)
    assert best == {
        "a": RegionHit("a", 0.9, BOXES[0], 1),
        "b": RegionHit("b", 0.95, BOXES[1], 2),
    }
    # L2: smaller is nearer.
    nearest = _best_per_item([first], higher_is_better=False)
    assert nearest["a"] == RegionHit("a", 0.7, BOXES[1], 1)
