"""A collection is bound to its model, on the real services.

One Triton of the test's own (the stack's install, on ports of its own, as in
``test_own_model``) serves two models of different tags: EfficientNet-Lite0 (uint8, the
configured model, copied from the stack's repository) and a tiny user model written here
(64 dimensions). Through the query API a collection is created bound to the user model; stats
and the list show it; a search by image of it is embedded with the user model (Lite0's 1280-d
vector could not even be searched there), while the default collection is searched with Lite0.
A Lite0 worker dead-letters the records naming the user model's collection
(``collection_model_mismatch``) and stores the rest.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
from litestar.testing import TestClient

from devstack.samples import derived_image_set
from devstack.stack import LocalStack
from devstack.triton import TritonService
from engine.kafka import ensure_topics
from engine.models import UINT8_MODEL_SPEC
from engine.settings import Settings
from engine.store import VectorStore
from model_build.models_cli import main as trident_models
from producer import EventPublisher, events_from_folder
from query_api import create_app
from schemas import IngestEvent
from schemas.dead_letter import HEADER_REASON
from tests.integration.conftest import (
    committed_everything,
    dead_letters,
    running_worker,
    wait_for,
)
from tests.support.own_model import (
    FLOAT_NCHW,
    build_model,
    second_triton,
    spec_of,
    write_files,
)

pytestmark = pytest.mark.stack

OWN = spec_of(FLOAT_NCHW)
LITE0 = UINT8_MODEL_SPEC
N_IMAGES = 6


@pytest.fixture(scope="module")
def two_models_triton(
    stack: LocalStack, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[TritonService, Path]]:
    """A real Triton serving Lite0 (uint8) and the user model; stopped after."""
    root = tmp_path_factory.mktemp("two-models")
    spec_file, onnx_file = write_files(root / "files", FLOAT_NCHW, build_model(OWN))
    repository = root / "models"
    added = ["add", str(spec_file), str(onnx_file), "--repository", str(repository)]
    assert trident_models(added) == 0
    shutil.copytree(stack.model_repository / LITE0.name, repository / LITE0.name)
    with second_triton(stack, root / "stack", repository, port_shift=20) as triton:
        yield triton, repository


def on_triton(settings: Settings, triton: TritonService, repository: Path, model: str) -> Settings:
    """``settings`` on ``triton`` (serving ``repository``), its configured model ``model``."""
    values = settings.model_dump(by_alias=True, exclude_unset=True)
    values["triton"] = {
        **values.get("triton", {}),
        "url": triton.grpc_url,
        "model_repository": str(repository),
        "model_name": model,
    }
    return Settings(**values)


def _reasons(settings: Settings) -> dict[str, str]:
    found = {}
    for message in dead_letters(settings):
        headers = {k: v for k, v in message.headers() or []}
        found[message.key().decode()] = headers[HEADER_REASON].decode()
    return found


def test_collections_are_bound_to_their_model_end_to_end(
    settings: Settings,
    two_models_triton: tuple[TritonService, Path],
    tmp_path: Path,
    unique: str,
) -> None:
    lite0 = on_triton(settings, *two_models_triton, LITE0.name)
    own = f"own_{unique}"
    default = lite0.milvus.collection
    images = derived_image_set(tmp_path / "images", N_IMAGES)
    store = VectorStore(lite0.milvus)
    try:
        with TestClient(app=create_app(lite0)) as client:
            body: dict[str, Any] = {"name": own, "model": OWN.name, "index_type": "FLAT"}
            assert client.post("/collections/create", json=body).status_code == 201
            again = client.post("/collections/create", json=body)
            assert (again.status_code, again.json()["created"]) == (200, False)
            unknown = client.post("/collections/create", json={**body, "model": "nope"})
            assert unknown.status_code == 422 and unknown.json()["error"] == "unknown_model"
            assert OWN.name in unknown.json()["detail"] and LITE0.name in unknown.json()["detail"]
            wrong = client.post("/collections/create", json={**body, "name": "x_" + own, "dim": 8})
            assert wrong.status_code == 422 and wrong.json()["error"] == "wrong_dimension"
            assert "dim 8" in wrong.json()["detail"] and "64" in wrong.json()["detail"]
            other = client.post(
                "/collections/create", json={**body, "model": LITE0.name, "dim": None}
            )
            assert other.status_code == 409, other.text  # exists, bound to another model
            bound = {"name": OWN.name, "tag": OWN.model_version_tag, "dim": OWN.output_dim}
            stats = client.get(f"/collections/{own}/stats").json()
            assert stats["model"] == bound and stats["dimension"] == OWN.output_dim

            own_settings = _own_worker_settings(lite0, own, two_models_triton, unique)
            folder = tmp_path / "images"
            # The user model's worker fills its collection (a topic of its own).
            with running_worker(own_settings, "own-worker"):
                _publish(own_settings, events_from_folder(folder, id_prefix="own-"))
                wait_for(lambda: store.count(own) == N_IMAGES, timeout=300, what="own rows")
            # A Lite0 worker is sent records for both collections: it stores those of the
            # default collection and dead-letters those naming the user model's.
            with running_worker(lite0, "lite0-worker"):
                _publish(
                    lite0,
                    [
                        *events_from_folder(folder, collection=own, id_prefix="mixed-"),
                        *events_from_folder(folder, id_prefix="lite0-"),
                    ],
                )
                wait_for(lambda: store.count(default) == N_IMAGES, timeout=300, what="rows")
                wait_for(lambda: committed_everything(lite0), timeout=60, what="commits")
            _check_searches(client, images, own, default)
            listed = client.get("/collections").json()
            assert listed["models"][own] == bound
            assert listed["models"][default]["name"] == LITE0.name
            assert listed["models"][default]["dim"] == LITE0.output_dim
        # Which worker wrote which collection: each model's rows in its own collection, and the
        # other worker's records for it were dead-lettered, not written.
        rows = store.get([f"own-{p.name}" for p in images], own)
        assert {row["model_version"] for row in rows} == {OWN.model_version_tag}
        rows = store.get([f"lite0-{p.name}" for p in images], default)
        assert {row["model_version"] for row in rows} == {LITE0.model_version_tag}
        assert store.count(own) == N_IMAGES and not store.get([f"mixed-{images[0].name}"], own)
        reasons = _reasons(lite0)
        assert reasons == {f"mixed-{p.name}": "collection_model_mismatch" for p in images}
    finally:
        for name in (own, default):
            if store.collection_exists(name):
                store.drop_collection(name)
        store.close()


def _own_worker_settings(
    lite0: Settings, own: str, triton: tuple[TritonService, Path], unique: str
) -> Settings:
    """The user model's worker: topics and group of its own, its collection as default."""
    values = on_triton(lite0, *triton, OWN.name).model_dump(by_alias=True, exclude_unset=True)
    values["milvus"] = {**values.get("milvus", {}), "collection": own}
    values["kafka"] = {
        **values.get("kafka", {}),
        "topic": f"own-{unique}",
        "dead_letter_topic": f"own-{unique}.dlq",
        "group_id": f"own-{unique}",
    }
    result = Settings(**values)
    ensure_topics(result.kafka)
    return result


def _publish(settings: Settings, events: Iterable[IngestEvent]) -> None:
    with EventPublisher(settings.kafka) as publisher:
        report = publisher.publish_many(events)
    assert report.failed == 0 and report.delivered > 0


def _check_searches(client: TestClient[Any], images: list[Path], own: str, default: str) -> None:
    for path in images:
        for collection, prefix in ((own, "own-"), (default, "lite0-")):
            with path.open("rb") as handle:
                response = client.post(
                    "/search/upload",
                    files={"file": (path.name, handle, "image/jpeg")},
                    data={"collection_name": collection},
                )
            assert response.status_code == 200, response.text
            hits = response.json()
            assert hits[0]["id"] == prefix + path.name, (collection, path.name, hits[:3])
