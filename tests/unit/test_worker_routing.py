"""Where a worker writes an event (``worker.routing``), with a fake catalog and the pipeline's
fakes: a rebuild worker writes its sources into its target and skips the rest; an alias's
events go into the version bound to the worker's model, or are skipped (never dead-lettered)
with a warning at most once a minute; a plain collection of another model is dead-lettered;
lookups are cached for a while, never for good."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import pytest

from engine.errors import Reason, UnknownCollectionError
from engine.indexes import IndexSpec
from engine.records import CollectionInfo, VectorRecord
from engine.settings import RebuildTarget
from schemas import InlineImage
from tests.unit.test_pipeline import (
    FakeEmbedder,
    FakeFetcher,
    FakeMessage,
    FakeStore,
    event,
    make_processor,
    png,
    process,
    tombstone,
)
from worker.pipeline import Outcome
from worker.routing import SKIP_NOT_REBUILT, SKIP_OTHER_MODEL, CollectionRouter, Route

TAG = "m1"  # the pipeline fakes' model tag


class FakeCatalog:
    """Collections (name -> model tag) and aliases (alias -> collection); counts lookups."""

    def __init__(self, collections: dict[str, str], aliases: dict[str, str]) -> None:
        self.collections, self.aliases = collections, aliases
        self.lookups = 0

    def resolve_alias(self, name: str) -> str:
        self.lookups += 1
        if name in self.aliases:
            return self.aliases[name]
        if name not in self.collections:
            raise UnknownCollectionError(f"no collection named {name!r}")
        return name

    def list_collections(self) -> list[str]:
        return sorted(self.collections)

    def describe_collection(self, name: str) -> CollectionInfo:
        return CollectionInfo(
            name=name, dimension=8, index=IndexSpec(), model_tag=self.collections[name]
        )


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_rebuild_worker_writes_its_sources_into_its_target_and_skips_the_rest() -> None:
    router = CollectionRouter(
        FakeCatalog({}, {}),
        model_tag=TAG,
        rebuild=RebuildTarget(sources=["images", "images_v1"], target="images_v2"),
    )
    assert router.route("images") == Route("images_v2")
    assert router.route("images_v1") == Route("images_v2")
    assert router.route("other") == Route(None, SKIP_NOT_REBUILT)


def test_an_alias_goes_to_the_version_of_the_worker_model() -> None:
    catalog = FakeCatalog(
        {"images_v1": "old", "images_v2": TAG, "images_v3": "newer", "imagesx": TAG},
        {"images": "images_v1"},
    )
    router = CollectionRouter(catalog, model_tag=TAG)
    assert router.route("images") == Route("images_v2")
    # After the switch, the old model's workers keep the old version current.
    old = CollectionRouter(catalog, model_tag="old")
    catalog.aliases["images"] = "images_v2"
    assert old.route("images") == Route("images_v1")


def test_the_alias_target_wins_over_a_newer_version_of_the_same_model() -> None:
    catalog = FakeCatalog({"a_v1": TAG, "a_v2": "x", "a_v3": TAG}, {"a": "a_v1"})
    assert CollectionRouter(catalog, model_tag=TAG).route("a") == Route("a_v1")
    catalog.aliases["a"] = "a_v2"
    assert CollectionRouter(catalog, model_tag=TAG).route("a") == Route("a_v3")


def test_an_alias_without_a_version_of_the_model_is_skipped_with_one_warning_a_minute(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    catalog = FakeCatalog({"images_v2": "new"}, {"images": "images_v2"})
    router = CollectionRouter(catalog, model_tag=TAG, cache_s=1.0, clock=clock)
    with caplog.at_level(logging.WARNING, logger="worker.routing"):
        for _ in range(5):
            assert router.route("images") == Route(None, SKIP_OTHER_MODEL)
            clock.now += 2.0  # past the cache: looked up again, warned no more
        clock.now += 60.0
        router.route("images")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert "'new'" in warnings[0] and "images_v2" in warnings[0]


def test_a_plain_collection_routes_to_itself_and_lookups_expire() -> None:
    clock = Clock()
    catalog = FakeCatalog({"images": "other"}, {})
    router = CollectionRouter(catalog, model_tag=TAG, cache_s=10.0, clock=clock)
    assert router.route("images") == Route("images")
    router.route("images")
    assert catalog.lookups == 1  # cached
    # The collection becomes an alias (a migration): seen once the cache expires.
    catalog.collections = {"images_v1": TAG}
    catalog.aliases = {"images": "images_v1"}
    clock.now += 10.5
    assert router.route("images") == Route("images_v1")
    assert catalog.lookups == 2


def test_a_failed_lookup_is_not_cached() -> None:
    catalog = FakeCatalog({}, {})
    router = CollectionRouter(catalog, model_tag=TAG)
    with pytest.raises(UnknownCollectionError):
        router.route("images")
    catalog.collections["images"] = TAG
    assert router.route("images") == Route("images")


# Through the pipeline -------------------------------------------------------------------------


@dataclass
class RecordingStore(FakeStore):
    """A FakeStore that remembers which collection each write went to."""

    written: list[tuple[str, str]] = field(default_factory=list)

    def upsert(self, records: Sequence[VectorRecord], collection: str | None = None) -> int:
        self.written += [(collection or "images", record.id) for record in records]
        return super().upsert(records, collection)

    def delete(
        self, ids_with_versions: Sequence[tuple[str, int]], collection: str | None = None
    ) -> None:
        self.written += [(collection or "images", f"-{i}") for i, _ in ids_with_versions]
        super().delete(ids_with_versions, collection)


def test_the_pipeline_writes_where_the_router_says_and_commits_what_it_skips() -> None:
    store = RecordingStore(collections={"images_v2", "other", "images"})
    router = CollectionRouter(
        FakeCatalog({}, {}),
        model_tag=TAG,
        rebuild=RebuildTarget(sources=["images"], target="images_v2"),
    )
    processor = make_processor(FakeFetcher(), FakeEmbedder(), store, router=router)
    messages = [
        FakeMessage(event("a", InlineImage(data=png(10))), 0),  # the default collection
        FakeMessage(event("b", InlineImage(data=png(20)), collection="other"), 1),
        tombstone(2, "c", 5, collection="images"),
    ]
    batch = process(processor, messages)
    outcomes = {item.event.id: item.outcome for item in batch.items if item.event}
    assert outcomes == {"a": Outcome.STORED, "b": Outcome.SKIPPED, "c": Outcome.DELETED}
    assert [item.skip_reason for item in batch.items if item.outcome is Outcome.SKIPPED] == [
        SKIP_NOT_REBUILT
    ]
    assert sorted(store.written) == [("images_v2", "-c"), ("images_v2", "a")]


def test_a_plain_collection_of_another_model_is_still_dead_lettered() -> None:
    store = RecordingStore(collections={"images"})
    processor = make_processor(
        FakeFetcher(),
        FakeEmbedder(),
        store,
        router=CollectionRouter(FakeCatalog({"images": "other"}, {}), model_tag=TAG),
    )
    processor._collection_model_tag = lambda _name: "other"
    batch = process(processor, [FakeMessage(event("a", InlineImage(data=png(10))), 0)])
    item = batch.items[0]
    assert item.outcome is Outcome.DEAD
    assert item.dead_letter is not None
    assert item.dead_letter.reason == Reason.COLLECTION_MODEL_MISMATCH
    assert store.written == []
