"""Region vectors through the public path (issue 24), on the real stack: events published with
the producer library into a collection made with regions, a worker making them, Milvus holding
16 regions per item at its version (the region model's vectors of the crops), replaced by an
upsert of a new image, kept by a metadata-only update, removed by a delete, and a crop of an
image found by ``search_regions`` with a box around it."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from devstack.samples import skimage_images
from engine.images import decode_image
from engine.inference import TritonEmbedder
from engine.models import UINT8_MODEL_SPEC, Box, region_model_of
from engine.preprocess import build_preprocessor
from engine.regions import RegionPreprocessor, crop
from engine.settings import Settings
from engine.store import REGION_FIELDS, VECTOR_FIELD, VectorStore, region_collection
from producer.publisher import EventPublisher
from schemas import DeleteEvent, IngestEvent, PathImage
from tests.integration.conftest import committed_everything, running_worker, wait_for

pytestmark = pytest.mark.stack

REGION_MODEL = region_model_of(UINT8_MODEL_SPEC)
BOXES = UINT8_MODEL_SPEC.regions.boxes if UINT8_MODEL_SPEC.regions else ()


@pytest.fixture
def region_settings(settings: Settings) -> Settings:
    """The test's settings, the default collection made with regions by the worker."""
    milvus = settings.milvus.model_copy(update={"regions": True})
    return settings.model_copy(update={"milvus": milvus})


@pytest.fixture
def region_store(region_settings: Settings) -> Iterator[VectorStore]:
    store = VectorStore(region_settings.milvus)
    yield store
    try:
        store.drop_collection(region_settings.milvus.collection)
    finally:
        store.close()


@pytest.fixture
def photos(tmp_path: Path) -> list[Path]:
    """Four photographs of different sizes and aspect ratios, below the allowed root."""
    folder = tmp_path / "photos"
    folder.mkdir()
    chosen = [p for p in skimage_images() if p.stem in {"astronaut", "chelsea", "coffee", "rocket"}]
    assert len(chosen) == 4, [p.name for p in skimage_images()]
    return [Path(shutil.copy(path, folder / path.name)) for path in chosen]


def _publish(settings: Settings, events: list[IngestEvent | DeleteEvent]) -> None:
    with EventPublisher(settings.kafka) as publisher:
        for event in events:
            if isinstance(event, DeleteEvent):
                publisher.publish_delete(event)
            else:
                publisher.publish(event)
        assert publisher.flush(30).failed == 0


def _upsert(item: str, image: Path, version: int, **metadata: Any) -> IngestEvent:
    return IngestEvent(
        id=item, image=PathImage(path=str(image)), version=version, metadata=metadata
    )


def _settled(settings: Settings) -> None:
    wait_for(lambda: committed_everything(settings), timeout=240, what="the worker to commit")


def _regions(store: VectorStore, collection: str, item: str) -> list[dict[str, Any]]:
    """Every region row of ``item``, any version (Strong: what is written)."""
    return list(
        store._strong_query(
            region_collection(collection),
            "regions",
            filter=f'item_id == "{item}"',
            output_fields=[*REGION_FIELDS[1:], VECTOR_FIELD],
        )
    )


class RegionModel:
    """The region model's vectors of an image's crops, as the test computes them."""

    def __init__(self, settings: Settings) -> None:
        self.pixels = RegionPreprocessor(settings.model, settings.preprocess)
        self.embedder = TritonEmbedder(settings.for_model(REGION_MODEL.name).triton)
        self.global_pixels = build_preprocessor(settings.preprocess)
        self.global_embedder = TritonEmbedder(settings.triton)

    def decoded(self, image: Path, settings: Settings) -> npt.NDArray[np.uint8]:
        return decode_image(
            image.read_bytes(),
            max_pixels=settings.fetch.max_pixels,
            target_short_side=self.pixels.decode_short_side,
        ).pixels

    def regions(self, pixels: npt.NDArray[np.uint8]) -> dict[Box, npt.NDArray[np.float32]]:
        batch = self.pixels.preprocess([pixels])
        vectors = self.embedder.embed(batch.pixels)
        return dict(zip(batch.boxes, vectors, strict=True))

    def query(self, pixels: npt.NDArray[np.uint8]) -> list[npt.NDArray[np.float32]]:
        """A query image at the model's size and at the regions' (the contract's two)."""
        whole = self.global_embedder.embed(self.global_pixels.preprocess([pixels]))[0]
        small = self.embedder.embed(self.pixels.preprocessor.preprocess([pixels]))[0]
        return [whole, small]

    def close(self) -> None:
        self.embedder.close()
        self.global_embedder.close()


def _cosine(a: npt.NDArray[np.float32], b: npt.NDArray[np.float32]) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def _assert_regions_of(
    rows: list[dict[str, Any]], version: int, expected: dict[Box, npt.NDArray[np.float32]]
) -> None:
    assert {int(row["event_version"]) for row in rows} == {version}, "older regions left"
    assert len(rows) == len(BOXES) == 16
    for row in rows:
        box = tuple(round(float(row[f]), 6) for f in REGION_FIELDS[3:])
        assert _cosine(np.asarray(row[VECTOR_FIELD], np.float32), expected[box]) > 0.99, box


def test_a_worker_writes_replaces_keeps_and_deletes_an_items_regions(
    region_settings: Settings, region_store: VectorStore, photos: list[Path]
) -> None:
    name = region_settings.milvus.collection
    model = RegionModel(region_settings)
    try:
        with running_worker(region_settings, worker_id="regions"):
            assert region_store.describe_collection(name).regions  # made so by the worker
            _publish(region_settings, [_upsert(p.stem, p, 1) for p in photos])
            _settled(region_settings)
            decoded = {p.stem: model.decoded(p, region_settings) for p in photos}
            for photo in photos:
                _assert_regions_of(
                    _regions(region_store, name, photo.stem), 1, model.regions(decoded[photo.stem])
                )

            # A crop of one image finds it first, with a region around the crop's centre.
            cat = decoded["chelsea"]
            detail: Box = (0.1, 0.15, 0.45, 0.55)
            centre = ((detail[0] + detail[2]) / 2, (detail[1] + detail[3]) / 2)
            hits = wait_for(
                lambda: region_store.search_regions(model.query(crop(cat, detail)), 3, name),
                timeout=30,
                what="region hits",
            )
            assert hits[0].id == "chelsea", hits
            x0, y0, x1, y1 = hits[0].box
            assert x0 <= centre[0] <= x1 and y0 <= centre[1] <= y1, hits[0]

            # A new image for "astronaut" replaces its regions; the same image at a newer
            # version (metadata only) keeps 16 at that version; a delete removes them.
            _publish(
                region_settings,
                [
                    _upsert("astronaut", photos[2], 2),
                    _upsert("coffee", photos[2], 2, note="metadata only"),
                ],
            )
            _settled(region_settings)
            _assert_regions_of(
                _regions(region_store, name, "astronaut"), 2, model.regions(decoded["coffee"])
            )
            _assert_regions_of(
                _regions(region_store, name, "coffee"), 2, model.regions(decoded["coffee"])
            )
            _publish(region_settings, [DeleteEvent(id="rocket", version=2)])
            _settled(region_settings)
            assert _regions(region_store, name, "rocket") == []
            assert region_store.stored_versions(["rocket"])["rocket"].deleted
    finally:
        model.close()
