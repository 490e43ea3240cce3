"""A collection is bound to its model, with fakes: the store records the model's name and tag
(and reads descriptions written before names were), the query API creates collections bound to
a registry model and embeds each query with the searched collection's model (one runtime per
model, built once), and a worker dead-letters the rows it would write into another model's
collection while the rest of the batch is stored."""

from __future__ import annotations

import threading
import time
from typing import Any, cast

import numpy as np
import orjson
import pytest

from engine.errors import (
    CollectionConflictError,
    InferenceConfigurationError,
    InvalidQueryError,
    Reason,
    UnknownModelError,
)
from engine.indexes import IndexSpec
from engine.models import DEFAULT_MODEL_SPEC, LITE2_MODEL_SPEC, UINT8_MODEL_SPEC, model_registry
from engine.records import CollectionInfo
from engine.settings import MilvusSettings, Settings
from engine.store import VectorStore, _description_of, collection_schema
from query_api.errors import _status_of
from query_api.service import ModelRuntime, SearchService
from schemas import InlineImage
from schemas.api import CreateCollectionRequest
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
from tests.unit.test_store_collections import _FakeMilvus
from worker.pipeline import BatchProcessor, Outcome

REGISTRY = model_registry()
LITE0 = UINT8_MODEL_SPEC


def _info(name: str = "c", *, tag: str = "", model: str = "", dim: int = 0) -> CollectionInfo:
    return CollectionInfo(
        name=name,
        dimension=dim or LITE0.output_dim,
        index=IndexSpec(index_type="FLAT"),
        model_tag=tag,
        model_name=model,
    )


# The store: what a collection records, and reading old descriptions --------------------------


def test_the_schema_records_the_models_name_and_tag_and_reads_back() -> None:
    schema = collection_schema(
        8, description="d", model_tag=LITE2_MODEL_SPEC.model_version_tag, model_name="lite2"
    )
    assert orjson.loads(schema.description) == {
        "description": "d",
        "model_tag": LITE2_MODEL_SPEC.model_version_tag,
        "model_name": "lite2",
    }
    assert _description_of(schema.description)["model_name"] == "lite2"
    # Written before names were recorded: a tag only. Made elsewhere: plain text.
    old = _description_of('{"description": "x", "model_tag": "t1"}')
    assert old == {"description": "x", "model_tag": "t1", "model_name": ""}
    assert _description_of("made by hand") == {
        "description": "made by hand",
        "model_tag": "",
        "model_name": "",
    }


def test_a_collection_is_bound_to_its_recorded_model_or_for_old_ones_the_tags() -> None:
    assert _info(model=LITE2_MODEL_SPEC.name).bound_model(REGISTRY, LITE0) == LITE2_MODEL_SPEC
    # Before names were recorded: today's default, the configured model whose tag matches.
    assert _info(tag=LITE0.model_version_tag).bound_model(REGISTRY, LITE0) == LITE0
    assert _info(tag="").bound_model(REGISTRY, LITE0) == LITE0
    configured_float = DEFAULT_MODEL_SPEC  # the float32 Lite0: same tag, configured first
    assert _info(tag=LITE0.model_version_tag).bound_model(REGISTRY, configured_float) == (
        configured_float
    )
    # A tag of another registry model names that model.
    old_lite2 = _info(tag=LITE2_MODEL_SPEC.model_version_tag)
    assert old_lite2.bound_model(REGISTRY, LITE0) == LITE2_MODEL_SPEC
    with pytest.raises(UnknownModelError, match=r"'gone'.*trident-models add"):
        _info(model="gone", tag="gone-v1").bound_model(REGISTRY, LITE0)
    with pytest.raises(UnknownModelError, match="a model of tag 'nobody-v1'"):
        _info(tag="nobody-v1").bound_model(REGISTRY, LITE0)


class _DescribedMilvus(_FakeMilvus):
    """Keeps each collection's description, as Milvus does."""

    def create_collection(self, name: str, *, schema: Any, **kwargs: object) -> None:
        super().create_collection(name, schema=schema, **kwargs)
        self.collections[name]["description"] = schema.description

    def describe_collection(self, name: str, **kwargs: object) -> dict[str, Any]:
        described = super().describe_collection(name, **kwargs)
        return {**described, "description": self.collections[name].get("description", "")}


def test_creating_again_for_a_model_of_another_tag_is_a_conflict() -> None:
    store = VectorStore(MilvusSettings(dimension=8))
    store._client = _DescribedMilvus()  # type: ignore[assignment]
    assert store.create_collection("c", dimension=8, model_tag="a-v1", model_name="a")
    assert store.describe_collection("c").model_name == "a"
    assert not store.create_collection("c", dimension=8, model_tag="a-v1", model_name="a")
    assert not store.create_collection("c", dimension=8)  # no model asked: left as it is
    with pytest.raises(CollectionConflictError, match="bound to a of tag 'a-v1', not b"):
        store.create_collection("c", dimension=8, model_tag="b-v1", model_name="b")


# The query API ---------------------------------------------------------------------------------


class _Store:
    """Just what the service asks of the store here: collections with their infos."""

    def __init__(self, infos: dict[str, CollectionInfo]) -> None:
        self.infos = infos
        self.created: list[dict[str, Any]] = []
        self.default_collection = "images"

    def describe_collection(self, name: str) -> CollectionInfo:
        return self.infos[name]

    def list_collections(self) -> list[str]:
        return sorted(self.infos)

    def aliases(self) -> dict[str, str]:
        return {}

    def create_collection(self, name: str, **kwargs: Any) -> bool:
        self.created.append({"name": name, **kwargs})
        return True

    def close(self) -> None: ...


class _Embedder:
    def __init__(self, name: str, failure: Exception | None = None) -> None:
        self.name, self.failure, self.closed = name, failure, False

    def wait_until_ready(self, timeout_s: float) -> None:
        time.sleep(0.05)  # long enough for concurrent first queries to meet
        if self.failure is not None:
            raise self.failure

    def close(self) -> None:
        self.closed = True


class _Preprocessor:
    def warmup(self) -> None: ...


class _Fetcher:
    def close(self) -> None: ...


def _service(
    infos: dict[str, CollectionInfo], failure: Exception | None = None
) -> tuple[SearchService, list[str], list[_Embedder]]:
    built: list[str] = []
    embedders: list[_Embedder] = []

    def factory(settings: Settings) -> ModelRuntime:
        built.append(settings.model.name)
        embedders.append(_Embedder(settings.model.name, failure))
        return ModelRuntime(cast(Any, _Preprocessor()), cast(Any, embedders[-1]))

    service = SearchService(
        Settings(),
        store=cast(Any, _Store(infos)),
        embedder=cast(Any, _Embedder(LITE0.name)),
        preprocessor=cast(Any, _Preprocessor()),
        fetcher=cast(Any, _Fetcher()),
        runtime_factory=factory,
    )
    return service, built, embedders


def test_a_collection_is_created_bound_to_the_named_model_or_the_configured_one() -> None:
    service, _, _ = _service({})
    store = cast(_Store, service.store)
    service.create_collection(CreateCollectionRequest(name="a", model=LITE2_MODEL_SPEC.name))
    service.create_collection(CreateCollectionRequest(name="b"))
    made = {c["name"]: c for c in store.created}
    assert (made["a"]["model_name"], made["a"]["model_tag"], made["a"]["dimension"]) == (
        LITE2_MODEL_SPEC.name,
        LITE2_MODEL_SPEC.model_version_tag,
        LITE2_MODEL_SPEC.output_dim,
    )
    assert (made["b"]["model_name"], made["b"]["model_tag"]) == (
        LITE0.name,
        LITE0.model_version_tag,
    )


def test_an_unknown_model_or_a_dimension_not_the_models_is_refused_naming_them() -> None:
    service, _, _ = _service({})
    with pytest.raises(InvalidQueryError) as unknown:
        service.create_collection(CreateCollectionRequest(name="a", model="clip_nope"))
    assert unknown.value.reason == Reason.UNKNOWN_MODEL and _status_of(unknown.value) == 422
    assert "'clip_nope'" in str(unknown.value) and LITE2_MODEL_SPEC.name in str(unknown.value)
    with pytest.raises(InvalidQueryError) as wrong:
        service.create_collection(CreateCollectionRequest(name="a", dim=64))
    assert wrong.value.reason == Reason.WRONG_DIMENSION and _status_of(wrong.value) == 422
    assert f"dim 64 does not fit model {LITE0.name!r}" in str(wrong.value)
    assert str(LITE0.output_dim) in str(wrong.value)
    assert not cast(_Store, service.store).created


def test_queries_are_embedded_by_the_collections_model_each_built_once() -> None:
    infos = {
        "lite0": _info("lite0", tag=LITE0.model_version_tag, model=LITE0.name),
        "old": _info("old", tag=LITE0.model_version_tag),
    }
    infos["lite0_float"] = _info(
        "lite0_float", tag=DEFAULT_MODEL_SPEC.model_version_tag, model=DEFAULT_MODEL_SPEC.name
    )
    infos["lite2"] = _info(
        "lite2", tag=LITE2_MODEL_SPEC.model_version_tag, model=LITE2_MODEL_SPEC.name
    )
    service, built, embedders = _service(infos)
    configured = service.runtime_for(None)
    # Same tag, same vectors: the configured model's runtime.
    for name in ("lite0", "lite0_float", "old"):
        assert service.runtime_for(name) is configured
    found: list[ModelRuntime] = []
    threads = [
        threading.Thread(target=lambda: found.append(service.runtime_for("lite2")))
        for _ in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert built == [LITE2_MODEL_SPEC.name]  # once, for four concurrent first queries
    assert len({id(runtime) for runtime in found}) == 1 and found[0] is not configured
    assert service.runtime_for("lite2") is found[0]
    service.close()
    assert all(e.closed for e in embedders)
    listed = service.collections().models
    assert listed["lite2"].name == LITE2_MODEL_SPEC.name and listed["old"].name == LITE0.name
    assert listed["old"].tag == LITE0.model_version_tag and listed["old"].dim == LITE0.output_dim


def test_a_collection_whose_model_triton_does_not_serve_says_which_to_serve() -> None:
    lite2 = _info("lite2", tag=LITE2_MODEL_SPEC.model_version_tag, model=LITE2_MODEL_SPEC.name)
    gone = _info("gone", tag="gone-v1", model="gone")
    failure = InferenceConfigurationError("Triton does not know model")
    service, built, embedders = _service({"lite2": lite2, "gone": gone}, failure)
    for _ in range(2):  # not kept: served later, the next query finds it
        with pytest.raises(CollectionConflictError) as refused:
            service.runtime_for("lite2")
        assert refused.value.reason == Reason.MODEL_NOT_SERVED
        assert _status_of(refused.value) == 409
        message = str(refused.value)
        assert f"bound to model {LITE2_MODEL_SPEC.name!r}" in message
        assert f"trident-stack up --models {LITE2_MODEL_SPEC.name}" in message
    assert built == [LITE2_MODEL_SPEC.name] * 2 and all(e.closed for e in embedders)
    with pytest.raises(CollectionConflictError, match=r"'gone'.*registry does not have"):
        service.runtime_for("gone")


# The worker ------------------------------------------------------------------------------------


def _processor(store: FakeStore, tags: dict[str, str], reads: list[str]) -> BatchProcessor:
    processor = make_processor(FakeFetcher(), FakeEmbedder(), store)

    def tag_of(collection: str) -> str:
        reads.append(collection)
        return tags[collection]

    processor._collection_model_tag = tag_of
    return processor


def test_a_worker_dead_letters_rows_for_another_models_collection_and_stores_the_rest() -> None:
    store = FakeStore(collections={"images", "other", "legacy"})
    tags = {"images": "m1", "other": "lite2-v1", "legacy": ""}  # the worker's model is m1
    reads: list[str] = []
    processor = _processor(store, tags, reads)
    messages = [
        FakeMessage(event("a", InlineImage(data=png(50))), 0),
        FakeMessage(event("b", InlineImage(data=png(60)), collection="other"), 1),
        FakeMessage(event("c", InlineImage(data=png(70)), collection="legacy"), 2),
        tombstone(3, "gone", 1, collection="other"),  # a delete writes no vector: applied
    ]
    batch = process(processor, messages)
    outcomes = {item.message.offset(): item.outcome for item in batch.items}
    assert outcomes == {0: Outcome.STORED, 1: Outcome.DEAD, 2: Outcome.STORED, 3: Outcome.DELETED}
    dead = batch.items[1].dead_letter
    assert dead is not None and dead.reason == Reason.COLLECTION_MODEL_MISMATCH
    message = str(dead.error)
    assert "'other'" in message and "'lite2-v1'" in message and "'m1'" in message
    assert "run a worker serving the collection's model" in message
    assert set(store.rows) == {"a", "c"} and store.tombstones == {"gone": 1}
    # Read once per collection: a collection's model never changes.
    process(processor, [FakeMessage(event("d", InlineImage(data=png(80)), collection="other"), 4)])
    assert sorted(reads) == ["images", "legacy", "other"]
    assert np.all(np.isfinite(store.rows["a"].vector))
