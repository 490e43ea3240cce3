"""The batch processor's region branch (issue 24) with fake services: which images are decoded
larger, regions embedded in chunks and handed to their records, a same image at a newer version
embedded again, and what fails when regions cannot be made."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

import worker.pipeline as pipeline_module
from engine.errors import (
    BatchAbandonedError,
    ConfigurationError,
    InferenceConfigurationError,
    InferenceUnavailableError,
    Reason,
)
from engine.images import DecodedImage
from engine.models import (
    DEFAULT_MODEL_SPEC,
    LITE0_REGION_MODEL_SPEC,
    UINT8_MODEL_SPEC,
    Box,
    ModelBatch,
)
from engine.records import VectorRecord
from engine.regions import RegionBatch
from engine.settings import FetchSettings, RetrySettings, Settings
from schemas import InlineImage
from tests.unit.test_pipeline import (
    DIM,
    FakeEmbedder,
    FakeFetcher,
    FakeMessage,
    FakePreprocessor,
    FakeStore,
    event,
    png,
    process,
)
from worker.metrics import WorkerMetrics
from worker.ownership import Ownership
from worker.pipeline import BatchProcessor, Outcome
from worker.regions import RegionEmbedding, build_region_embedding

BOXES: tuple[Box, ...] = UINT8_MODEL_SPEC.regions.boxes[:4] if UINT8_MODEL_SPEC.regions else ()
MODEL_SHORT_SIDE = 256
REGION_SHORT_SIDE = 365


class FakeRegionPixels:
    """Each image's regions as rows of its mean grey level (so vectors tell images apart)."""

    decode_short_side = REGION_SHORT_SIDE

    def __init__(self) -> None:
        self.calls: list[int] = []

    def preprocess(self, images: Sequence[npt.NDArray[np.uint8]]) -> RegionBatch:
        self.calls.append(len(images))
        rows = [np.full((2, 2, 3), int(image.mean()), np.uint8) for image in images for _ in BOXES]
        pixels: ModelBatch = np.stack(rows) if rows else np.zeros((0, 2, 2, 3), np.uint8)
        items = np.repeat(np.arange(len(images), dtype=np.int64), len(BOXES))
        return RegionBatch(items=items, boxes=BOXES * len(images), pixels=pixels)

    def warmup(self) -> None:
        pass


class FakeRegionEmbedder:
    def __init__(self, failures: list[Exception] | None = None) -> None:
        self.failures = failures or []
        self.chunks: list[int] = []

    def embed(self, batch: npt.NDArray[Any]) -> npt.NDArray[np.float32]:
        if self.failures:
            raise self.failures.pop(0)
        self.chunks.append(batch.shape[0])
        vectors = np.zeros((batch.shape[0], DIM), np.float32)
        vectors[:, 0] = 1.0
        vectors[:, 1] = batch.reshape(batch.shape[0], -1)[:, 0] / 255.0
        return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def regions(embedder: FakeRegionEmbedder, chunk_rows: int = 5) -> RegionEmbedding:
    return RegionEmbedding(
        pixels=FakeRegionPixels(),
        embedder=embedder,
        chunk_rows=chunk_rows,
        model_name="region_model",
    )


def make(
    store: FakeStore,
    *,
    with_regions: set[str],
    embedding: RegionEmbedding | None,
    embedder: FakeEmbedder | None = None,
) -> BatchProcessor:
    ownership = Ownership()
    ownership.assign([("ingest", 0)])
    return BatchProcessor(
        fetcher=FakeFetcher(),
        preprocessor=FakePreprocessor(),
        decode_short_side=MODEL_SHORT_SIDE,
        embedder=embedder or FakeEmbedder(),
        store=store,
        ownership=ownership,
        fetch_settings=FetchSettings(max_pixels=10_000_000),
        retry_settings=RetrySettings(attempts=3, initial_backoff_s=0, max_backoff_s=0),
        model_version="m1",
        default_collection="images",
        metrics=WorkerMetrics(),
        collection_regions=lambda name: name in with_regions,
        regions=embedding,
    )


def messages(*shades: int, collection: str | None = "pets", version: int = 1) -> list[FakeMessage]:
    return [
        FakeMessage(event(f"img-{shade}", InlineImage(data=png(shade)), version, collection), i)
        for i, shade in enumerate(shades)
    ]


def written(store: FakeStore) -> dict[str, VectorRecord]:
    return {record.id: record for _, record in store.backend.history}


def test_regions_are_embedded_in_chunks_and_written_with_their_records() -> None:
    store = FakeStore(collections={"images", "pets"})
    embedder = FakeRegionEmbedder()
    processor = make(store, with_regions={"pets"}, embedding=regions(embedder, chunk_rows=5))
    batch = process(processor, messages(40, 200) + messages(90, collection=None))
    assert [item.outcome for item in batch.items] == [Outcome.STORED] * 3
    assert embedder.chunks == [5, 3]  # 2 images x 4 boxes, 5 rows a call
    rows = written(store)
    for shade in (40, 200):
        found = rows[f"img-{shade}"].regions
        assert found is not None
        assert (found.item_id, found.version, tuple(found.boxes)) == (f"img-{shade}", 1, BOXES)
        assert found.vectors.shape == (len(BOXES), DIM)
        # Each image's own regions (the fake's vectors carry its grey level).
        assert np.allclose(found.vectors[:, 1] / found.vectors[:, 0], shade / 255.0, atol=0.01)
    assert rows["img-90"].regions is None  # the default collection has none


def test_only_images_with_regions_are_decoded_at_the_regions_size(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    asked: dict[int, int | None] = {}
    real = pipeline_module.decode_image

    def decode(data: bytes, *, max_pixels: int, target_short_side: int | None) -> DecodedImage:
        decoded = real(data, max_pixels=max_pixels, target_short_side=target_short_side)
        asked[int(decoded.pixels.mean())] = target_short_side
        return decoded

    monkeypatch.setattr(pipeline_module, "decode_image", decode)
    store = FakeStore(collections={"images", "pets"})
    processor = make(store, with_regions={"pets"}, embedding=regions(FakeRegionEmbedder()))
    process(processor, messages(40) + messages(90, collection=None))
    assert asked == {40: REGION_SHORT_SIDE, 90: MODEL_SHORT_SIDE}


def test_a_worker_that_cannot_make_regions_dead_letters_instead_of_writing() -> None:
    store = FakeStore(collections={"images", "pets"})
    processor = make(store, with_regions={"pets"}, embedding=None)
    batch = process(processor, messages(40) + messages(90, collection=None))
    dead, kept = batch.items
    assert dead.outcome is Outcome.DEAD and dead.dead_letter is not None
    assert isinstance(dead.dead_letter.error, ConfigurationError)
    assert dead.dead_letter.reason == Reason.COLLECTION_MODEL_MISMATCH
    assert "holds region vectors" in str(dead.dead_letter.error)
    assert kept.outcome is Outcome.STORED
    assert set(written(store)) == {"img-90"}


def test_region_inference_is_retried_then_an_outage_raises() -> None:
    store = FakeStore(collections={"images", "pets"})
    flaky = FakeRegionEmbedder([InferenceUnavailableError("triton busy")])
    batch = process(make(store, with_regions={"pets"}, embedding=regions(flaky)), messages(40))
    assert batch.items[0].outcome is Outcome.STORED and flaky.chunks == [4]

    down = FakeRegionEmbedder([InferenceUnavailableError("triton down")] * 3)
    processor = make(store, with_regions={"pets"}, embedding=regions(down))
    with pytest.raises(InferenceUnavailableError):
        process(processor, messages(41))
    assert "img-41" not in written(store)


def test_triton_not_serving_the_region_model_says_how_to_serve_it() -> None:
    refused = FakeRegionEmbedder([InferenceConfigurationError("unknown model")])
    store = FakeStore(collections={"images", "pets"})
    processor = make(store, with_regions={"pets"}, embedding=regions(refused))
    with pytest.raises(InferenceConfigurationError, match="trident-stack models add region_model"):
        process(processor, messages(40))
    assert not written(store)


def test_a_batch_cancelled_between_region_chunks_is_abandoned() -> None:
    store = FakeStore(collections={"images", "pets"})
    embedder = FakeRegionEmbedder()
    processor = make(store, with_regions={"pets"}, embedding=regions(embedder, chunk_rows=2))
    owner = processor._ownership.current(("ingest", 0))
    assert owner is not None
    batch = processor.batch([(message, owner) for message in messages(40)])
    processor.prepare(batch)
    original = embedder.embed

    def cancel_after(chunk: npt.NDArray[Any]) -> npt.NDArray[np.float32]:
        batch.cancelled.set()
        return original(chunk)

    embedder.embed = cancel_after  # type: ignore[method-assign]
    with pytest.raises(BatchAbandonedError):
        processor.embed(batch)
    assert embedder.chunks == [2]  # the second chunk was never sent


def test_a_same_image_at_a_newer_version_is_embedded_again_with_its_regions() -> None:
    store = FakeStore(collections={"images", "pets"})
    embedder, global_embedder = FakeRegionEmbedder(), FakeEmbedder()
    processor = make(
        store, with_regions={"pets"}, embedding=regions(embedder), embedder=global_embedder
    )
    process(processor, messages(40) + messages(90, collection="images"))
    again = process(
        processor, messages(40, version=2) + messages(90, collection="images", version=2)
    )
    assert [item.outcome for item in again.items] == [Outcome.STORED] * 2
    assert global_embedder.batches == [2, 1]  # the plain collection's image reused its vector
    assert embedder.chunks == [4, 4]
    found = written(store)["img-40"].regions
    assert found is not None and found.version == 2 and len(found.boxes) == len(BOXES)

    unchanged = process(processor, messages(40, version=2))  # same version: nothing to do
    assert unchanged.items[0].outcome is Outcome.SKIPPED and embedder.chunks == [4, 4]


def test_the_collections_regions_are_read_once() -> None:
    store = FakeStore(collections={"images", "pets"})
    reads: list[str] = []
    processor = make(store, with_regions={"pets"}, embedding=regions(FakeRegionEmbedder()))
    ask = processor._collection_regions
    assert ask is not None

    def counted(name: str) -> bool:
        reads.append(name)
        return ask(name)

    processor._collection_regions = counted
    process(processor, messages(40))
    process(processor, messages(41))
    assert reads == ["pets"]


def test_a_worker_makes_regions_only_for_a_model_with_a_region_recipe() -> None:
    built = build_region_embedding(Settings(preprocess={"device": "cpu"}))
    assert built is not None
    embedding, client = built
    try:
        assert embedding.model_name == LITE0_REGION_MODEL_SPEC.name
        assert embedding.chunk_rows == LITE0_REGION_MODEL_SPEC.max_batch_size * 2
        # Regions of 0.4 of the image reach the region model's 146 px: 146 / 0.4.
        assert embedding.decode_short_side == REGION_SHORT_SIDE
    finally:
        client.close()
    float32 = {"model_name": DEFAULT_MODEL_SPEC.name}
    assert build_region_embedding(Settings(triton=float32)) is None
    with pytest.raises(ConfigurationError, match=r"milvus\.regions is true.*no region recipe"):
        build_region_embedding(Settings(triton=float32, milvus={"regions": True}))
