"""The item routes' pieces without the stack: how a path names an item and its view, a bulk
delete's selection and cap, and an insert refused as a whole before anything is published."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from engine.errors import ImageReferenceError, InvalidQueryError, PermanentError
from engine.indexes import IndexSpec
from engine.records import CollectionInfo
from engine.settings import FetchSettings, KafkaSettings
from query_api.ingest import LISTED_REFUSALS, IngestGateway
from query_api.items import ItemService
from query_api.routes import item_address
from schemas.api import DeleteItemsRequest, DeletePublished, InsertRequest


class FakeRequest:
    def __init__(self, raw_path: bytes | None) -> None:
        self.scope: dict[str, Any] = {} if raw_path is None else {"raw_path": raw_path}


@pytest.mark.parametrize(
    ("raw", "item_id", "view"),
    [
        (b"/items/c/cats/0001.jpg", "cats/0001.jpg", "record"),
        (b"/items/c/cats/0001.jpg/status", "cats/0001.jpg", "status"),
        (b"/items/c/cats/0001.jpg/thumbnail", "cats/0001.jpg", "thumbnail"),
        (b"/items/c/%E7%8C%AB/%C3%BC%20x/status", "猫/ü x", "status"),
        # Empty segments and trailing slashes are the id's own (the routed path drops them).
        (b"/items/c//data/a.jpg", "/data/a.jpg", "record"),
        (b"/items/c/https://example.com/a.jpg/status", "https://example.com/a.jpg", "status"),
        (b"/items/c/a/", "a/", "record"),
        # A last segment naming a view is the view; name it to reach such an id.
        (b"/items/c/x/status", "x", "status"),
        (b"/items/c/x/status/record", "x/status", "record"),
        (b"/items/c/x%2Fstatus", "x/status", "record"),
        (b"/items/c/status", "status", "record"),  # nothing before it: the id
        (b"/items/c/a%3Fb?view=1", "a?b", "record"),  # the test client's query is not the id's
        (b"/api/items/c/a", "a", "record"),  # behind a path prefix
    ],
)
def test_a_path_names_an_item_and_a_view(raw: bytes, item_id: str, view: str) -> None:
    assert item_address(FakeRequest(raw), "c", "/ignored") == (item_id, view)  # type: ignore[arg-type]


def test_a_delete_path_is_the_id_whole_and_bad_paths_are_400s() -> None:
    raw = FakeRequest(b"/items/c/x/status")
    assert item_address(raw, "c", "", views=False) == ("x/status", "record")  # type: ignore[arg-type]
    # Without the raw path (another server), the routed one.
    assert item_address(FakeRequest(None), "c", "/a/b/status") == ("a/b", "status")  # type: ignore[arg-type]
    for bad in (b"/items/c/%FF", b"/items/c//status"):
        with pytest.raises(PermanentError) as raised:
            item_address(FakeRequest(bad), "c", "")  # type: ignore[arg-type]
        assert raised.value.reason == "bad_request"


class FakeStore:
    default_collection = "images"

    def __init__(self, matching: list[str], dimension: int = 1280) -> None:
        self.matching = matching
        self.dimension = dimension
        self.asked: list[tuple[str, int]] = []

    def ids_matching(self, expression: str, collection: str, *, limit: int) -> list[str]:
        self.asked.append((expression, limit))
        return self.matching[:limit]

    def resolve_alias(self, name: str) -> str:
        return name

    def describe_collection(self, name: str) -> CollectionInfo:
        return CollectionInfo(name=name, dimension=self.dimension, index=IndexSpec())


class FakeGateway(IngestGateway):
    def __init__(self) -> None:
        self.calls: list[tuple[list[str], str | None, bool]] = []

    def delete(
        self, ids: Sequence[str], collection: str | None = None, *, dry_run: bool = False
    ) -> list[DeletePublished]:
        self.calls.append((list(ids), collection, dry_run))
        if dry_run:
            return []
        return [
            DeletePublished(id=i, collection=collection or "", version=1, partition=0, offset=n)
            for n, i in enumerate(ids)
        ]


def items(matching: list[str]) -> tuple[ItemService, FakeStore, FakeGateway]:
    store, gateway = FakeStore(matching), FakeGateway()
    return ItemService(store, gateway, finder=None), store, gateway  # type: ignore[arg-type]


def test_a_filter_deletes_at_most_max_items_and_a_dry_run_publishes_nothing() -> None:
    service, store, gateway = items(["c", "a", "b"])
    request = DeleteItemsRequest.model_validate(
        {"filter": {"field": "kind", "value": "x"}, "max_items": 2, "dry_run": True}
    )
    result = service.delete_many(request)
    assert store.asked == [('metadata["kind"] == "x"', 3)]  # one more than the cap: any more?
    assert (result.matched, result.truncated, result.ids, result.published) == (
        2,
        True,
        ["a", "c"],
        0,
    )
    assert gateway.calls == [(["a", "c"], "images", True)]
    with pytest.raises(InvalidQueryError, match="raise max_items") as raised:
        service.delete_many(request.model_copy(update={"dry_run": False}))
    assert raised.value.reason == "too_many_matches"
    assert len(gateway.calls) == 1  # refused before publishing
    done = service.delete_many(request.model_copy(update={"dry_run": False, "max_items": 3}))
    assert (done.matched, done.truncated, done.published) == (3, False, 3)


def test_deletes_by_ids_keep_the_first_of_duplicates_in_order() -> None:
    service, store, _ = items([])
    request = DeleteItemsRequest(ids=["b", "a", "b"], collection_name="other")
    result = service.delete_many(request)
    assert (result.ids, result.collection, result.published) == (["b", "a"], "other", 2)
    assert store.asked == []


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"ids": ["a"], "filter_expr": "x"},
        {"ids": []},
        {"filter_expr": "x", "max_items": 0},
        {"filter_expr": "x", "max_items": 10_001},
        {"ids": ["a"], "collection": "c"},  # collection_name, as /search and /insert
    ],
)
def test_bad_delete_requests_are_refused(body: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="validation error"):
        DeleteItemsRequest.model_validate(body)


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[IngestGateway]:
    fence = FetchSettings(allowed_roots=[tmp_path])
    made = IngestGateway(
        KafkaSettings(bootstrap_servers="127.0.0.1:9"),
        FakeStore([]),  # type: ignore[arg-type]
        fetch=fence,
        dimension=1280,
        acknowledge_timeout_s=0.1,
    )
    yield made
    made.close()


def test_an_insert_is_refused_whole_naming_each_refused_input(
    gateway: IngestGateway, tmp_path: Path
) -> None:
    inputs = [str(tmp_path / "a.png"), "/etc/passwd", "http://192.168.1.1/a.jpg", "sftp://h/a"]
    with pytest.raises(ImageReferenceError) as raised:
        gateway.insert(InsertRequest(inputs=inputs))
    error = raised.value
    assert error.reason == "path_not_allowed"  # the first refused input's
    message = str(error)
    assert message.startswith("3 of 4 inputs refused, so nothing was published")
    assert "inputs[0]" not in message
    for index, reason in ((1, "outside the allowed roots"), (2, "not a public"), (3, "'sftp'")):
        assert f"inputs[{index}]" in message and reason in message
    many = [f"/etc/{n}.png" for n in range(LISTED_REFUSALS + 5)]
    with pytest.raises(ImageReferenceError, match=r"; and 5 more$"):
        gateway.insert(InsertRequest(inputs=many))


def test_an_insert_into_a_collection_of_another_dimension_is_refused(
    gateway: IngestGateway, tmp_path: Path
) -> None:
    gateway._store.dimension = 64  # type: ignore[attr-defined]
    with pytest.raises(InvalidQueryError, match="holds 64-d vectors") as raised:
        gateway.insert(InsertRequest(inputs=[str(tmp_path / "a.png")]))
    assert raised.value.reason == "wrong_dimension"
