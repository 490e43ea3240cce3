"""What the query API does, independent of HTTP: turn a query into a vector, search Milvus."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from engine.errors import InvalidQueryError, Stage
from engine.fetch import ImageFetcher
from engine.images import decode_image
from engine.inference import TritonEmbedder
from engine.preprocess import JaxPreprocessor
from engine.preprocess_jax import build_preprocessor
from engine.settings import Settings
from engine.store import Hit, VectorStore
from schemas import SearchHit, reference_from_string

logger = logging.getLogger(__name__)


class SearchService:
    """Similarity search by image bytes, image reference, vector or stored id."""

    def __init__(
        self,
        settings: Settings,
        *,
        store: VectorStore,
        embedder: TritonEmbedder,
        preprocessor: JaxPreprocessor,
        fetcher: ImageFetcher,
    ) -> None:
        self._settings = settings
        self.store = store
        self.embedder = embedder
        self._preprocessor = preprocessor
        self._fetcher = fetcher

    @classmethod
    def from_settings(cls, settings: Settings) -> SearchService:
        return cls(
            settings,
            store=VectorStore(settings.milvus),
            embedder=TritonEmbedder(settings.triton),
            preprocessor=build_preprocessor(settings.preprocess, batch_sizes=(1,)),  # type: ignore[arg-type]
            fetcher=ImageFetcher(settings.fetch),
        )

    def warmup(self) -> None:
        self._preprocessor.warmup()

    def close(self) -> None:
        self._fetcher.close()
        self.embedder.close()
        self.store.close()

    def embed_image(self, data: bytes) -> npt.NDArray[np.float32]:
        """The embedding of one encoded image.

        Raises:
            ImageContentError: the bytes are not a usable image.
            InferenceUnavailableError: Triton is unavailable.
        """
        pixels = decode_image(data, max_pixels=self._settings.fetch.max_pixels).pixels
        batch = self._preprocessor.preprocess([pixels])
        embedding: npt.NDArray[np.float32] = self.embedder.embed(batch)[0]
        return embedding

    def embed_reference(self, reference: str) -> npt.NDArray[np.float32]:
        """The embedding of the image at a path (under the allowed roots) or http(s) URL.

        Raises:
            ImageReferenceError: forbidden or missing reference.
            ImageContentError, InferenceUnavailableError, FetchUnavailableError.
        """
        return self.embed_image(self._fetcher.fetch(reference_from_string(reference)))

    def vector_of(self, item_id: str, collection: str | None) -> npt.NDArray[np.float32]:
        """The stored vector of ``item_id``.

        Raises:
            InvalidQueryError: no such id.
        """
        rows = self.store.get([item_id], collection, with_vectors=True)
        if not rows:
            raise InvalidQueryError(
                f"no item with id {item_id!r}", reason="unknown_id", stage=Stage.SEARCH
            )
        return np.asarray(rows[0]["embedding"], dtype=np.float32)

    def search(
        self,
        vector: npt.NDArray[np.float32] | Sequence[float],
        *,
        top_k: int,
        filter_expr: str | None = None,
        collection: str | None = None,
    ) -> list[SearchHit]:
        hits: list[Hit] = self.store.search(
            vector, top_k=top_k, filter_expr=filter_expr, collection=collection
        )
        return [SearchHit(id=hit.id, score=hit.score, metadata=hit.metadata) for hit in hits]
