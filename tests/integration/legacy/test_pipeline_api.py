"""The earlier pipeline's Python API on the real stack: ImageEmbeddingPipeline per index type,
the earlier YAML and environment variables, TritonClient, and a user's BaseJAXPreprocessor in
the pipeline, a worker and the query API (by import path)."""

from __future__ import annotations

import functools
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from devstack.samples import derived_image_set
from devstack.stack import LocalStack
from engine.errors import (
    ImageReferenceError,
    InferenceConfigurationError,
    InvalidQueryError,
    UnknownCollectionError,
)
from engine.models import DEFAULT_MODEL_SPEC
from engine.settings import Settings
from engine.store import VectorStore
from jax_embedding import ImageEmbeddingPipeline, ServiceConfig, TritonClient
from producer import EventPublisher, events_from_folder
from query_api import SearchService
from schemas import HEADER_COLLECTION, HEADER_VERSION
from schemas.search import SearchOptions
from tests.integration.conftest import running_worker, wait_for
from tests.integration.legacy.conftest import N_IMAGES
from tests.integration.test_items_api import UNICODE_ID, tombstones
from tests.support.custom_preprocessing import GreyscalePreprocessor

pytestmark = pytest.mark.stack

CUSTOM = "tests.support.custom_preprocessing:GreyscalePreprocessor"
Vectors = npt.NDArray[np.float32]


def stack_config(stack: LocalStack, images: list[Path], **milvus: Any) -> ServiceConfig:
    """The earlier configuration, pointed at the test stack."""
    return ServiceConfig(
        triton={"url": stack.config.triton_url, "protocol": "http"},
        milvus={
            "host": stack.config.host,
            "port": stack.config.milvus_port,
            "token": stack.milvus.token,
            **milvus,
        },
        kafka={"bootstrap_servers": stack.config.kafka_bootstrap},
        fetch={"allowed_roots": [str(images[0].parent)]},
        preprocess={"batch_size": 4},
    )


def cosine(a: Vectors, b: Vectors) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


# Index configuration -> (build, search) parameters the collection must report.
INDEXES: dict[str, tuple[dict[str, Any], dict[str, int], dict[str, int]]] = {
    "FLAT": ({"index_type": "FLAT"}, {}, {}),
    "IVF_FLAT": (
        {"index_type": "IVF_FLAT", "nlist": 16, "nprobe": 8},
        {"nlist": 16},
        {"nprobe": 8},
    ),
    "HNSW": (
        {"index_type": "HNSW", "M": 8, "efConstruction": 64, "ef": 32},
        {"M": 8, "efConstruction": 64},
        {"ef": 32},
    ),
}


@pytest.mark.parametrize("index_type", list(INDEXES))
def test_each_index_type_end_to_end(
    stack: LocalStack, images: list[Path], collection: str, index_type: str
) -> None:
    index, expected_build, expected_search = INDEXES[index_type]
    ids = [f"img_{i}" for i in range(N_IMAGES)]
    metadata = [{"group": "even" if i % 2 == 0 else "odd", "n": i} for i in range(N_IMAGES)]
    with ImageEmbeddingPipeline(stack_config(stack, images, **index)) as pipeline:
        assert pipeline.create_collection(name=collection, dim=1280, description="legacy test")
        assert not pipeline.create_collection(name=collection, dim=1280)
        inserted = pipeline.insert_images(
            inputs=[str(p) for p in images], ids=ids, metadata=metadata, collection_name=collection
        )
        assert inserted == ids

        # Searchable as soon as insert_images returns: every image finds itself first.
        for path, item_id, meta in zip(images, ids, metadata, strict=True):
            results = pipeline.search_images(
                query_input=str(path), topk=3, collection_name=collection
            )
            assert [set(r) for r in results] == [{"id", "score", "metadata"}] * 3
            assert results[0]["id"] == item_id, results
            assert results[0]["score"] >= 0.99
            assert results[0]["metadata"] == meta
            scores = [r["score"] for r in results]
            assert scores == sorted(scores, reverse=True)

        odd = pipeline.search_images(
            str(images[0]),
            topk=N_IMAGES,
            collection_name=collection,
            filter_expr='metadata["group"] == "odd"',
        )
        assert sorted(r["id"] for r in odd) == ids[1::2]

        stats = pipeline.get_collection_stats(collection)
        assert stats["row_count"] == N_IMAGES and stats["dimension"] == 1280
        assert stats["index"]["index_type"] == index["index_type"]
        assert expected_build.items() <= stats["index"]["params"].items()
        assert expected_search.items() <= stats["index"]["search_params"].items()
        assert stats["description"] == "legacy test"

        embeddings = pipeline.embed_images([str(p) for p in images])
        assert embeddings.shape == (N_IMAGES, 1280) and embeddings.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)
    store = VectorStore(pipeline.settings.milvus)
    try:
        rows = store.get(ids, collection, with_vectors=True)
    finally:
        store.close()
    stored = {row["id"]: row["embedding"] for row in rows}
    np.testing.assert_allclose(np.array([stored[i] for i in ids]), embeddings, atol=1e-5)

    with ImageEmbeddingPipeline(stack_config(stack, images)) as pipeline:
        pipeline.delete_collection(collection)
        assert collection not in pipeline.list_collections()
        with pytest.raises(UnknownCollectionError, match="create it first"):
            pipeline.search_images(str(images[0]), collection_name=collection)


def test_delete_images_publishes_deletes_that_a_worker_applies(
    stack: LocalStack, images: list[Path], collection: str, settings: Settings
) -> None:
    config = stack_config(stack, images)
    config.kafka.topic = settings.kafka.topic  # the topic the test's worker reads
    ids = ["cats/1", UNICODE_ID, "keep"]
    with ImageEmbeddingPipeline(config) as pipeline:
        pipeline.create_collection(collection)
        pipeline.insert_images([str(p) for p in images[:3]], ids=ids, collection_name=collection)
        with pytest.raises(UnknownCollectionError, match="create it first"):
            pipeline.delete_images(["cats/1"], "never_made_p1")
        with pytest.raises(InvalidQueryError, match="cannot be deleted"):
            pipeline.delete_images(["tab\there"], collection)
        published = pipeline.delete_images(["cats/1", UNICODE_ID, "cats/1"], collection)
        assert [item["id"] for item in published] == ["cats/1", UNICODE_ID]
        found = tombstones(settings)
        assert set(found) == {"cats/1", UNICODE_ID}  # the refused calls published nothing
        for item in published:
            record = found[item["id"]]
            assert (record.partition, record.offset) == (item["partition"], item["offset"])
            assert record.header(HEADER_VERSION) == str(item["version"])
            assert record.header(HEADER_COLLECTION) == collection == item["collection"]
        # Published, not written: the rows stay until a worker applies the deletes.
        assert pipeline.get_collection_stats(collection)["row_count"] == 3
        with running_worker(settings):
            wait_for(
                lambda: pipeline.get_collection_stats(collection)["row_count"] == 1,
                timeout=120,
                what="the deletes applied",
            )
        hits = pipeline.search_images(str(images[0]), topk=3, collection_name=collection)
        assert [hit["id"] for hit in hits] == ["keep"]


def test_the_earlier_readme_yaml_drives_the_pipeline(
    stack: LocalStack, images: list[Path], collection: str, tmp_path: Path
) -> None:
    # The earlier README's YAML, with this stack's addresses and the served model's names.
    config_file = tmp_path / "config.yaml"
    config_file.write_text(
        f"""\
triton:
  url: "{stack.config.triton_url}"
  model_name: "{DEFAULT_MODEL_SPEC.name}"
  protocol: "http"
  input_name: "{DEFAULT_MODEL_SPEC.input_name}"
  output_name: "{DEFAULT_MODEL_SPEC.output_name}"

milvus:
  host: "{stack.config.host}"
  port: {stack.config.milvus_port}
  token: "{stack.milvus.token}"
  embedding_dim: 1280
  vector_field: "vector"
  index_type: "IVF_FLAT"
  nlist: 8

preprocess:
  image_size: [224, 224]
  batch_size: 2
"""
    )
    config = ServiceConfig.from_yaml(config_file)
    config.fetch.allowed_roots = [images[0].parent]
    with ImageEmbeddingPipeline(config) as pipeline:
        assert pipeline.health_check() == {"triton": True, "milvus": True}
        pipeline.create_collection(collection, dim=config.milvus.embedding_dim)
        pipeline.insert_images([str(p) for p in images[:3]], collection_name=collection)
        assert pipeline.get_collection_stats(collection)["index"]["params"] == {"nlist": 8}
        results = pipeline.search_images(str(images[1]), topk=1, collection_name=collection)
    assert results[0]["id"] == str(images[1])  # ids default to the inputs


def test_the_earlier_environment_variables_drive_the_pipeline(
    stack: LocalStack, images: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TRITON_URL", stack.config.triton_grpc_url)
    monkeypatch.setenv("TRITON_PROTOCOL", "grpc")
    monkeypatch.setenv("TRITON_MODEL_NAME", DEFAULT_MODEL_SPEC.name)
    monkeypatch.setenv("TRITON_INPUT_NAME", DEFAULT_MODEL_SPEC.input_name)
    monkeypatch.setenv("TRITON_OUTPUT_NAME", DEFAULT_MODEL_SPEC.output_name)
    monkeypatch.setenv("MILVUS_HOST", stack.config.host)
    monkeypatch.setenv("MILVUS_PORT", str(stack.config.milvus_port))
    monkeypatch.setenv("MILVUS_EMBEDDING_DIM", "1280")
    monkeypatch.setenv("MILVUS_TOKEN", stack.milvus.token)
    monkeypatch.setenv("JAX_USE_GPU", "false")
    config = ServiceConfig()
    config.fetch.allowed_roots = [images[0].parent]
    with ImageEmbeddingPipeline(config) as pipeline:
        assert pipeline.health_check() == {"triton": True, "milvus": True}
        assert pipeline.embed_images([str(images[0])]).shape == (1, 1280)

    # The variables really are what is used: a wrong tensor name makes Triton refuse.
    monkeypatch.setenv("TRITON_OUTPUT_NAME", "no_such_output")
    config = ServiceConfig()
    config.fetch.allowed_roots = [images[0].parent]
    with (
        ImageEmbeddingPipeline(config) as pipeline,
        pytest.raises(InferenceConfigurationError, match="no_such_output"),
    ):
        pipeline.embed_images([str(images[0])])


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_triton_client_tensor_name_overrides_and_async_infer(
    stack: LocalStack, images: list[Path], protocol: str
) -> None:
    url = stack.config.triton_url if protocol == "http" else stack.config.triton_grpc_url
    batch = GreyscalePreprocessor(batch_sizes=(4,)).preprocess(
        [np.full((50, 60, 3), value, np.uint8) for value in (0, 90, 180)]
    )
    with TritonClient(
        url=url,
        model_name=DEFAULT_MODEL_SPEC.name,
        protocol=protocol,  # type: ignore[arg-type]
        input_name="wrong_input",
        output_name="wrong_output",
    ) as client:
        assert client.is_ready()
        with pytest.raises(InferenceConfigurationError, match="wrong_"):
            client.infer(batch)
        right = client.infer(batch, input_name="images", output_name="embedding")
        assert right.shape == (3, 1280)
        assert cosine(right[0], right[2]) < 0.999  # different inputs, different embeddings

        failures: list[Any] = []
        failed = client.async_infer(batch, failures.append)
        assert isinstance(failed.exception(timeout=60), InferenceConfigurationError)
        assert len(failures) == 1 and isinstance(failures[0], InferenceConfigurationError)

    with TritonClient(url=url, protocol=protocol) as client:  # type: ignore[arg-type]
        results: list[Any] = []
        future = client.async_infer(batch, results.append)
        np.testing.assert_allclose(future.result(timeout=60), right, atol=1e-5)
        assert len(results) == 1
        np.testing.assert_allclose(results[0], right, atol=1e-5)


def test_a_user_preprocessor_in_the_pipeline_worker_and_query_api(
    stack: LocalStack, settings: Settings, store: VectorStore, tmp_path: Path
) -> None:
    paths = derived_image_set(tmp_path / "images", 4)
    config = stack_config(stack, paths)
    custom = GreyscalePreprocessor(batch_sizes=(1, 4), fetch=settings.fetch)
    with ImageEmbeddingPipeline(config, preprocessor=custom) as pipeline:
        embedded = pipeline.embed_images([str(p) for p in paths])
    with ImageEmbeddingPipeline(config) as pipeline:
        built_in = pipeline.embed_images([str(p) for p in paths])
    # The user's preprocessing is what ran: Triton on its batch, not on the built-in one's.
    with TritonClient(url=stack.config.triton_url) as client:
        direct = client.infer(custom.preprocess_batch(paths))
    direct = direct / np.linalg.norm(direct, axis=1, keepdims=True)
    np.testing.assert_allclose(embedded, direct, atol=1e-5)
    assert max(cosine(a, b) for a, b in zip(embedded, built_in, strict=True)) < 0.99

    # A worker told the class by import path stores exactly those vectors ...
    # Validated like a settings file (model_copy would skip it): the float32 model follows.
    custom_preprocess = {"class": CUSTOM, "batch_sizes": settings.preprocess.batch_sizes}
    by_path = stack.settings(
        **{**settings.model_dump(exclude={"triton", "preprocess"}), "preprocess": custom_preprocess}
    )
    with running_worker(by_path):
        with EventPublisher(by_path.kafka) as publisher:
            report = publisher.publish_many(events_from_folder(tmp_path / "images"))
        assert report.delivered == len(paths)
        wait_for(lambda: store.count() == len(paths), timeout=180, what="custom vectors stored")
    rows = store.get([p.name for p in paths], with_vectors=True)
    stored = {row["id"]: np.asarray(row["embedding"], np.float32) for row in rows}
    for path, vector in zip(paths, embedded, strict=True):
        np.testing.assert_allclose(stored[path.name], vector, atol=1e-4)

    # ... and the query API embeds queries the same way, so each finds itself.
    service = SearchService.from_settings(by_path)
    try:
        assert isinstance(service._preprocessor, GreyscalePreprocessor)
        query = service.embed_reference(str(paths[2]))
        assert cosine(query, embedded[2]) > 0.9999
        assert service.search(query, SearchOptions(topk=1))[0].id == paths[2].name
    finally:
        service.close()


def test_closing_one_pipeline_leaves_another_on_the_same_milvus_working(
    stack: LocalStack, images: list[Path], collection: str
) -> None:
    config = stack_config(stack, images)
    with ImageEmbeddingPipeline(config) as first:
        first.create_collection(collection)
        with ImageEmbeddingPipeline(config) as second:
            assert collection in second.list_collections()
        assert first.get_collection_stats(collection)["row_count"] == 0


@pytest.fixture
def image_server(images: list[Path]) -> Iterator[str]:
    """The images over HTTP on loopback; yields the base URL."""
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(images[0].parent))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def test_urls_are_embedded_behind_the_worker_fence(
    stack: LocalStack, images: list[Path], image_server: str
) -> None:
    url = f"{image_server}/{images[2].name}"
    config = stack_config(stack, images)
    with ImageEmbeddingPipeline(config) as pipeline:
        # Loopback is a private address: refused unless allowed, as in the worker.
        with pytest.raises(ImageReferenceError, match=r"127\.0\.0\.1.*allowed_hosts"):
            pipeline.embed_images([url])
        by_path = pipeline.embed_images([str(images[2])])
    config.fetch.allowed_hosts = ["127.0.0.1"]
    with ImageEmbeddingPipeline(config) as pipeline:
        by_url = pipeline.embed_images([url])
    np.testing.assert_allclose(by_url, by_path, atol=1e-6)
