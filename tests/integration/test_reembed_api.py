"""Searches through an alias while it moves between two collections of two models, on the real
services (issue 23.5: "no search fails, none mixes models"), without the rebuild CLI.

A Triton of the test's own (as in ``test_collection_models``) serves EfficientNet-Lite0 (uint8,
the configured model) and a user model written here with Lite0's dimension (so one vector can
be searched in both collections), of another tag. ``x_v1`` holds Lite0's vectors of a few
images, ``x_v2`` the user model's of the same images (ids prefixed ``v1-`` / ``v2-``, stored
directly, embedded by the API's own service), and the alias ``x`` points at one of them. While a
thread moves the alias back and forth (``VectorStore.alter_alias``, what ``trident-reembed
switch`` and ``rollback`` call), searches go on through the API, by image and by vector: every
one succeeds, every hit of an answer is of the one collection the answer names, with that
collection's model, and an indexed image finds itself first with a score of ~1 (its query was
embedded by the model of the collection searched). Stats, the list and an item's record and
status through the alias follow it. The time the API spends resolving the alias is printed
(``resolve`` of ``Server-Timing``).

``compare_collections`` runs on the real services too (its figures are checked with fakes in
``tests/unit/test_compare.py``): the labelled set embedded through Triton.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import statistics
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from litestar.testing import TestClient

from devstack.samples import derived_image_set
from devstack.stack import LocalStack
from devstack.triton import TritonService
from engine.models import UINT8_MODEL_SPEC
from engine.records import VectorRecord
from engine.settings import Settings
from engine.store import VectorStore
from model_build.models_cli import main as trident_models
from query_api import create_app
from query_api.service import SearchService
from reembed.compare import compare_collections
from tests.integration.conftest import wait_for
from tests.integration.test_collection_models import on_triton
from tests.support.own_model import FLOAT_NCHW, build_model, second_triton, spec_of, write_files

pytestmark = pytest.mark.stack

LITE0 = UINT8_MODEL_SPEC
# The user model, of Lite0's dimension: a vector of either model can be searched in either.
WIDE: dict[str, Any] = {
    **FLOAT_NCHW,
    "name": "own_wide_tower",
    "output_dim": LITE0.output_dim,
    "model_version_tag": "own-wide-tower-v1",
}
OWN = spec_of(WIDE)
N_IMAGES = 5
MIN_SEARCHES = 60
MIN_MOVES = 8
SELF_SCORE = 0.99  # an image searched by itself, embedded by the collection's model


@pytest.fixture(scope="module")
def wide_triton(
    stack: LocalStack, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[TritonService, Path]]:
    """A real Triton serving Lite0 (uint8) and the user model; stopped after."""
    root = tmp_path_factory.mktemp("alias-models")
    spec_file, onnx_file = write_files(root / "files", WIDE, build_model(OWN))
    repository = root / "models"
    added = ["add", str(spec_file), str(onnx_file), "--repository", str(repository)]
    assert trident_models(added) == 0
    shutil.copytree(stack.model_repository / LITE0.name, repository / LITE0.name)
    with second_triton(stack, root / "stack", repository, port_shift=30) as triton:
        yield triton, repository


def _fill(service: SearchService, store: VectorStore, collection: str, images: list[Path]) -> None:
    """Store each image's vector, embedded by the collection's model, as ``v1-``/``v2-<name>``."""
    prefix = collection.rsplit("_", 1)[1]
    tag = service.collection_model(collection).model_version_tag
    records = []
    for path in images:
        data = path.read_bytes()
        records.append(
            VectorRecord(
                id=f"{prefix}-{path.name}",
                vector=service.embed_image(data, collection=collection),
                source=str(path),
                content_sha256=hashlib.sha256(data).hexdigest(),
                model_version=tag,
                event_version=1,
                ingested_at_ms=int(time.time() * 1000),
            )
        )
    store.upsert(records, collection)


class AliasMover(threading.Thread):
    """Moves the alias between the two collections until stopped; counts the moves."""

    def __init__(self, store: VectorStore, alias: str, collections: tuple[str, str]) -> None:
        super().__init__(name="alias-mover", daemon=True)
        self.store, self.alias, self.collections = store, alias, collections
        self.moves = 0
        self.error: BaseException | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        try:
            while not self.stop.wait(0.05):
                self.store.alter_alias(self.alias, self.collections[(self.moves + 1) % 2])
                self.moves += 1
        except BaseException as exc:  # reported by the test
            self.error = exc


def _check_answer(response: Any, models: dict[str, str]) -> str:
    """The collection that answered, once the answer is checked to be of it alone."""
    assert response.status_code == 200, response.text
    answered = str(response.headers["trident-collection"])
    assert response.headers["trident-model"] == models[answered]
    hits = response.json()
    assert hits, response.text
    prefix = answered.rsplit("_", 1)[1] + "-"
    for hit in hits:
        assert (hit["collection"], hit["model"]) == (answered, models[answered]), hits
        assert hit["id"].startswith(prefix), (answered, hits)
    return answered


def _resolve_ms(response: Any) -> float:
    found = re.search(r"resolve;dur=([\d.]+)", response.headers["server-timing"])
    assert found is not None, response.headers["server-timing"]
    return float(found[1])


def test_searches_through_a_moving_alias_never_fail_nor_mix_models(
    settings: Settings, wide_triton: tuple[TritonService, Path], tmp_path: Path, unique: str
) -> None:
    lite0 = on_triton(settings, *wide_triton, LITE0.name)
    alias = f"x{unique}"
    v1, v2 = f"{alias}_v1", f"{alias}_v2"
    models = {v1: LITE0.name, v2: OWN.name}
    images = derived_image_set(tmp_path / "images", N_IMAGES)
    store = VectorStore(lite0.milvus)
    try:
        with TestClient(app=create_app(lite0)) as client:
            for name, model in models.items():
                body = {"name": name, "model": model, "index_type": "FLAT"}
                created = client.post("/collections/create", json=body)
                assert created.status_code == 201, created.text
                _fill(client.app.state.search_service, store, name, images)
            assert store.count(v1) == store.count(v2) == N_IMAGES
            store.create_alias(alias, v1)
            _check_through_alias(client, alias, v1, images[0])
            query_vector = store.get([f"v1-{images[0].name}"], v1, with_vectors=True)[0]
            mover = AliasMover(store, alias, (v1, v2))
            mover.start()
            answered: list[str] = []
            resolve_ms: list[float] = []
            try:
                while len(answered) < MIN_SEARCHES or mover.moves < MIN_MOVES:
                    path = images[len(answered) % N_IMAGES]
                    with path.open("rb") as handle:
                        by_image = client.post(
                            "/search/upload",
                            files={"file": (path.name, handle, "image/jpeg")},
                            data={"collection_name": alias, "topk": "3"},
                        )
                    collection = _check_answer(by_image, models)
                    first = by_image.json()[0]
                    assert first["id"].endswith("-" + path.name), by_image.json()
                    assert first["score"] >= SELF_SCORE, by_image.json()
                    by_vector = client.post(
                        "/search",
                        json={"vector": query_vector["embedding"], "collection_name": alias},
                    )
                    answered += [collection, _check_answer(by_vector, models)]
                    resolve_ms += [_resolve_ms(by_image), _resolve_ms(by_vector)]
            finally:
                mover.stop.set()
                mover.join(timeout=30)
            assert mover.error is None, mover.error
            # The alias did move under the searches: both collections answered.
            assert answered.count(v1) >= 3 and answered.count(v2) >= 3, answered
            print(  # the figure the docs quote
                f"\n{len(answered)} searches, {mover.moves} alias moves: resolve median "
                f"{statistics.median(resolve_ms):.1f} ms, p99 "
                f"{float(np.percentile(resolve_ms, 99)):.1f} ms, max {max(resolve_ms):.1f} ms"
            )
            store.alter_alias(alias, v2)
            _check_through_alias(client, alias, v2, images[0])
    finally:
        for name in (alias,):
            if name in store.aliases():
                store.drop_alias(name)
        for name in (v1, v2):
            if store.collection_exists(name):
                store.drop_collection(name)
        store.close()


def _check_through_alias(client: TestClient[Any], alias: str, target: str, image: Path) -> None:
    """Stats, the list and an item's record and status through the alias are the target's."""
    prefix = target.rsplit("_", 1)[1]
    stats = client.get(f"/collections/{alias}/stats")
    assert stats.status_code == 200, stats.text
    assert (stats.json()["alias_of"], stats.json()["row_count"]) == (target, N_IMAGES)
    listed = client.get("/collections").json()
    assert listed["aliases"][alias] == target and alias not in listed["collections"]
    item = f"{prefix}-{image.name}"
    record = client.get(f"/items/{alias}/{item}")
    assert record.status_code == 200, record.text
    assert (record.json()["collection"], record.json()["stored_in"]) == (alias, target)
    status = client.get(f"/items/{alias}/{item}/status")
    assert status.status_code == 200, status.text
    assert status.json()["state"] == "stored", status.json()
    refused = client.delete(f"/collections/{alias}")
    assert (refused.status_code, refused.json()["error"]) == (409, "collection_conflict")


def test_compare_measures_two_collections_through_triton(
    settings: Settings, tmp_path: Path, unique: str
) -> None:
    """``compare_collections`` on the real services: two collections of the same model answer
    alike, and the labelled set is embedded through Triton (near-duplicates found first)."""
    old, new = f"c{unique}_v1", f"c{unique}_v2"
    images = derived_image_set(tmp_path / "images", N_IMAGES)
    labelled = tmp_path / "labelled"
    for path in images:  # a class of one image each: near-duplicate R@1 alone
        (labelled / path.stem).mkdir(parents=True)
        shutil.copy(path, labelled / path.stem / path.name)
    store = VectorStore(settings.milvus)
    try:
        with TestClient(app=create_app(settings)) as client:
            for name in (old, new):
                body = {"name": name, "index_type": "FLAT"}
                assert client.post("/collections/create", json=body).status_code == 201
            _fill(client.app.state.search_service, store, old, images)
        # The same rows in both: the answers must agree.
        ids = store.ids_matching('id != ""', old, limit=N_IMAGES)
        for name in (old, new):  # reads by id are Bounded: wait until they see the rows
            if name == new:
                store.upsert(_records(store, old, ids), new)
            wait_for(lambda n=name: len(store.get(ids, n)) == N_IMAGES, timeout=30, what=name)
        report = compare_collections(
            settings, store, alias=f"c{unique}", old=old, new=new, sample=3, labelled=labelled
        )
        assert report.sample == 3, report.lines()
        assert report.top10_overlap_mean == report.top1_same == 1.0, report.lines()
        assert report.rank_change_max == 0, report.lines()
        assert report.labelled is not None
        figures = report.labelled[LITE0.name]
        assert (figures.images, figures.classes, figures.class_p_at_1) == (N_IMAGES, N_IMAGES, None)
        assert figures.r_at_1 == 1.0 and not report.new_is_worse, report.lines()
    finally:
        for name in (old, new):
            if store.collection_exists(name):
                store.drop_collection(name)
        store.close()


def _records(store: VectorStore, collection: str, ids: list[str]) -> list[VectorRecord]:
    rows = store.get(ids, collection, with_vectors=True)
    return [
        VectorRecord(id=str(row["id"]), vector=np.asarray(row["embedding"], dtype=np.float32))
        for row in rows
    ]
