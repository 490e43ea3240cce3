"""The whole path on the real stack: Kafka → worker (JAX, Triton) → Milvus → search."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from litestar.testing import TestClient

from devstack.samples import derived_image_set
from engine.settings import Settings
from engine.store import VectorStore
from producer import EventPublisher, events_from_folder
from query_api import create_app
from schemas import IngestEvent, PathImage
from tests.integration.conftest import committed_everything, running_worker, wait_for

pytestmark = pytest.mark.stack

N_IMAGES = 60


def test_published_images_become_searchable_and_republishing_is_idempotent(
    settings: Settings, store: VectorStore, tmp_path: Path
) -> None:
    images = derived_image_set(tmp_path / "images", N_IMAGES)
    assert len(images) == N_IMAGES

    with running_worker(settings):
        with EventPublisher(settings.kafka) as publisher:
            report = publisher.publish_many(events_from_folder(tmp_path / "images"))
        assert (report.delivered, report.failed) == (N_IMAGES, 0)
        wait_for(lambda: store.count() == N_IMAGES, timeout=300, what=f"{N_IMAGES} stored vectors")
        wait_for(lambda: committed_everything(settings), timeout=60, what="offsets committed")

        # Every image, searched through the query API, finds itself first.
        with TestClient(app=create_app(settings)) as client:
            for path in images:
                with path.open("rb") as handle:
                    response = client.post(
                        "/search", files={"file": (path.name, handle, "image/jpeg")}
                    )
                assert response.status_code == 200, response.text
                hits = response.json()
                assert hits[0]["id"] == path.name, (path.name, hits[:3])
                assert hits[0]["score"] >= 0.99, (path.name, hits[0])
                assert hits[0]["metadata"]["filename"] == path.name

            # The earlier API's JSON form, by path, and search by vector agree.
            response = client.post("/search", json={"query_input": str(images[0]), "topk": 5})
            assert response.status_code == 200, response.text
            assert response.json()[0]["id"] == images[0].name
            vector = store.get([images[0].name], with_vectors=True)[0]["embedding"]
            by_vector = client.post("/search", json={"vector": vector, "topk": 5}).json()
            assert by_vector[0]["id"] == images[0].name
            assert client.get("/health").json()["status"] == "ok"

        # Publishing the same images again (new event versions) leaves one record per id.
        with EventPublisher(settings.kafka) as publisher:
            report = publisher.publish_many(events_from_folder(tmp_path / "images"))
        assert report.delivered == N_IMAGES
        wait_for(
            lambda: committed_everything(settings), timeout=120, what="re-published events consumed"
        )
        assert store.count() == N_IMAGES


def test_stale_versions_never_overwrite_and_newer_metadata_is_applied(
    settings: Settings, store: VectorStore, tmp_path: Path
) -> None:
    first, second = derived_image_set(tmp_path / "images", 2)
    newer = IngestEvent(
        id="photo", image=PathImage(path=str(second)), version=20, metadata={"rev": "new"}
    )
    older = IngestEvent(
        id="photo", image=PathImage(path=str(first)), version=10, metadata={"rev": "old"}
    )
    with running_worker(settings) as worker:
        with EventPublisher(settings.kafka) as publisher:
            publisher.publish(newer)
            publisher.flush()
            wait_for(lambda: store.count() == 1, timeout=120, what="the newer event stored")
            publisher.publish(older)  # a late replay of an older event
            publisher.flush()
            wait_for(lambda: committed_everything(settings), timeout=120, what="older consumed")
            same_image = newer.model_copy(update={"version": 30, "metadata": {"rev": "renamed"}})
            publisher.publish(same_image)
            publisher.flush()
        wait_for(lambda: committed_everything(settings), timeout=120, what="events consumed")
        skipped = worker.metrics.skipped.labels("stale_version")._value.get()
    # Committed means stored; reads (bounded staleness) see the last upsert a moment later.
    record = wait_for(
        lambda: next((r for r in store.get(["photo"]) if r["event_version"] == 30), None),
        timeout=30,
        what="version 30 readable",
    )
    assert record["event_version"] == 30
    assert record["metadata"] == {"rev": "renamed"}
    assert record["source"] == str(second)  # the older event's image never replaced it
    assert record["content_sha256"] == hashlib.sha256(second.read_bytes()).hexdigest()
    assert record["model_version"] == settings.triton.model_tag
    assert skipped == 1
