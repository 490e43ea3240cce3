"""What a worker needs to make region vectors (issue 24) for collections made with regions.

The pipeline (``worker.pipeline``) uses it inside its stages: images of such collections are
decoded at :attr:`RegionEmbedding.decode_short_side` (prepare), their regions cropped and
preprocessed at the region model's input (prepare), embedded by the region model on Triton in
chunks of :attr:`RegionEmbedding.chunk_rows` (embed), and written with their records by the
store's upsert (store). Built from settings by :func:`build_region_embedding`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from engine.errors import ConfigurationError, InferenceConfigurationError
from engine.inference import TritonEmbedder
from engine.models import region_model_of
from engine.regions import RegionBatch, RegionPreprocessor
from engine.settings import Settings

logger = logging.getLogger(__name__)


class RegionPixels(Protocol):
    """The part of :class:`engine.regions.RegionPreprocessor` the pipeline uses."""

    @property
    def decode_short_side(self) -> int: ...
    def preprocess(self, images: Sequence[npt.NDArray[np.uint8]]) -> RegionBatch: ...
    def warmup(self) -> None: ...


class RegionEmbedder(Protocol):
    def embed(self, batch: npt.NDArray[Any]) -> npt.NDArray[np.float32]: ...


@dataclass(frozen=True, slots=True)
class RegionEmbedding:
    """The region model's preprocessing and embedder, and how many region rows one embed call
    sends (``chunk_rows``: the region model's ``max_batch_size`` for each parallel request, so
    a call is one request per model instance, none over the model's batch)."""

    pixels: RegionPixels
    embedder: RegionEmbedder
    chunk_rows: int
    model_name: str

    @property
    def decode_short_side(self) -> int:
        return self.pixels.decode_short_side

    def embed(self, batch: npt.NDArray[Any]) -> npt.NDArray[np.float32]:
        """The region model's vectors of one chunk.

        Raises:
            InferenceConfigurationError: Triton refused the request (e.g. it does not serve
                the region model); the message says how to serve it.
            InferenceUnavailableError: Triton is unreachable, not ready, overloaded or slow.
        """
        try:
            return self.embedder.embed(batch)
        except InferenceConfigurationError as exc:
            raise InferenceConfigurationError(
                f"{exc}. Collections with region vectors need Triton to serve the region model "
                f"{self.model_name!r} beside the worker's model: {how_to_serve(self.model_name)}; "
                "then restart the worker",
                reason=exc.reason,
                stage=exc.stage,
            ) from exc


def how_to_serve(model_name: str) -> str:
    """How to make Triton serve ``model_name``, in a message's words."""
    return (
        f"on the local stack `trident-stack models add {model_name}` (`trident-stack up` "
        f"serves Lite0's region model already), elsewhere `trident-model-repository DIR "
        f"--models {model_name}` into Triton's model repository"
    )


def build_region_embedding(settings: Settings) -> tuple[RegionEmbedding, TritonEmbedder] | None:
    """The worker's region embedding when its model has a region recipe and the preprocessing
    is the built-in one (regions are preprocessed by it only); None otherwise (a collection
    with regions is then refused item by item, see ``worker.pipeline``). Also returns the
    region model's Triton client, for the caller to check and close.

    Raises:
        ConfigurationError: ``milvus.regions`` is set and the worker cannot make regions (the
            message says why); or the region model is not in the registry.
    """
    spec = settings.model
    registry = settings.triton.registry()
    try:
        region = region_model_of(spec, registry)
        pixels = RegionPreprocessor(spec, settings.preprocess, registry=registry)
    except ConfigurationError as exc:
        if settings.milvus.regions:
            raise ConfigurationError(
                f"milvus.regions is true, but this worker cannot make region vectors: {exc}"
            ) from exc
        logger.info("no region vectors from this worker: %s", exc)
        return None
    triton = settings.for_model(region.name).triton
    embedder = TritonEmbedder(triton, model=region)
    embedding = RegionEmbedding(
        pixels=pixels,
        embedder=embedder,
        chunk_rows=region.max_batch_size * triton.parallel_requests,
        model_name=region.name,
    )
    return embedding, embedder
