"""The query API on a known ingested set (real stack): every kind of search, simultaneous
searches by image, stage timings, paging, filters, thumbnails, collection stats, and the search
page in a real headless browser.

The set is inserted through ``POST /insert`` and stored by a real worker into a FLAT
(exact) collection made by ``POST /collections/create``. Expected ids and their order come from
a brute-force cosine ranking, in numpy, of the vectors Milvus holds.
"""

from __future__ import annotations

import io
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from litestar.testing import TestClient
from PIL import Image

from devstack.samples import derived_image_set
from devstack.stack import LocalStack
from engine.kafka import ensure_topics
from engine.settings import Settings
from engine.store import VectorStore
from query_api import create_app
from tests.integration.api_support import served
from tests.integration.conftest import running_worker, wait_for
from tests.support.browser import headless_chromium

pytestmark = pytest.mark.stack

N_IMAGES = 24
CATEGORIES = ("cats", "dogs")


@dataclass
class KnownSet:
    settings: Settings
    client: TestClient[Any]
    collection: str
    paths: dict[str, Path]
    metadata: dict[str, dict[str, Any]]
    vectors: dict[str, npt.NDArray[np.float32]] = field(default_factory=dict)

    def ranked(self, vector: Any, *, where: Any = None) -> list[str]:
        """Every id with metadata satisfying ``where``, nearest first (cosine, brute force)."""
        query = np.asarray(vector, dtype=np.float64)
        query /= np.linalg.norm(query)
        scores = {
            item: float(np.dot(query, stored / np.linalg.norm(stored)))
            for item, stored in self.vectors.items()
            if where is None or where(self.metadata[item])
        }
        return sorted(scores, key=lambda item: -scores[item])

    def search(self, **body: Any) -> list[dict[str, Any]]:
        response = self.client.post("/search", json={"collection_name": self.collection, **body})
        assert response.status_code == 200, response.text
        hits: list[dict[str, Any]] = response.json()
        return hits


def api_settings(stack: LocalStack, root: Path, **api: Any) -> Settings:
    unique = uuid.uuid4().hex[:10]
    settings = stack.settings(
        kafka={
            "topic": f"api-{unique}",
            "dead_letter_topic": f"api-{unique}.dlq",
            "group_id": f"api-{unique}",
        },
        milvus={"collection": f"api_{unique}"},
        fetch={"allowed_roots": [str(root)]},
        batch={"max_size": 16, "max_wait_ms": 200},
        preprocess={"batch_sizes": (16,)},  # 4 shapes to compile at start-up, not 18
        worker={"health_port": 0},
        api=api,
    )
    ensure_topics(settings.kafka)
    return settings


@pytest.fixture(scope="module")
def known(stack: LocalStack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[KnownSet]:
    root = tmp_path_factory.mktemp("known")
    settings = api_settings(stack, root)
    collection = settings.milvus.collection
    paths: dict[str, Path] = {}
    metadata: dict[str, dict[str, Any]] = {}
    for rank, image in enumerate(derived_image_set(root / "generated", N_IMAGES)):
        category = CATEGORIES[rank % 2]
        (root / category).mkdir(exist_ok=True)
        item = f"{category}/{image.name}"  # ids with a slash: thumbnails must still work
        paths[item] = image.rename(root / item)
        metadata[item] = {"category": category, "rank": rank}

    store = VectorStore(settings.milvus)
    with TestClient(app=create_app(settings)) as client:
        created = client.post(
            "/collections/create",
            json={"name": collection, "dim": 1280, "description": "known", "index_type": "FLAT"},
        )
        assert created.status_code == 201, created.text
        known_set = KnownSet(settings, client, collection, paths, metadata)
        with running_worker(settings):
            ids = list(paths)
            accepted = client.post(
                "/insert",
                json={
                    "inputs": [str(paths[item]) for item in ids],
                    "ids": ids,
                    "metadata": [metadata[item] for item in ids],
                    "collection_name": collection,
                },
            )
            assert accepted.status_code == 202, accepted.text
            assert accepted.json()["ids"] == ids
            wait_for(lambda: store.count(collection) == N_IMAGES, timeout=300, what="stored set")
        rows = store.get(ids, collection, with_vectors=True)
        known_set.vectors = {row["id"]: np.asarray(row["embedding"]) for row in rows}
        # Searches read with bounded staleness: wait until they see every row.
        probe = known_set.vectors[ids[0]].tolist()
        wait_for(
            lambda: len(known_set.search(vector=probe, topk=N_IMAGES)) == N_IMAGES,
            timeout=60,
            what="every row searchable",
        )
        yield known_set
    store.close()
    # A fresh client: closing another app's store in this process dropped the shared connection.
    cleaner = VectorStore(settings.milvus)
    try:
        cleaner.drop_collection(collection)
    finally:
        cleaner.close()


def upload(client: TestClient[Any], path: Path, **fields: Any) -> list[dict[str, Any]]:
    with path.open("rb") as handle:
        response = client.post(
            "/search",
            files={"file": (path.name, handle, "image/jpeg")},
            data={key: str(value) for key, value in fields.items()},
        )
    assert response.status_code == 200, response.text
    hits: list[dict[str, Any]] = response.json()
    return hits


def ids_of(hits: list[dict[str, Any]]) -> list[str]:
    return [hit["id"] for hit in hits]


def test_search_by_upload_ranks_like_brute_force(known: KnownSet) -> None:
    for item in list(known.paths)[:4]:
        hits = upload(known.client, known.paths[item], topk=5, collection_name=known.collection)
        assert ids_of(hits) == known.ranked(known.vectors[item])[:5]
        assert hits[0]["id"] == item and hits[0]["score"] > 0.99
        assert hits[0]["source"] == str(known.paths[item])
        assert hits[0]["metadata"]["category"] == known.metadata[item]["category"]


def test_simultaneous_image_searches_each_get_their_own_answer(known: KnownSet) -> None:
    # The client's requests run on one event loop, their blocking stages in worker threads:
    # decode, JAX, Triton and Milvus calls of different requests overlap.
    items = list(known.paths)[:8]
    start = threading.Barrier(len(items))

    def search(item: str) -> Any:
        image = known.paths[item].read_bytes()
        start.wait(timeout=60)
        return known.client.post(
            "/search",
            files={"file": (item, image, "image/jpeg")},
            data={"topk": "3", "collection_name": known.collection},
        )

    with ThreadPoolExecutor(len(items)) as pool:
        responses = list(pool.map(search, items))
    for item, response in zip(items, responses, strict=True):
        assert response.status_code == 200, response.text
        assert ids_of(response.json()) == known.ranked(known.vectors[item])[:3]
        stages = [part.split(";")[0] for part in response.headers["server-timing"].split(", ")]
        assert stages == ["resolve", "decode", "preprocess", "embed", "search"]


def test_searches_and_embeds_time_their_stages(known: KnownSet) -> None:
    item = list(known.paths)[3]
    by_id = known.client.post("/search", json={"id": item, "collection_name": known.collection})
    by_path = known.client.post("/embed", json={"query_input": str(known.paths[item])})
    for response, expected in (
        (by_id, ["resolve", "lookup", "search"]),
        (by_path, ["fetch", "decode", "preprocess", "embed"]),
    ):
        assert response.status_code == 200, response.text
        timings = dict(
            part.split(";dur=") for part in response.headers["server-timing"].split(", ")
        )
        assert list(timings) == expected and all(float(ms) >= 0 for ms in timings.values())
    metrics = known.client.get("/metrics").text
    assert 'trident_api_stage_seconds_count{stage="lookup"}' in metrics


def test_search_by_reference_vector_and_id(known: KnownSet) -> None:
    item = list(known.paths)[5]
    expected = known.ranked(known.vectors[item])
    by_reference = known.search(query_input=str(known.paths[item]), topk=6)
    assert ids_of(by_reference) == expected[:6]
    by_vector = known.search(vector=known.vectors[item].tolist(), topk=6)
    assert ids_of(by_vector) == expected[:6]
    # "More like this" leaves the item itself out unless asked.
    assert ids_of(known.search(id=item, topk=5)) == expected[1:6]
    assert ids_of(known.search(id=item, topk=5, include_self=True)) == expected[:5]


def test_paging_returns_consecutive_windows(known: KnownSet) -> None:
    item = list(known.paths)[2]
    expected = known.ranked(known.vectors[item])
    vector = known.vectors[item].tolist()
    pages = [ids_of(known.search(vector=vector, topk=4, offset=offset)) for offset in (0, 4, 8)]
    assert pages == [expected[0:4], expected[4:8], expected[8:12]]
    # Paging by id counts without the item, wherever it ranks.
    others = [other for other in expected if other != item]
    assert ids_of(known.search(id=item, topk=4, offset=4)) == others[4:8]


def test_filter_expr_and_structured_filter(known: KnownSet) -> None:
    item = next(iter(known.paths))
    vector = known.vectors[item].tolist()
    dogs = known.search(vector=vector, topk=5, filter_expr='metadata["category"] == "dogs"')
    assert ids_of(dogs) == known.ranked(vector, where=lambda m: m["category"] == "dogs")[:5]

    structured = {
        "and": [
            {"field": "category", "op": "eq", "value": "cats"},
            {"not": {"field": "rank", "op": "in", "value": [0, 2, 4]}},
            {
                "or": [
                    {"field": "rank", "op": "lt", "value": 12},
                    {"field": "rank", "op": "ge", "value": 20},
                ]
            },
        ]
    }

    def wanted(meta: dict[str, Any]) -> bool:
        rank = meta["rank"]
        return meta["category"] == "cats" and rank not in (0, 2, 4) and (rank < 12 or rank >= 20)

    hits = known.search(vector=vector, topk=N_IMAGES, filter=structured)
    assert ids_of(hits) == known.ranked(vector, where=wanted)
    both = known.search(
        vector=vector,
        topk=N_IMAGES,
        filter=structured,
        filter_expr='metadata["rank"] > 8',
    )
    assert ids_of(both) == known.ranked(vector, where=lambda m: wanted(m) and m["rank"] > 8)


def test_structured_filter_values_cannot_inject_syntax(known: KnownSet) -> None:
    vector = known.vectors[next(iter(known.paths))].tolist()
    # As raw syntax this would match every dog; as a value it matches no category at all.
    injected = 'cats" or metadata["category"] == "dogs'
    hits = known.search(vector=vector, topk=10, filter={"field": "category", "value": injected})
    assert hits == []
    raw = known.search(vector=vector, topk=10, filter_expr=f'metadata["category"] == "{injected}"')
    assert {hit["metadata"]["category"] for hit in raw} == {"cats", "dogs"}


def test_score_threshold_and_output_fields(known: KnownSet) -> None:
    item = list(known.paths)[3]
    vector = known.vectors[item].tolist()
    everything = known.search(vector=vector, topk=N_IMAGES)
    threshold = everything[5]["score"]
    kept = known.search(vector=vector, topk=N_IMAGES, score_threshold=threshold)
    assert ids_of(kept) == [hit["id"] for hit in everything if hit["score"] >= threshold]
    assert len(kept) < N_IMAGES
    with_fields = known.search(
        vector=vector, topk=2, output_fields=["content_sha256", "model_version"]
    )
    assert set(with_fields[0]["fields"]) == {"content_sha256", "model_version"}
    assert with_fields[0]["fields"]["model_version"] == known.settings.triton.model_tag
    assert everything[0]["fields"] == {}


def test_embed_by_reference_and_upload(known: KnownSet) -> None:
    item = list(known.paths)[1]
    stored = known.vectors[item]
    by_reference = known.client.post("/embed", json={"query_input": str(known.paths[item])})
    assert by_reference.status_code == 200, by_reference.text
    body = by_reference.json()
    assert body["dim"] == 1280 and body["model"] == known.settings.triton.model_tag
    assert float(np.dot(body["embedding"], stored)) > 0.999
    with known.paths[item].open("rb") as handle:
        uploaded = known.client.post("/embed", files={"file": ("x.jpg", handle, "image/jpeg")})
    assert uploaded.status_code == 200, uploaded.text
    assert float(np.dot(uploaded.json()["embedding"], stored)) > 0.999


def test_thumbnails_are_bounded_and_come_from_the_stored_source(known: KnownSet) -> None:
    item = list(known.paths)[7]
    response = known.client.get(f"/items/{known.collection}/{item}/thumbnail")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/jpeg"
    thumbnail = Image.open(io.BytesIO(response.content))
    original = Image.open(known.paths[item])
    assert max(thumbnail.size) == known.settings.api.thumbnail_size
    assert abs(thumbnail.width / thumbnail.height - original.width / original.height) < 0.02
    again = known.client.get(f"/items/{known.collection}/{item}/thumbnail")
    assert again.content == response.content
    missing = known.client.get(f"/items/{known.collection}/cats/nope.jpg/thumbnail")
    assert (missing.status_code, missing.json()["error"]) == (404, "unknown_id")
    unknown = known.client.get(f"/items/nosuch_{uuid.uuid4().hex[:6]}/{item}/thumbnail")
    assert (unknown.status_code, unknown.json()["error"]) == (404, "unknown_collection")
    assert known.client.get(f"/items/{known.collection}/{item}/large").status_code == 404


def test_collection_listing_and_stats(known: KnownSet) -> None:
    listing = known.client.get("/collections").json()
    assert known.collection in listing["collections"]
    stats = known.client.get(f"/collections/{known.collection}/stats")
    assert stats.status_code == 200, stats.text
    body = stats.json()
    assert body["row_count"] == N_IMAGES
    assert body["dimension"] == 1280
    assert body["index"]["index_type"] == "FLAT" and body["index"]["metric"] == "COSINE"
    assert body["description"] == "known"
    assert body["model_tag"] == known.settings.triton.model_tag


# The search page in a real browser -------------------------------------------------------------


@pytest.fixture
def page_api(known: KnownSet) -> Iterator[tuple[str, str]]:
    """The API with auth on, served over HTTP; yields (base URL, key)."""
    key = "browser-test-key"
    api = known.settings.api.model_copy(update={"auth": "on", "api_keys": [key]})
    with served(create_app(known.settings.model_copy(update={"api": api}))) as base:
        yield base, key


def test_search_page_in_a_headless_browser(
    known: KnownSet, page_api: tuple[str, str], tmp_path_factory: pytest.TempPathFactory
) -> None:
    from selenium.webdriver.common.by import By  # noqa: PLC0415 (a dev-only dependency)
    from selenium.webdriver.support.ui import WebDriverWait  # noqa: PLC0415

    base, key = page_api
    artifacts = tmp_path_factory.mktemp("browser")
    with headless_chromium() as driver:
        wait = WebDriverWait(driver, 60)
        driver.get(base + "/")
        key_input = driver.find_element(By.ID, "api-key")
        key_input.send_keys(key)
        driver.execute_script("arguments[0].dispatchEvent(new Event('change'))", key_input)
        wait.until(lambda d: known.collection in d.find_element(By.ID, "collection").text)
        driver.find_element(By.ID, "collection").send_keys(known.collection)

        item = list(known.paths)[9]
        file_input = driver.find_element(By.ID, "file")
        driver.execute_script("arguments[0].hidden = false", file_input)
        file_input.send_keys(str(known.paths[item]))

        def hit_ids(d: Any) -> list[str]:
            # Read in one script: the grid is re-rendered while a search answers.
            ids: list[str] = d.execute_script(
                "return [...document.querySelectorAll('.hit')].map(card => card.dataset.id)"
            )
            return ids

        wait.until(lambda d: len(hit_ids(d)) == 12)
        assert hit_ids(driver) == known.ranked(known.vectors[item])[:12]
        first_image = driver.find_element(By.CSS_SELECTOR, ".hit img")
        wait.until(
            lambda _d: driver.execute_script("return arguments[0].naturalWidth", first_image) > 0
        )
        driver.save_screenshot(str(artifacts / "search-by-upload.png"))

        clicked = hit_ids(driver)[1]
        driver.find_elements(By.CSS_SELECTOR, ".hit")[1].click()
        expected = [other for other in known.ranked(known.vectors[clicked]) if other != clicked][
            :12
        ]
        wait.until(lambda d: hit_ids(d) == expected)
        assert "more like " + clicked in driver.find_element(By.ID, "status").text
        driver.save_screenshot(str(artifacts / "more-like-this.png"))

        # A pasted path, with a filter and another top k.
        reference = list(known.paths)[4]
        driver.find_element(By.ID, "reference").send_keys(str(known.paths[reference]))
        driver.find_element(By.ID, "filter").send_keys('metadata["category"] == "dogs"')
        topk = driver.find_element(By.ID, "topk")
        topk.clear()
        topk.send_keys("5")
        driver.find_element(By.ID, "search-button").click()
        dogs = known.ranked(known.vectors[reference], where=lambda m: m["category"] == "dogs")
        wait.until(lambda d: hit_ids(d) == dogs[:5])
        driver.save_screenshot(str(artifacts / "pasted-path-with-filter.png"))
        print(f"screenshots in {artifacts}")
    assert (artifacts / "more-like-this.png").stat().st_size > 0
