"""Searches by image on collections with regions (issue 24), with fakes: the query image is
embedded by the collection's model and by its region model, the whole-image and region searches
are merged per item (its best score, and where it matched), the filter reaches both, paging and
the score threshold apply to the merge, and everything else answers as before (box null).
Creating a collection with regions needs a model with a region recipe."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import numpy.typing as npt
import pytest

from engine.errors import (
    CollectionConflictError,
    InvalidQueryError,
    Reason,
    StoreUnavailableError,
)
from engine.indexes import IndexSpec
from engine.models import (
    DEFAULT_MODEL_SPEC,
    LITE0_REGION_MODEL_SPEC,
    LITE2_MODEL_SPEC,
    UINT8_MODEL_SPEC,
    WHOLE_IMAGE,
    ModelSpec,
)
from engine.records import CollectionInfo, Hit, RegionHit
from engine.settings import Settings
from query_api.errors import _status_of
from query_api.service import ModelRuntime, SearchService, Target, _merged
from query_api.timing import StageTimings
from schemas.api import CollectionModel, CreateCollectionRequest
from schemas.search import FieldCondition, SearchHit, SearchOptions, SearchRequest
from tests.unit.test_pipeline import png

LITE0 = UINT8_MODEL_SPEC
BOX = (0.2, 0.4, 0.6, 0.8)


def _hit(item: str, score: float) -> Hit:
    return Hit(item, score, {"n": item}, {"id": item, "source": f"/data/{item}.png"})


def test_the_merge_keeps_each_items_best_score_and_where_it_matched() -> None:
    hits = [_hit("a", 0.9), _hit("b", 0.5)]
    regions = [
        RegionHit("b", 0.8, BOX, 1),  # better than b's whole image: its box
        RegionHit("a", 0.9, BOX, 1),  # a tie: the whole image's
        RegionHit("c", 0.7, BOX, 1),  # found by a region only: no fields yet
    ]
    merged = _merged(hits, regions, higher_is_better=True)
    assert [(hit.id, hit.score, box) for hit, box in merged] == [
        ("a", 0.9, WHOLE_IMAGE),
        ("b", 0.8, BOX),
        ("c", 0.7, BOX),
    ]
    assert merged[1][0].metadata == {"n": "b"} and merged[1][0].fields["source"] == "/data/b.png"
    assert merged[2][0].fields == {}
    # A distance (L2): lower is better.
    near = _merged([_hit("a", 0.4)], [RegionHit("a", 0.1, BOX, 1)], higher_is_better=False)
    assert [(hit.score, box) for hit, box in near] == [(0.1, BOX)]
    far = _merged([_hit("a", 0.4)], [RegionHit("a", 0.9, BOX, 1)], higher_is_better=False)
    assert [(hit.score, box) for hit, box in far] == [(0.4, WHOLE_IMAGE)]


# The service, with a store and runtimes of its own ---------------------------------------------


@dataclass
class _Store:
    infos: dict[str, CollectionInfo]
    hits: list[Hit] = field(default_factory=list)
    region_hits: list[RegionHit] = field(default_factory=list)
    rows: dict[str, dict[str, Any]] = field(default_factory=dict)
    calls: list[tuple[str, Any]] = field(default_factory=list)
    created: list[dict[str, Any]] = field(default_factory=list)
    default_collection: str = "images"

    def resolve_alias(self, name: str) -> str:
        return name

    def describe_collection(self, name: str) -> CollectionInfo:
        return self.infos[name]

    def search(self, vector: Any, *, top_k: int, filter_expr: str | None, **kw: Any) -> list[Hit]:
        self.calls.append(("search", (np.asarray(vector), top_k, filter_expr, kw)))
        return self.hits[kw.get("offset", 0) : kw.get("offset", 0) + top_k]

    def search_regions(
        self, vectors: list[Any], limit: int, collection: str, *, filter_expr: str | None
    ) -> list[RegionHit]:
        self.calls.append(
            ("search_regions", ([np.asarray(v) for v in vectors], limit, filter_expr))
        )
        return self.region_hits[:limit]

    def get(self, ids: list[str], collection: str | None = None) -> list[dict[str, Any]]:
        self.calls.append(("get", list(ids)))
        return [dict(self.rows[i]) for i in ids if i in self.rows]

    def create_collection(self, name: str, **kwargs: Any) -> bool:
        self.created.append({"name": name, **kwargs})
        return True

    def count(self, collection: str | None = None) -> int:
        return 0

    def close(self) -> None: ...


class _Preprocessor:
    def __init__(self, short_side: int) -> None:
        self.decode_short_side = short_side
        self.seen: list[tuple[int, ...]] = []
        self.warmups = 0

    def warmup(self) -> None:
        self.warmups += 1

    def preprocess(self, images: list[npt.NDArray[np.uint8]]) -> npt.NDArray[np.uint8]:
        self.seen += [image.shape for image in images]
        return np.zeros((len(images), 4), np.uint8)


class _Embedder:
    def __init__(self, value: float) -> None:
        self.value, self.waited, self.closed = value, 0, False

    def wait_until_ready(self, timeout_s: float) -> None:
        self.waited += 1

    def embed(self, batch: npt.NDArray[Any]) -> npt.NDArray[np.float32]:
        return np.full((len(batch), 3), self.value, np.float32)

    def close(self) -> None:
        self.closed = True


@dataclass
class _Built:
    region_models: list[str] = field(default_factory=list)
    runtimes: list[ModelRuntime] = field(default_factory=list)


def _info(name: str, *, regions: bool, model: ModelSpec = LITE0) -> CollectionInfo:
    return CollectionInfo(
        name=name,
        dimension=3,
        index=IndexSpec(index_type="FLAT"),
        model_tag=model.model_version_tag,
        model_name=model.name,
        regions=regions,
    )


def _service(store: _Store, settings: Settings | None = None) -> tuple[SearchService, _Built]:
    built = _Built()

    def regional(settings: Settings, region: ModelSpec) -> ModelRuntime:
        built.region_models.append(region.name)
        runtime = ModelRuntime(cast(Any, _Preprocessor(146)), cast(Any, _Embedder(2.0)))
        built.runtimes.append(runtime)
        return runtime

    service = SearchService(
        settings or Settings(),
        store=cast(Any, store),
        embedder=cast(Any, _Embedder(1.0)),
        preprocessor=cast(Any, _Preprocessor(256)),
        fetcher=cast(Any, None),
        region_runtime_factory=regional,
    )
    return service, built


def _store() -> _Store:
    return _Store(
        {"with": _info("with", regions=True), "plain": _info("plain", regions=False)},
        hits=[_hit("a", 0.9), _hit("b", 0.5), _hit("d", 0.3)],
        region_hits=[RegionHit("c", 0.95, BOX, 1), RegionHit("b", 0.8, BOX, 1)],
        rows={"c": {"id": "c", "metadata": {"n": "c"}, "source": "/data/c.png"}},
    )


def _ids_boxes(hits: list[SearchHit]) -> list[tuple[str, Any]]:
    return [(hit.id, hit.box) for hit in hits]


def test_an_image_search_of_a_collection_with_regions_merges_both_searches() -> None:
    store = _store()
    service, built = _service(store)
    service.start()
    # Compiled at start (the configured model has a recipe); Triton asked only when searched.
    assert built.region_models == [LITE0_REGION_MODEL_SPEC.name]
    prepared = built.runtimes[0]
    assert cast(_Preprocessor, prepared.preprocessor).warmups == 1
    assert cast(_Embedder, prepared.embedder).waited == 0
    options = SearchOptions(
        collection_name="with", topk=3, filter=FieldCondition(field="k", value="v")
    )
    timings = StageTimings()
    answer = service.search_image(png(40), options, timings)
    assert _ids_boxes(answer.hits) == [("c", BOX), ("a", WHOLE_IMAGE), ("b", BOX)]
    assert answer.hits[0].metadata == {"n": "c"} and answer.hits[0].source == "/data/c.png"
    assert answer.hits[2].score == pytest.approx(0.8) and answer.hits[2].metadata == {"n": "b"}
    calls = dict(store.calls)  # the two searches run at once: either may come first
    whole, top_k, expression, _ = calls["search"]
    vectors, limit, region_expression = calls["search_regions"]
    # Both query vectors, the same filter and window as the whole-image search.
    assert [float(v[0]) for v in vectors] == [1.0, 2.0] and float(whole[0]) == 1.0
    assert (limit, top_k) == (3, 3) and region_expression == expression is not None
    assert store.calls[2] == ("get", ["c"])  # only what a region alone found
    # The prepared runtime is used (one build), checked against Triton once.
    assert built.region_models == [LITE0_REGION_MODEL_SPEC.name]
    assert cast(_Embedder, prepared.embedder).waited == 1
    service.search_image(png(40), options)
    assert cast(_Embedder, prepared.embedder).waited == 1
    # Each pair runs at once: recorded in the order they end.
    stages = [name for name, _ in timings.stages]
    assert stages[:3] == ["resolve", "decode", "preprocess"] and stages[-1] == "lookup"
    assert set(stages[3:5]) == {"embed", "embed_regions"}
    assert set(stages[5:7]) == {"search", "search_regions"}


def test_paging_and_the_score_threshold_apply_to_the_merged_hits() -> None:
    store = _store()
    service, _ = _service(store)
    page = service.search_image(png(40), SearchOptions(collection_name="with", topk=2, offset=1))
    assert _ids_boxes(page.hits) == [("a", WHOLE_IMAGE), ("b", BOX)]
    windows = {name: call[1] for name, call in store.calls}
    assert windows == {"search": 3, "search_regions": 3}  # offset + topk each side
    above = service.search_image(
        png(40), SearchOptions(collection_name="with", topk=10, score_threshold=0.85)
    )
    assert _ids_boxes(above.hits) == [("c", BOX), ("a", WHOLE_IMAGE)]


def test_an_item_gone_before_its_fields_are_read_is_left_out() -> None:
    store = _store()
    store.rows.clear()
    service, _ = _service(store)
    hits = service.search_image(png(40), SearchOptions(collection_name="with", topk=3)).hits
    assert [hit.id for hit in hits] == ["a", "b"]


def test_without_regions_or_by_vector_or_id_the_hits_have_no_box() -> None:
    store = _store()
    service, built = _service(store)
    plain = service.search_image(png(40), SearchOptions(collection_name="plain", topk=3))
    assert _ids_boxes(plain.hits) == [("a", None), ("b", None), ("d", None)]
    by_vector = service.query(SearchRequest(collection_name="with", vector=[1.0, 0.0, 0.0]))
    assert all(hit.box is None for hit in by_vector.hits) and by_vector.hits
    assert "search_regions" not in [name for name, _ in store.calls]
    assert built.region_models == []  # never started: no search needed the region model


def test_the_region_model_is_the_collections_own_models_not_the_configured_ones() -> None:
    store = _store()
    # The float32 Lite0 has the same tag (same vectors) but no recipe: the collection's uint8
    # model's recipe is the one that made its regions.
    service, built = _service(store, Settings(triton={"model_name": DEFAULT_MODEL_SPEC.name}))
    service.start()
    assert built.region_models == []  # the configured model has no recipe: nothing to compile
    assert service.search_image(png(40), SearchOptions(collection_name="with")).hits[0].box
    assert built.region_models == [LITE0_REGION_MODEL_SPEC.name]


def test_a_collection_with_regions_whose_model_has_no_recipe_is_a_conflict_naming_it() -> None:
    store = _store()
    store.infos["odd"] = _info("odd", regions=True, model=LITE2_MODEL_SPEC)
    service, _ = _service(store)
    with pytest.raises(CollectionConflictError) as refused:
        service.search_image(png(40), SearchOptions(collection_name="odd"))
    assert refused.value.reason == Reason.MODEL_NOT_SERVED and _status_of(refused.value) == 409
    assert "no region recipe" in str(refused.value) and "'odd'" in str(refused.value)


def test_regions_are_created_with_a_model_that_has_a_recipe_and_refused_otherwise() -> None:
    store = _store()
    service, _ = _service(store)
    service.create_collection(CreateCollectionRequest(name="r", regions=True))
    service.create_collection(CreateCollectionRequest(name="p"))
    assert [(c["name"], c["regions"]) for c in store.created] == [("r", True), ("p", False)]
    with pytest.raises(InvalidQueryError) as refused:
        service.create_collection(
            CreateCollectionRequest(name="x", model=LITE2_MODEL_SPEC.name, regions=True)
        )
    assert _status_of(refused.value) == 422 and "\n" not in str(refused.value)
    assert f"model {LITE2_MODEL_SPEC.name!r} has no region recipe" in str(refused.value)
    assert len(store.created) == 2
    stats = service.collection_stats("with")
    assert stats.regions and not service.collection_stats("plain").regions


def test_a_target_says_whether_its_collection_has_regions() -> None:
    service, _ = _service(_store())
    model = CollectionModel(name=LITE0.name, tag=LITE0.model_version_tag, dim=3)
    assert service.target("with") == Target("with", "with", model, regions=True)
    assert not service.target("plain").regions


def test_a_failure_of_either_search_run_at_once_is_the_answer() -> None:
    store = _store()

    def down(*args: Any, **kwargs: Any) -> list[RegionHit]:
        raise StoreUnavailableError("Milvus is down")

    store.search_regions = down  # type: ignore[method-assign]
    service, _ = _service(store)
    with pytest.raises(StoreUnavailableError, match="down"):
        service.search_image(png(40), SearchOptions(collection_name="with"))
    service._side.shutdown(wait=True)
