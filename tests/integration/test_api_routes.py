"""Every route and error code of the query API on the real stack: one error shape, collections,
insert, auth on and off, rate limit, metrics, CORS, the OpenAPI schema, and 503s when the
services are down."""

from __future__ import annotations

import io
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

import orjson
import pytest
from confluent_kafka import Consumer, TopicPartition
from litestar.testing import TestClient
from PIL import Image

from engine.errors import ConfigurationError, InferenceConfigurationError
from engine.kafka import consumer_config
from engine.settings import Settings
from engine.store import VectorStore
from query_api import create_app
from query_api.ingest import IngestGateway

pytestmark = pytest.mark.stack


@contextmanager
def client_for(settings: Settings, **sections: dict[str, Any]) -> Iterator[TestClient[Any]]:
    """A test client of an app on ``settings`` with some sections' fields replaced."""
    updates = {
        name: getattr(settings, name).model_copy(update=fields) for name, fields in sections.items()
    }
    with TestClient(app=create_app(settings.model_copy(update=updates))) as client:
        yield client


@pytest.fixture
def client(settings: Settings, store: VectorStore) -> Iterator[TestClient[Any]]:
    with client_for(settings) as test_client:
        yield test_client


def png(width: int, height: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(out, format="PNG")
    return out.getvalue()


def assert_error(response: Any, status: int, reason: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body: dict[str, Any] = response.json()
    assert set(body) == {"error", "detail"}, body
    assert "Traceback" not in body["detail"]
    if reason is not None:
        assert body["error"] == reason, body
    return body


def test_every_client_error_has_one_shape_and_the_right_status(
    client: TestClient[Any], settings: Settings, store: VectorStore
) -> None:
    assert_error(client.get("/no/such/route"), 404, "not_found")
    assert_error(client.get("/search"), 405, "method_not_allowed")
    assert_error(
        client.post("/search", content=b"x", headers={"content-type": "text/plain"}),
        415,
        "unsupported_media_type",
    )
    assert_error(
        client.post("/search", content=b"{oops", headers={"content-type": "application/json"}),
        400,
    )
    assert_error(client.post("/search", json={"vector": [0.1], "topk": 0}), 422, "invalid_request")
    assert_error(client.post("/search", json={"topk": 3}), 422, "invalid_request")
    assert_error(client.post("/search", json={"vector": [0.1, 0.2]}), 422, "wrong_dimension")
    vector = [0.01] * settings.milvus.dimension
    assert_error(client.post("/search", json={"id": "nope", "topk": 3}), 404, "unknown_id")
    assert_error(
        client.post("/search", json={"vector": vector, "filter_expr": 'metadata["a"] == ("x"'}),
        422,
        "invalid_filter",
    )
    # Balanced but not Milvus syntax: Milvus's parser refuses it, still a 422.
    assert_error(client.post("/search", json={"vector": vector, "filter_expr": "a === = 1"}), 422)
    assert_error(
        client.post("/search", files={"file": ("x.png", b"not an image", "image/png")}),
        400,
        "not_an_image",
    )
    missing = "missing_collection_x1"
    body = {"vector": vector, "collection_name": missing}
    assert_error(client.post("/search", json=body), 404, "unknown_collection")
    assert_error(client.get(f"/collections/{missing}/stats"), 404, "unknown_collection")
    assert not store.collection_exists(missing)
    outside = "/etc/hostname"
    assert_error(client.post("/embed", json={"query_input": outside}), 400)
    # A URL of another scheme is not a path outside the roots: its scheme is not supported.
    for path in ("/embed", "/search"):
        ftp = client.post(path, json={"query_input": "ftp://example.com/a.jpg"})
        body = assert_error(ftp, 400, "unsupported_scheme")
        assert body["detail"].endswith(
            "scheme 'ftp' is not supported: give an http(s) URL or a file path"
        ), path
    # A zero vector is as near to every stored vector as to any other: refused, not answered.
    zero = assert_error(client.post("/search", json={"vector": [0.0] * 1280}), 422)
    assert "all zeros" in zero["detail"]


def test_limits_answer_413(settings: Settings, store: VectorStore) -> None:
    with client_for(settings, api={"max_upload_bytes": 4096}, fetch={"max_pixels": 2500}) as client:
        big = client.post("/search", files={"file": ("big.bin", b"\0" * 8192, "image/png")})
        assert_error(big, 413)
        pixels = client.post("/search", files={"file": ("p.png", png(60, 60), "image/png")})
        assert_error(pixels, 413, "too_many_pixels")
        fits = client.post("/embed", files={"file": ("s.png", png(40, 40), "image/png")})
        assert fits.status_code == 200, fits.text


def test_collections_are_created_described_and_dropped_on_purpose(
    client: TestClient[Any], store: VectorStore, unique: str
) -> None:
    name = f"made_{unique}"
    # No dim: it follows the model the collection is bound to (the configured one here).
    spec = {"name": name, "description": "d", "index_type": "HNSW", "params": {"M": 8}}
    try:
        assert client.post("/collections/create", json=spec).status_code == 201
        again = client.post("/collections/create", json=spec)
        assert (again.status_code, again.json()["created"]) == (200, False)
        assert name in client.get("/collections").json()["collections"]
        stats = client.get(f"/collections/{name}/stats").json()
        model = client.app.state.search_service.collection_model(name)
        assert stats["dimension"] == model.output_dim and stats["row_count"] == 0
        assert stats["model"] == {
            "name": model.name,
            "tag": model.model_version_tag,
            "dim": model.output_dim,
        }
        assert stats["index"]["index_type"] == "HNSW" and stats["index"]["params"]["M"] == 8
        bad = {**spec, "name": f"bad_{unique}", "params": {"nlist": 8}}
        assert_error(client.post("/collections/create", json=bad), 422, "invalid_index")
        assert not store.collection_exists(f"bad_{unique}")
        assert client.delete(f"/collections/{name}").status_code == 204
        assert_error(client.delete(f"/collections/{name}"), 404, "unknown_collection")
    finally:
        if store.collection_exists(name):
            store.drop_collection(name)


def test_insert_publishes_events_and_answers_202(
    client: TestClient[Any], settings: Settings, tmp_path: Path
) -> None:
    image = tmp_path / "red.png"
    image.write_bytes(png(32, 32))
    body = {"inputs": [str(image)], "ids": ["red-1"], "metadata": [{"colour": "red"}]}
    accepted = client.post("/insert", json=body)
    assert accepted.status_code == 202, accepted.text
    answer = accepted.json()
    where = answer.pop("items")
    assert answer == {
        "ids": ["red-1"],
        "collection": settings.milvus.collection,
        "status": "accepted",
    }
    assert [item["id"] for item in where] == ["red-1"]
    consumer = Consumer(
        consumer_config(settings.kafka, **{"group.id": f"probe-{image.stat().st_ino}"})
    )
    try:
        consumer.subscribe([settings.kafka.topic])
        message = None
        for _ in range(60):
            message = consumer.poll(1.0)
            if message is not None and message.error() is None:
                break
        assert message is not None and message.error() is None, "no event on the topic"
        event = orjson.loads(message.value())
    finally:
        consumer.close()
    assert event["id"] == "red-1" and event["collection"] == settings.milvus.collection
    assert (message.partition(), message.offset()) == (where[0]["partition"], where[0]["offset"])
    assert event["image"] == {"kind": "path", "path": str(image)}
    assert event["metadata"]["colour"] == "red"

    assert_error(client.post("/insert", json={**body, "ids": ["a", "b"]}), 422, "invalid_request")
    assert_error(client.post("/insert", json={"inputs": ["http://"]}), 400, "invalid_reference")
    # A NUL byte once reached the filesystem and came back as a 500 (found by schemathesis).
    nul = client.post("/insert", json={"inputs": ["/data/a\u0000.jpg"]})
    assert_error(nul, 400, "invalid_reference")
    unknown = client.post("/insert", json={**body, "collection_name": "never_made_x2"})
    assert_error(unknown, 404, "unknown_collection")


def published(settings: Settings) -> int:
    """How many records the test's ingest topic holds."""
    consumer = Consumer(consumer_config(settings.kafka, **{"group.id": "probe-published"}))
    try:
        topic = settings.kafka.topic
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        ends = [consumer.get_watermark_offsets(TopicPartition(topic, p)) for p in partitions]
        return sum(high - low for low, high in ends)
    finally:
        consumer.close()


def test_insert_refuses_what_it_can_know_and_then_publishes_nothing(
    client: TestClient[Any], settings: Settings, store: VectorStore, tmp_path: Path, unique: str
) -> None:
    good = tmp_path / "good.png"
    good.write_bytes(png(32, 32))
    refused = {
        "/etc/hostname": "path_not_allowed",
        str(tmp_path / ".." / "elsewhere.png"): "path_not_allowed",
        "http://127.0.0.1:8080/a.jpg": "forbidden_address",
        "http://169.254.169.254/latest/meta-data": "forbidden_address",
        "http://localhost/a.jpg": "forbidden_address",
        "ftp://example.com/a.jpg": "unsupported_scheme",
    }
    for reference, reason in refused.items():
        body = assert_error(client.post("/insert", json={"inputs": [reference]}), 400, reason)
        assert "inputs[0]" in body["detail"], body
    outside = assert_error(client.post("/insert", json={"inputs": ["/etc/hostname"]}), 400)
    assert "fetch.allowed_roots" in outside["detail"]

    # All or nothing: one bad input of three, and none of them is published.
    mixed = {"inputs": [str(good), "http://10.1.2.3/x.jpg", str(good)], "ids": ["a", "b", "c"]}
    body = assert_error(client.post("/insert", json=mixed), 400, "forbidden_address")
    assert body["detail"].startswith("1 of 3 inputs refused, so nothing was published")
    assert "inputs[1]" in body["detail"] and "inputs[0]" not in body["detail"]
    two = {"inputs": ["/etc/passwd", str(good), "ftp://x/y.jpg"]}
    body = assert_error(client.post("/insert", json=two), 400, "path_not_allowed")
    assert "inputs[0]" in body["detail"] and "inputs[2]" in body["detail"]
    assert "scheme 'ftp' is not supported" in body["detail"]
    unknown = {"inputs": [str(good)], "collection_name": f"never_made_{unique}"}
    assert_error(client.post("/insert", json=unknown), 404, "unknown_collection")
    narrow = f"narrow_{unique}"
    store.create_collection(narrow, dimension=64)
    try:
        other = {"inputs": [str(good)], "collection_name": narrow}
        body = assert_error(client.post("/insert", json=other), 422, "wrong_dimension")
        assert "holds 64-d vectors" in body["detail"]
    finally:
        store.drop_collection(narrow)
    assert published(settings) == 0

    # A host name that does not resolve here is the worker's to judge (its DNS may differ).
    fine = {"inputs": [str(good), "https://images.example/a.jpg"]}
    accepted = client.post("/insert", json=fine)
    assert accepted.status_code == 202, accepted.text
    assert published(settings) == 2


def test_auth_on_requires_a_key_except_on_open_routes(
    settings: Settings, store: VectorStore, tmp_path: Path
) -> None:
    key_file = tmp_path / "keys"
    key_file.write_text("# team keys\nfile-key\n")
    api = {"auth": "on", "api_keys": ["settings-key"], "api_keys_file": key_file}
    with client_for(settings, api=api) as client:
        assert_error(client.get("/collections"), 401, "unauthorized")
        assert_error(client.get("/collections", headers={"X-API-Key": "wrong"}), 401)
        for key in ("settings-key", "file-key"):
            assert client.get("/collections", headers={"X-API-Key": key}).status_code == 200
        for open_route in ("/health", "/livez", "/readyz", "/", "/openapi.json", "/docs"):
            assert client.get(open_route).status_code == 200, open_route
        schema = client.get("/openapi.json").json()
        assert schema["components"]["securitySchemes"]["ApiKey"]["name"] == "X-API-Key"
    with client_for(settings, api={"auth": "off"}) as client:
        assert client.get("/collections").status_code == 200


def test_auth_defaults_on_unless_listening_on_loopback(settings: Settings) -> None:
    exposed = settings.model_copy(
        update={"api": settings.api.model_copy(update={"host": "0.0.0.0"})}
    )
    with pytest.raises(ConfigurationError, match="requires API keys"):
        create_app(exposed)
    with client_for(settings, api={"host": "0.0.0.0", "api_keys": ["k"]}) as client:
        assert_error(client.get("/collections"), 401)
    assert settings.api.auth == "auto" and settings.api.host == "127.0.0.1"


def test_rate_limit_answers_429_with_retry_after(settings: Settings, store: VectorStore) -> None:
    with client_for(settings, api={"rate_limit_per_minute": 3}) as client:
        for _ in range(3):
            assert client.get("/collections").status_code == 200
        limited = client.get("/collections")
        assert_error(limited, 429, "rate_limited")
        assert int(limited.headers["Retry-After"]) >= 1
        assert client.get("/livez").status_code == 200  # probes are never limited


def test_metrics_count_requests_by_route_method_and_status(
    settings: Settings, store: VectorStore
) -> None:
    with client_for(settings, api={"auth": "on", "api_keys": ["k"]}) as client:
        client.get("/collections", headers={"X-API-Key": "k"})
        client.get("/collections", headers={"X-API-Key": "k"})
        client.get("/collections")
        text = client.get("/metrics").text
    assert 'trident_api_requests_total{method="GET",route="/collections",status="200"} 2.0' in text
    assert 'trident_api_requests_total{method="GET",route="/collections",status="401"} 1.0' in text
    assert re.search(r'trident_api_request_seconds_count\{route="/collections"\} 3\.0', text)
    assert "trident_api_in_flight_requests 1.0" in text  # the /metrics request itself


def test_cors_is_closed_by_default_and_configurable(settings: Settings, store: VectorStore) -> None:
    preflight = {
        "Origin": "http://app.example",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "X-API-Key",
    }
    with client_for(settings) as client:
        closed = client.options("/search", headers=preflight)
        assert "access-control-allow-origin" not in closed.headers
    with client_for(settings, api={"cors_origins": ["http://app.example"]}) as client:
        opened = client.options("/search", headers=preflight)
        assert opened.headers["access-control-allow-origin"] == "http://app.example"
        assert "x-api-key" in opened.headers["access-control-allow-headers"].lower()


def test_openapi_is_titled_versioned_and_lists_every_route(client: TestClient[Any]) -> None:
    schema = client.get("/openapi.json").json()
    assert schema["info"]["title"] == "Embedding Trident"
    assert schema["info"]["version"] == metadata.version("embedding-trident")
    assert set(schema["paths"]) >= {
        "/health",
        "/livez",
        "/readyz",
        "/metrics",
        "/collections",
        "/collections/create",
        "/collections/{name}/stats",
        "/collections/{name}",
        "/search",
        "/search/upload",
        "/embed",
        "/embed/upload",
        "/insert",
        "/items/{collection}/{item_path}",
        "/items/delete",
    }
    item = schema["paths"]["/items/{collection}/{item_path}"]
    assert set(item) == {"get", "delete"}
    ok = item["get"]["responses"]["200"]["content"]
    assert set(ok) == {"application/json", "image/jpeg"}
    assert {ref["$ref"].rsplit("/", 1)[1] for ref in ok["application/json"]["schema"]["oneOf"]} == {
        "ItemRecord",
        "ItemStatus",
    }
    # The earlier API's path takes both bodies; the multipart one is served by /search/upload.
    for path in ("/search", "/embed"):
        content = schema["paths"][path]["post"]["requestBody"]["content"]
        assert set(content) == {"application/json", "multipart/form-data"}, path
    docs = client.get("/docs")
    assert docs.status_code == 200 and "Embedding Trident" in docs.text


def test_health_and_readiness_report_each_service(client: TestClient[Any]) -> None:
    health = client.get("/health")
    assert health.status_code == 200, health.text
    body = health.json()
    assert body["status"] == "ok"
    assert {body[name]["state"] for name in ("triton", "milvus", "kafka")} == {"up"}
    assert client.get("/readyz").json() == {"status": "ready"}
    assert client.get("/livez").json() == {"status": "alive"}


def test_kafka_down_degrades_health_but_searches_go_on(
    settings: Settings, store: VectorStore
) -> None:
    dead = settings.kafka.model_copy(update={"bootstrap_servers": "127.0.0.1:9"})
    gateway = IngestGateway(dead, store, acknowledge_timeout_s=2.0)
    app = create_app(settings.model_copy(update={"kafka": dead}), ingest=gateway)
    with TestClient(app=app) as client:
        health = client.get("/health")
        assert health.status_code == 200, health.text
        body = health.json()
        assert (body["status"], body["kafka"]["state"], body["milvus"]["state"]) == (
            "degraded",
            "down",
            "up",
        )
        assert client.get("/readyz").status_code == 200
        vector = [0.01] * settings.milvus.dimension
        assert client.post("/search", json={"vector": vector}).status_code == 200
        insert = client.post("/insert", json={"inputs": ["https://example.com/a.jpg"]})
        assert_error(insert, 503, "kafka_unavailable")
        assert insert.headers["Retry-After"] == "5"


def test_services_down_answer_503_with_retry_after(settings: Settings) -> None:
    dead = {
        "kafka": {"bootstrap_servers": "127.0.0.1:9"},
        "milvus": {"uri": "http://127.0.0.1:9", "timeout_s": 2.0},
        # Not waited for at start-up: the API starts and reports Triton down.
        "triton": {"url": "127.0.0.1:9", "request_timeout_s": 2.0, "ready_timeout_s": 0},
    }
    with client_for(settings, **dead) as client:
        health = client.get("/health")
        assert health.status_code == 503 and health.headers["Retry-After"] == "5"
        body = health.json()
        assert body["status"] == "degraded"
        assert {body[name]["state"] for name in ("triton", "milvus", "kafka")} == {"down"}
        assert client.get("/readyz").status_code == 503
        search = client.post("/search", json={"vector": [0.1] * 1280})
        assert_error(search, 503, "milvus_unavailable")
        assert search.headers["Retry-After"] == "5"
        embed = client.post("/embed", files={"file": ("s.png", png(40, 40), "image/png")})
        assert_error(embed, 503, "triton_unavailable")


def test_the_api_does_not_start_on_a_model_triton_does_not_serve(settings: Settings) -> None:
    triton = settings.triton.model_copy(update={"model_name": "nope"})
    app = create_app(settings.model_copy(update={"triton": triton}))
    began = time.monotonic()
    with pytest.raises(BaseExceptionGroup) as raised, TestClient(app=app):  # the lifespan's
        pass
    assert raised.group_contains(InferenceConfigurationError, match="does not serve model 'nope'")
    assert time.monotonic() - began < 60  # at once, not after triton.ready_timeout_s
