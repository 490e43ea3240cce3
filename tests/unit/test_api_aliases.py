"""Searches through an alias, with fakes: each request resolves the alias once, embeds its
query with the model of the collection it pointed at and searches that collection, so no answer
mixes models while the alias moves back and forth; a collection dropped under a request is
resolved again; stats, the list, items, inserts and drops through an alias."""

from __future__ import annotations

import io
import threading
from typing import Any, cast

import numpy as np
import numpy.typing as npt
import pytest
from litestar.testing import TestClient
from PIL import Image

from engine.errors import CollectionConflictError, UnknownCollectionError
from engine.indexes import IndexSpec
from engine.models import LITE2_MODEL_SPEC, UINT8_MODEL_SPEC, ModelSpec
from engine.records import CollectionInfo, Hit, StoredRecord
from engine.settings import Settings
from query_api import create_app
from query_api.items import ItemService
from query_api.service import ModelRuntime, SearchService
from query_api.timing import StageTimings
from schemas.search import SearchOptions, SearchRequest
from tests.unit.test_api_http import FakeIngest, FakeItems

LITE0, LITE2 = UINT8_MODEL_SPEC, LITE2_MODEL_SPEC
# Each model's fake embedding: a one-hot vector, so a search can tell which model made it.
AXIS = {LITE0.name: 0, LITE2.name: 1}
DIM = LITE0.output_dim


def _vector(spec: ModelSpec) -> npt.NDArray[np.float32]:
    vector = np.zeros(DIM, dtype=np.float32)
    vector[AXIS[spec.name]] = 1.0
    return vector


def _png() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 10, 10)).save(out, format="PNG")
    return out.getvalue()


class AliasStore:
    """Collections bound to models, aliases that move, and a search that fails the test when
    the query vector is not of the searched collection's model (a mixed answer)."""

    default_collection = "images"

    def __init__(self) -> None:
        self.models = {"x_v1": LITE0, "x_v2": LITE2, "images": LITE0}
        self.alias = {"x": "x_v1"}
        self.searched: list[str] = []
        self.mixed: list[str] = []
        self.dropped: set[str] = set()
        self.lock = threading.Lock()

    def resolve_alias(self, name: str) -> str:
        with self.lock:
            concrete = self.alias.get(name, name)
        if concrete not in self.models:
            raise UnknownCollectionError(f"no collection named {name!r}")
        return concrete

    def aliases(self) -> dict[str, str]:
        return dict(self.alias)

    def describe_collection(self, name: str) -> CollectionInfo:
        if name not in self.models or name in self.alias:
            raise UnknownCollectionError(f"no collection named {name!r}")
        spec = self.models[name]
        return CollectionInfo(
            name=name,
            dimension=spec.output_dim,
            index=IndexSpec(index_type="FLAT"),
            model_tag=spec.model_version_tag,
            model_name=spec.name,
        )

    def list_collections(self) -> list[str]:
        return sorted(self.models)

    def count(self, name: str) -> int:
        return {"x_v1": 3, "x_v2": 2}.get(name, 0)

    def search(self, vector: Any, *, collection: str, **kwargs: Any) -> list[Hit]:
        if collection in self.dropped:
            raise UnknownCollectionError(f"no collection named {collection!r}")
        self.searched.append(collection)
        if int(np.argmax(vector)) != AXIS[self.models[collection].name]:
            self.mixed.append(collection)
        return [Hit(id=f"{collection}/{n}", score=1.0, metadata={}, fields={}) for n in range(3)]

    def get(self, ids: list[str], collection: str, **kwargs: Any) -> list[dict[str, Any]]:
        return [{"id": i, "embedding": _vector(self.models[collection])} for i in ids]

    def get_record(self, item_id: str, collection: str) -> StoredRecord:
        spec = self.models[collection]
        return StoredRecord(
            id=item_id,
            metadata={},
            source="s",
            event_version=1,
            model_version=spec.model_version_tag,
            content_sha256="0" * 64,
            ingested_at_ms=0,
        )

    def drop_collection(self, name: str) -> None:
        self.dropped.add(name)

    def close(self) -> None: ...


class _Embedder:
    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec

    def embed(self, batch: Any) -> npt.NDArray[np.float32]:
        return _vector(self.spec)[None, :]

    def wait_until_ready(self, timeout_s: float) -> None: ...

    def close(self) -> None: ...


class _Preprocessor:
    decode_short_side = 16

    def warmup(self) -> None: ...

    def preprocess(self, images: list[Any]) -> Any:
        return np.zeros((len(images), 1), dtype=np.float32)


class _Fetcher:
    def close(self) -> None: ...


def _runtime(settings: Settings) -> ModelRuntime:
    return ModelRuntime(cast(Any, _Preprocessor()), cast(Any, _Embedder(settings.model)))


@pytest.fixture
def store() -> AliasStore:
    return AliasStore()


@pytest.fixture
def service(store: AliasStore) -> SearchService:
    return SearchService(
        Settings(),
        store=cast(Any, store),
        embedder=cast(Any, _Embedder(LITE0)),
        preprocessor=cast(Any, _Preprocessor()),
        fetcher=cast(Any, _Fetcher()),
        runtime_factory=_runtime,
    )


def test_a_search_through_an_alias_uses_the_model_of_the_collection_it_points_at(
    service: SearchService, store: AliasStore
) -> None:
    timings = StageTimings()
    first = service.search_image(_png(), SearchOptions(collection_name="x"), timings)
    assert first.target.collection == "x_v1" and first.target.name == "x"
    assert {(h.collection, h.model, h.model_tag) for h in first.hits} == {
        ("x_v1", LITE0.name, LITE0.model_version_tag)
    }
    assert next(stage for stage, _ in timings.stages) == "resolve"
    store.alias["x"] = "x_v2"  # switch
    second = service.search_image(_png(), SearchOptions(collection_name="x"))
    assert {(h.collection, h.model) for h in second.hits} == {("x_v2", LITE2.name)}
    by_id = service.query(SearchRequest(id="a", collection_name="x"))
    assert by_id.target.collection == "x_v2" and by_id.hits[0].model == LITE2.name
    by_vector = service.query(SearchRequest(vector=_vector(LITE2).tolist(), collection_name="x"))
    assert {h.collection for h in by_vector.hits} == {"x_v2"}
    assert store.searched == ["x_v1", "x_v2", "x_v2", "x_v2"] and not store.mixed


def test_no_search_mixes_models_while_the_alias_moves_back_and_forth(
    service: SearchService, store: AliasStore
) -> None:
    stop = threading.Event()

    def flip() -> None:
        while not stop.is_set():
            with store.lock:
                store.alias["x"] = "x_v2" if store.alias["x"] == "x_v1" else "x_v1"

    flipper = threading.Thread(target=flip)
    flipper.start()
    answered: list[str] = []
    try:
        for n in range(300):
            if n % 3 == 0:
                answer = service.search_image(_png(), SearchOptions(collection_name="x"))
            else:
                answer = service.query(SearchRequest(id=str(n), collection_name="x"))
            assert {hit.collection for hit in answer.hits} == {answer.target.collection}
            answered.append(answer.target.collection)
    finally:
        stop.set()
        flipper.join()
    assert not store.mixed
    assert set(answered) == {"x_v1", "x_v2"}  # the alias did move under the searches


def test_a_collection_dropped_under_a_request_is_resolved_again_once(
    service: SearchService, store: AliasStore
) -> None:
    real_search = store.search

    def finish_then_search(vector: Any, *, collection: str, **kwargs: Any) -> list[Hit]:
        # trident-reembed switch and finish, between the resolution and the search.
        store.alias["x"] = "x_v2"
        store.dropped.add("x_v1")
        return real_search(vector, collection=collection, **kwargs)

    store.search = finish_then_search  # type: ignore[method-assign]
    answer = service.search_image(_png(), SearchOptions(collection_name="x"))
    assert answer.target.collection == "x_v2" and not store.mixed
    # A collection, not an alias, that is gone is gone: no second try.
    store.dropped.add("images")
    with pytest.raises(UnknownCollectionError):
        service.search_image(_png(), SearchOptions())


def test_stats_the_list_items_and_drops_through_an_alias(
    service: SearchService, store: AliasStore
) -> None:
    stats = service.collection_stats("x")
    assert (stats.name, stats.alias_of, stats.row_count) == ("x", "x_v1", 3)
    assert stats.model.name == LITE0.name
    assert service.collection_stats("x_v2").alias_of is None
    listed = service.collections()
    assert listed.aliases == {"x": "x_v1"} and "x" not in listed.collections
    assert listed.models["x_v2"].name == LITE2.name
    with pytest.raises(CollectionConflictError, match="alias of collection 'x_v1'"):
        service.drop_collection("x")
    assert not store.dropped
    items = ItemService(cast(Any, store), cast(Any, None), cast(Any, None))
    record = items.record("x", "a")
    assert (record.collection, record.stored_in) == ("x", "x_v1")
    assert record.model_tag == LITE0.model_version_tag
    assert items.record("x_v2", "a").stored_in is None


def test_the_http_answer_names_the_collection_and_model_that_answered(
    service: SearchService, store: AliasStore
) -> None:
    app = create_app(Settings(), service=service, ingest=FakeIngest(), items=FakeItems())
    with TestClient(app=app) as client:
        store.alias["x"] = "x_v2"
        response = client.post("/search", json={"id": "a", "collection_name": "x"})
        assert response.status_code == 200, response.text
        assert response.headers["trident-collection"] == "x_v2"
        assert response.headers["trident-model"] == LITE2.name
        assert response.headers["trident-model-tag"] == LITE2.model_version_tag
        assert response.headers["server-timing"].startswith("resolve;dur=")
        assert {hit["collection"] for hit in response.json()} == {"x_v2"}
        dropped = client.delete("/collections/x")
        assert (dropped.status_code, dropped.json()["error"]) == (409, "collection_conflict")
        listed = client.get("/collections").json()
        assert listed["aliases"] == {"x": "x_v2"}
        stats = client.get("/collections/x/stats").json()
        assert (stats["alias_of"], stats["model"]["name"]) == ("x_v2", LITE2.name)
        # A collection's stats are as they were: no alias_of at all.
        assert "alias_of" not in client.get("/collections/x_v2/stats").json()
        schema = client.get("/openapi.json").json()
        hit = schema["components"]["schemas"]["SearchHit"]["properties"]
        assert {"collection", "model", "model_tag"} <= set(hit)
        search = schema["paths"]["/search"]["post"]["responses"]["200"]
        assert {"Trident-Collection", "Trident-Model", "Trident-Model-Tag"} <= set(
            search["headers"]
        )
