"""The life of an item through the query API, on the real stack: one item's record, deletes
(one id, a list, a filter with a dry run and a cap), all published as tombstones and applied by
a worker, and where an item is (its status: pending, stored, dead_lettered, deleted, unknown),
through the API and ``trident-dlq status``."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
import pytest
from litestar.testing import TestClient

from devstack.stack import LocalStack
from engine.records import VectorRecord
from engine.settings import Settings
from engine.store import VectorStore
from producer.dead_letters import DeadLetterReader, DeadLetterRecord
from producer.dlq_cli import main as dlq_main
from producer.publisher import AsyncEventPublisher, Delivery, EventPublisher
from producer.status import key_partition
from query_api import create_app
from schemas import HEADER_COLLECTION, HEADER_VERSION, DeleteEvent
from tests.integration.conftest import running_worker, small_images, wait_for
from tests.integration.test_api_routes import assert_error

pytestmark = pytest.mark.stack

# A slash, a space and letters outside ASCII: percent-encoded on the way, one id all the same.
UNICODE_ID = "猫/ü x"


@pytest.fixture
def client(settings: Settings, store: VectorStore) -> Iterator[TestClient[Any]]:
    with TestClient(app=create_app(settings)) as test_client:
        yield test_client


def items_url(collection: str, item_id: str, view: str = "") -> str:
    return f"/items/{collection}/{quote(item_id, safe='/')}" + (f"/{view}" if view else "")


def topic_records(settings: Settings, topic: str | None = None) -> list[DeadLetterRecord]:
    """Every record of a topic (default: the ingest topic), read without a consumer group."""
    with DeadLetterReader(settings.kafka, topic=topic or settings.kafka.topic) as reader:
        return list(reader.read())


def tombstones(settings: Settings) -> dict[str, DeadLetterRecord]:
    return {
        record.key.decode(): record
        for record in topic_records(settings)
        if record.value is None and record.key is not None
    }


def stored_record(item_id: str, metadata: dict[str, Any], version: int = 7) -> VectorRecord:
    vector = np.random.default_rng(abs(hash(item_id)) % 2**32).random(1280, dtype=np.float32)
    return VectorRecord(
        id=item_id,
        vector=vector / np.linalg.norm(vector),
        metadata=metadata,
        source=f"/data/{item_id}",
        content_sha256="ab" * 32,
        model_version="model-x",
        event_version=version,
        ingested_at_ms=1_700_000_000_000,
    )


def test_delete_publishes_a_tombstone_keyed_by_the_id_and_answers_202(
    client: TestClient[Any], settings: Settings
) -> None:
    collection = settings.milvus.collection
    answers = {}
    for item_id in ("cats/0001.jpg", UNICODE_ID, "/data/a.jpg", "x/status"):
        response = client.delete(items_url(collection, item_id))
        assert response.status_code == 202, response.text
        body = response.json()
        assert set(body) == {"id", "collection", "version", "partition", "offset"}
        assert (body["id"], body["collection"]) == (item_id, collection)
        # Where librdkafka's default partitioner puts the key: the status scans it first.
        assert body["partition"] == key_partition(item_id.encode(), 4)
        answers[item_id] = body
    found = tombstones(settings)
    assert set(found) == set(answers)
    for item_id, body in answers.items():
        record = found[item_id]
        assert (record.partition, record.offset) == (body["partition"], body["offset"])
        assert record.header(HEADER_VERSION) == str(body["version"])
        assert record.header(HEADER_COLLECTION) == collection
    assert_error(client.delete(items_url("never_made_d1", "a")), 404, "unknown_collection")
    assert_error(client.delete(items_url(collection, "tab\there")), 400, "schema_invalid")
    assert len(topic_records(settings)) == 4  # nothing published for the refused ones


def test_both_publishers_publish_deletes_as_tombstones(settings: Settings) -> None:
    answered: list[Delivery] = []
    with EventPublisher(settings.kafka) as publisher:
        publisher.publish_delete(DeleteEvent(id="sync/1", version=5), on_delivery=answered.append)
        publisher.flush(30)

    async def publish() -> Delivery:
        async with AsyncEventPublisher(settings.kafka) as publisher:
            return await publisher.publish_delete(DeleteEvent(id="async/1", collection="c"))

    answered.append(asyncio.run(publish()))
    found = tombstones(settings)
    assert set(found) == {"sync/1", "async/1"}
    for delivery in answered:
        assert delivery.ok, delivery
        record = found[delivery.key]
        assert (record.partition, record.offset) == (delivery.partition, delivery.offset)
    assert found["sync/1"].header(HEADER_VERSION) == "5"
    assert found["sync/1"].header(HEADER_COLLECTION) is None  # the worker's default
    assert found["async/1"].header(HEADER_COLLECTION) == "c"


def test_an_items_record_its_views_and_404s(
    client: TestClient[Any], settings: Settings, store: VectorStore
) -> None:
    collection = settings.milvus.collection
    ids = ["cats/0001.jpg", UNICODE_ID, "/data/a.jpg", "x/status"]
    store.upsert([stored_record(item_id, {"n": n}) for n, item_id in enumerate(ids)])
    wait_for(
        lambda: len(store.get(ids)) == len(ids), timeout=30, what="the rows readable (Bounded)"
    )
    for n, item_id in enumerate(ids):
        url = items_url(collection, item_id, "record" if item_id == "x/status" else "")
        response = client.get(url)
        assert response.status_code == 200, (item_id, response.text)
        assert response.json() == {
            "id": item_id,
            "collection": collection,
            "metadata": {"n": n},
            "source": f"/data/{item_id}",
            "version": 7,
            "model_tag": "model-x",
            "content_sha256": "ab" * 32,
            "stored_at": "2023-11-14T22:13:20Z",
        }
    # The last segment names the view: "x/status" without /record is the status of "x".
    status_of_x = client.get(items_url(collection, "x/status")).json()
    assert (status_of_x["id"], status_of_x["state"]) == ("x", "unknown")
    # ... or the slash before it is encoded, making one segment.
    encoded = client.get(f"/items/{collection}/x%2Fstatus").json()
    assert encoded["id"] == "x/status" and encoded["version"] == 7
    missing = assert_error(client.get(items_url(collection, "cats/nope.jpg")), 404, "unknown_id")
    assert "/status says whether it is pending" in missing["detail"]
    assert_error(client.get(items_url("never_made_r1", "a")), 404, "unknown_collection")
    assert_error(client.get(items_url("never_made_r1", "a", "status")), 404, "unknown_collection")


def test_bulk_deletes_by_ids_and_by_filter_with_a_dry_run_and_a_cap(
    client: TestClient[Any], settings: Settings, store: VectorStore
) -> None:
    kinds = {"a/1": "a", "a/2": "a", "a/3": "a", "b/1": "b", "b/2": "b"}
    store.upsert([stored_record(i, {"kind": kind}) for i, kind in kinds.items()])
    structured = {"field": "kind", "op": "eq", "value": "a"}

    dry = client.post("/items/delete", json={"filter": structured, "dry_run": True})
    assert dry.status_code == 200, dry.text
    assert dry.json() == {
        "collection": settings.milvus.collection,
        "dry_run": True,
        "matched": 3,
        "truncated": False,
        "ids": ["a/1", "a/2", "a/3"],
        "published": 0,
        "items": [],
    }
    capped = {"filter_expr": 'metadata["kind"] == "a"', "max_items": 2}
    assert_error(client.post("/items/delete", json=capped), 422, "too_many_matches")
    listed = client.post("/items/delete", json={**capped, "dry_run": True}).json()
    assert (listed["matched"], listed["truncated"], len(listed["ids"])) == (2, True, 2)
    assert set(listed["ids"]) < {"a/1", "a/2", "a/3"}
    assert tombstones(settings) == {}  # neither a dry run nor a refusal published anything

    deleted = client.post("/items/delete", json={"filter": structured, "max_items": 3})
    assert deleted.status_code == 202, deleted.text
    body = deleted.json()
    assert (body["matched"], body["published"], body["ids"]) == (3, 3, ["a/1", "a/2", "a/3"])
    assert len({item["version"] for item in body["items"]}) == 1  # one version per request
    by_ids = client.post("/items/delete", json={"ids": ["b/1", "gone", "b/1"]})
    assert by_ids.status_code == 202, by_ids.text
    assert by_ids.json()["ids"] == ["b/1", "gone"]
    found = tombstones(settings)
    assert set(found) == {"a/1", "a/2", "a/3", "b/1", "gone"}
    for item in [*body["items"], *by_ids.json()["items"]]:
        record = found[item["id"]]
        assert (record.partition, record.offset) == (item["partition"], item["offset"])

    both = {"ids": ["a"], "filter_expr": "id != ''"}
    problem = assert_error(client.post("/items/delete", json=both), 422, "invalid_request")
    assert "exactly one of ids" in problem["detail"]
    bad = {"filter_expr": 'metadata["kind"] === "a"'}
    assert_error(client.post("/items/delete", json=bad), 422)
    unknown = {"ids": ["a"], "collection_name": "never_made_b1"}
    assert_error(client.post("/items/delete", json=unknown), 404, "unknown_collection")
    assert len(tombstones(settings)) == 5
    assert store.count() == 5  # the API never writes to Milvus: the worker applies deletes


def test_status_follows_an_item_from_pending_to_stored_to_deleted_and_a_bad_image_to_the_dlq(
    settings: Settings,
    store: VectorStore,
    stack: LocalStack,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    collection = settings.milvus.collection
    image = small_images(tmp_path / "images", 1)[0]
    broken = tmp_path / "images" / "broken.png"
    broken.write_bytes(b"this is not an image")

    def status(client: TestClient[Any], item_id: str) -> dict[str, Any]:
        response = client.get(items_url(collection, item_id, "status"))
        assert response.status_code == 200, response.text
        answer: dict[str, Any] = response.json()
        return answer

    with TestClient(app=create_app(settings)) as client:
        assert status(client, "never/seen") == {
            "id": "never/seen",
            "collection": collection,
            "state": "unknown",
            "version": None,
            "stored": None,
            "pending": None,
            "dead_letter": None,
            "complete": True,
        }
        inserted = client.post(
            "/insert", json={"inputs": [str(image), str(broken)], "ids": ["good/1", "bad/1"]}
        )
        assert inserted.status_code == 202, inserted.text
        where = {item["id"]: item for item in inserted.json()["items"]}
        pending = status(client, "good/1")
        assert pending["state"] == "pending" and pending["complete"]
        assert pending["pending"]["operation"] == "upsert"
        good = where["good/1"]
        assert (pending["pending"]["partition"], pending["pending"]["offset"]) == (
            good["partition"],
            good["offset"],
        )
        version = pending["version"]

        with running_worker(settings):
            stored = wait_for(
                lambda: (s := status(client, "good/1"))["state"] == "stored" and s,
                timeout=120,
                what="good/1 stored",
            )
            assert stored["version"] == version and stored["stored"] == {
                "version": version,
                "deleted": False,
            }
            lettered = wait_for(
                lambda: (s := status(client, "bad/1"))["state"] == "dead_lettered" and s,
                timeout=120,
                what="bad/1 dead-lettered",
            )
        letter = lettered["dead_letter"]
        assert (letter["stage"], letter["reason"], letter["operation"]) == (
            "decode_image",
            "not_an_image",
            "upsert",
        )
        assert letter["dead_lettered_at"] and letter["detail"]
        assert client.get(items_url(collection, "good/1")).json()["version"] == version

        # With no worker running, the delete waits on the topic: pending, newer than the row.
        deleted = client.delete(items_url(collection, "good/1"))
        assert deleted.status_code == 202, deleted.text
        waiting = status(client, "good/1")
        assert waiting["state"] == "pending" and waiting["pending"]["operation"] == "delete"
        assert waiting["version"] == deleted.json()["version"] > version
        assert waiting["stored"] == {"version": version, "deleted": False}
        with running_worker(settings, worker_id="deleter"):
            gone = wait_for(
                lambda: (s := status(client, "good/1"))["state"] == "deleted" and s,
                timeout=120,
                what="good/1 deleted",
            )
        assert gone["version"] == deleted.json()["version"]
        assert_error(client.get(items_url(collection, "good/1")), 404, "unknown_id")

    # The command-line form: the dead letter, as the API says it.
    config = stack.write_settings(settings, name=f"status-{settings.kafka.group_id}.yaml")
    capsys.readouterr()
    assert dlq_main(["status", "bad/1", "--config", str(config), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == {**lettered, "complete": True}

    # A replay waits on the retry topic, not the ingest topic: still pending, and said where.
    assert dlq_main(["replay", "--id", "bad/1", "--config", str(config)]) == 0
    capsys.readouterr()
    assert dlq_main(["status", "bad/1", "--config", str(config), "--json"]) == 0
    replayed = json.loads(capsys.readouterr().out)
    assert replayed["state"] == "pending" and replayed["complete"], replayed
    assert replayed["pending"]["topic"] == settings.kafka.topics().retry
    assert replayed["pending"]["version"] == letter["version"]


def test_trident_dlq_status_prints_where_an_item_is(
    settings: Settings, store: VectorStore, stack: LocalStack, capsys: pytest.CaptureFixture[str]
) -> None:
    store.upsert([stored_record("cli/1", {})])
    config = str(stack.write_settings(settings, name=f"status-{settings.kafka.group_id}.yaml"))
    assert dlq_main(["status", "cli/1", "--config", config]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == f"cli/1 in {settings.milvus.collection}: stored (version 7)"
    assert dlq_main(["status", "cli/1", "--config", config, "--json"]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert (answer["state"], answer["version"], answer["complete"]) == ("stored", 7, True)
    assert dlq_main(["status", "cli/1", "--config", config, "--collection", "no_such_s1"]) == 2
    began = time.monotonic()
    assert dlq_main(["status", "nope", "--config", config]) == 0
    assert "nope in" in capsys.readouterr().out and time.monotonic() - began < 10
