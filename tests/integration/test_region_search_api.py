"""Searches by a part of an image through the query API (issue 24), on the real stack: a
collection made with regions through ``POST /collections/create`` holds sample photos' whole
and region vectors (embedded by the served Lite0 and its 128-px region model, written through
the store), and a crop of 8-20 % of a photo finds that photo first with a box around the crop,
while the same crop on a twin collection without regions answers no box. Filters restrict
region hits too; searches by vector or id are unchanged; the schema shows ``box`` and
``regions``."""

from __future__ import annotations

import io
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import numpy.typing as npt
import pytest
from litestar.testing import TestClient
from PIL import Image

from devstack.samples import skimage_images
from devstack.stack import LocalStack
from engine.images import decode_image
from engine.inference import TritonEmbedder
from engine.models import LITE0_REGION_MODEL_SPEC, LITE2_MODEL_SPEC, UINT8_MODEL_SPEC, Box
from engine.preprocess import build_preprocessor
from engine.records import ItemRegions, VectorRecord
from engine.regions import RegionPreprocessor
from engine.settings import Settings
from engine.store import VectorStore
from query_api import create_app
from tests.integration.conftest import wait_for

pytestmark = pytest.mark.stack

# Colour photos of the sample set, unlike one another; half in group "a", half in "b".
SAMPLES = ("astronaut", "chelsea", "coffee", "rocket", "motorcycle_left", "retina", "ihc", "cell")
# 0.35 x 0.4 of the astronaut photo (14 % of its area), astride four region windows.
CROP_OF = "astronaut"
CROP: Box = (0.5, 0.3, 0.85, 0.7)
# Milvus's bounded staleness (5 s), with room for a busy machine.
VISIBLE_S = 30.0


@dataclass(frozen=True)
class RegionSet:
    """Two collections of the same photos: ``regions`` made with regions, ``twin`` without."""

    regions: str
    twin: str
    paths: dict[str, Path]
    vectors: dict[str, npt.NDArray[np.float32]]


def group_of(item: str) -> str:
    return "a" if SAMPLES.index(item) % 2 == 0 else "b"


def sample_photos(folder: Path) -> dict[str, Path]:
    """The chosen sample photos, copied under ``folder`` (the settings' allowed root)."""
    found = {path.stem: path for path in skimage_images()}
    folder.mkdir(parents=True, exist_ok=True)
    return {name: Path(shutil.copy(found[name], folder / found[name].name)) for name in SAMPLES}


def crop_png(path: Path, box: Box) -> bytes:
    """The PNG of normalised ``box`` of the image at ``path``."""
    with Image.open(path) as image:
        rgb = image.convert("RGB")
    width, height = rgb.size
    part = rgb.crop(
        (
            round(box[0] * width),
            round(box[1] * height),
            round(box[2] * width),
            round(box[3] * height),
        )
    )
    out = io.BytesIO()
    part.save(out, format="PNG")
    return out.getvalue()


def _pixels(path: Path, settings: Settings, short_side: int | None) -> npt.NDArray[np.uint8]:
    data = path.read_bytes()
    return decode_image(
        data, max_pixels=settings.fetch.max_pixels, target_short_side=short_side
    ).pixels


def write_photos(
    settings: Settings, store: VectorStore, paths: dict[str, Path], regions: str, twin: str
) -> dict[str, npt.NDArray[np.float32]]:
    """Embed the photos whole (the configured Lite0) and by region (its region model) on the
    served Triton, as the workers would, and write them: whole vectors into both collections,
    regions into ``regions`` (main rows first: the region search checks their version)."""
    names = list(paths)
    whole = build_preprocessor(settings.preprocess)
    cut = RegionPreprocessor(UINT8_MODEL_SPEC, settings.preprocess)
    region_triton = settings.for_model(LITE0_REGION_MODEL_SPEC.name).triton
    with (
        TritonEmbedder(settings.triton, model=settings.model) as embedder,
        TritonEmbedder(region_triton, model=LITE0_REGION_MODEL_SPEC) as region_embedder,
    ):
        batch = whole.preprocess(
            [_pixels(paths[n], settings, whole.decode_short_side) for n in names]
        )
        vectors = embedder.embed(batch)
        region_batch = cut.preprocess([_pixels(paths[n], settings, None) for n in names])
        region_vectors = region_embedder.embed(region_batch.pixels)
    records = [
        VectorRecord(
            id=name,
            vector=vectors[i],
            metadata={"group": group_of(name)},
            source=str(paths[name]),
            model_version=settings.model.model_version_tag,
            event_version=1,
        )
        for i, name in enumerate(names)
    ]
    items = [
        ItemRegions(
            item_id=name,
            version=1,
            boxes=[region_batch.boxes[r] for r in np.flatnonzero(region_batch.items == i)],
            vectors=region_vectors[region_batch.items == i],
        )
        for i, name in enumerate(names)
    ]
    for collection in (regions, twin):
        store.upsert(records, collection)
    store.upsert_regions_of(items, regions)
    query = vectors[0]
    wait_for(
        lambda: (
            all(
                len(store.search(query, top_k=20, collection=c)) == len(names)
                for c in (regions, twin)
            )
            and len(store.search_regions([query], 20, regions)) == len(names)
        ),
        timeout=VISIBLE_S,
        what="the photos searchable in both collections",
    )
    return {name: vectors[i] for i, name in enumerate(names)}


@pytest.fixture
def region_app(settings: Settings, stack: LocalStack) -> Iterator[TestClient[Any]]:
    """The API on the test's settings, Triton serving the region model."""
    stack.serve_models([LITE0_REGION_MODEL_SPEC.name])  # [] when served already
    with TestClient(app=create_app(settings)) as client:
        yield client


@contextmanager
def region_collections(
    client: httpx.Client, settings: Settings, unique: str, folder: Path
) -> Iterator[RegionSet]:
    """The two collections, made through the API and filled with the photos (copied under
    ``folder``); dropped at the end."""
    regions, twin = f"regions_{unique}", f"twin_{unique}"
    made = client.post("/collections/create", json={"name": regions, "regions": True})
    assert made.status_code == 201, made.text
    assert client.post("/collections/create", json={"name": twin}).status_code == 201
    store = VectorStore(settings.milvus)
    try:
        paths = sample_photos(folder)
        vectors = write_photos(settings, store, paths, regions, twin)
        yield RegionSet(regions, twin, paths, vectors)
    finally:
        for name in (regions, twin):
            client.delete(f"/collections/{name}")
        store.close()


@pytest.fixture
def region_set(
    region_app: TestClient[Any], settings: Settings, unique: str, tmp_path: Path
) -> Iterator[RegionSet]:
    with region_collections(region_app, settings, unique, tmp_path / "photos") as made:
        yield made


def search_upload(client: TestClient[Any], data: bytes, **form: Any) -> list[dict[str, Any]]:
    response = client.post(
        "/search",
        files={"file": ("query.png", data, "image/png")},
        data={name: str(value) for name, value in form.items()},
    )
    assert response.status_code == 200, response.text
    hits: list[dict[str, Any]] = response.json()
    return hits


def _inside(point: tuple[float, float], box: list[float]) -> bool:
    return box[0] <= point[0] <= box[2] and box[1] <= point[1] <= box[3]


def test_a_part_of_a_photo_finds_it_with_where_only_where_regions_are_stored(
    region_app: TestClient[Any], region_set: RegionSet
) -> None:
    client, photos = region_app, region_set
    part = crop_png(photos.paths[CROP_OF], CROP)
    centre = ((CROP[0] + CROP[2]) / 2, (CROP[1] + CROP[3]) / 2)
    hits = search_upload(client, part, collection_name=photos.regions, topk=5)
    assert hits[0]["id"] == CROP_OF, hits
    assert _inside(centre, hits[0]["box"]) and hits[0]["box"] != [0.0, 0.0, 1.0, 1.0], hits[0]
    assert all(len(hit["box"]) == 4 for hit in hits)
    assert [hit["score"] for hit in hits] == sorted((hit["score"] for hit in hits), reverse=True)
    assert hits[0]["metadata"] == {"group": "a"} and hits[0]["source"].endswith("astronaut.png")
    assert len({hit["id"] for hit in hits}) == len(hits)  # one hit per photo
    # The twin holds the same whole vectors, no regions: no box.
    twin = search_upload(client, part, collection_name=photos.twin, topk=5)
    assert twin and all(hit["box"] is None for hit in twin)

    # A whole photo finds itself first: matched whole, or by one of its regions.
    whole = search_upload(
        client, photos.paths["coffee"].read_bytes(), collection_name=photos.regions, topk=3
    )
    assert whole[0]["id"] == "coffee" and len(whole[0]["box"]) == 4
    assert whole[0]["score"] >= 0.99

    # A filter restricts region hits too: group "b" has no astronaut.
    b_only = '{"field": "group", "value": "b"}'
    filtered = search_upload(client, part, collection_name=photos.regions, topk=8, filter=b_only)
    assert filtered and {hit["metadata"]["group"] for hit in filtered} == {"b"}
    assert CROP_OF not in {hit["id"] for hit in filtered}
    raw = search_upload(
        client,
        part,
        collection_name=photos.regions,
        topk=8,
        filter_expr='metadata["group"] == "a"',
    )
    assert raw[0]["id"] == CROP_OF and {hit["metadata"]["group"] for hit in raw} == {"a"}

    # By vector and by id: as before, no box.
    vector = photos.vectors["chelsea"].astype(float).tolist()
    for body in ({"vector": vector}, {"id": "chelsea", "include_self": True}):
        response = client.post("/search", json={**body, "collection_name": photos.regions})
        assert response.status_code == 200, response.text
        assert response.json()[0]["id"] == "chelsea"
        assert all(hit["box"] is None for hit in response.json())
    timing = client.post(
        "/search",
        files={"file": ("q.png", part, "image/png")},
        data={"collection_name": photos.regions},
    ).headers["server-timing"]
    assert "embed_regions;dur=" in timing and "search_regions;dur=" in timing

    stats = client.get(f"/collections/{photos.regions}/stats").json()
    assert stats["regions"] is True and stats["row_count"] == len(SAMPLES)
    assert client.get(f"/collections/{photos.twin}/stats").json()["regions"] is False


def test_regions_need_a_model_with_a_recipe_and_the_schema_shows_them(
    region_app: TestClient[Any], unique: str
) -> None:
    refused = region_app.post(
        "/collections/create",
        json={"name": f"odd_{unique}", "model": LITE2_MODEL_SPEC.name, "regions": True},
    )
    assert refused.status_code == 422, refused.text
    body = refused.json()
    assert "no region recipe" in body["detail"] and "\n" not in body["detail"]
    assert f"odd_{unique}" not in region_app.get("/collections").json()["collections"]
    schema = region_app.get("/openapi.json").json()["components"]["schemas"]
    assert "box" in schema["SearchHit"]["properties"]
    assert "regions" in schema["CreateCollectionRequest"]["properties"]
    assert "regions" in schema["CollectionStats"]["properties"]
