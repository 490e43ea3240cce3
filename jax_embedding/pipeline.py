"""``ImageEmbeddingPipeline``: the earlier pipeline's Python API, for scripts and notebooks.

It embeds and stores directly (fetch, decode, preprocess, Triton, Milvus upsert) with the same
adapters, fetch safety and preprocessing as the streaming worker; the worker remains the
production route for continuous ingest. :meth:`ImageEmbeddingPipeline.insert_images` returns
once the rows are searchable under Milvus's default (bounded) consistency, so a search right
after it sees them. :meth:`ImageEmbeddingPipeline.delete_images` is the exception to the direct
path: it publishes deletes (tombstones on the ingest topic, ``config.kafka``) for the workers to
apply in order with the ids' upserts, and never removes rows itself.

Errors are the project's (:mod:`engine.errors`): bad inputs are :class:`PermanentError`
subclasses, an unavailable service a :class:`RetriableError` subclass, a setup that cannot work
a :class:`ConfigurationError`; each message says what to change.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Self

import numpy as np
import numpy.typing as npt
from pydantic import ValidationError

from engine.errors import (
    BrokerUnavailableError,
    ConfigurationError,
    InvalidQueryError,
    RetriableError,
    StoreUnavailableError,
    TridentError,
    UnknownCollectionError,
)
from engine.fetch import ImageFetcher
from engine.health import HEALTH_DEADLINE_S, milvus_probe, probe_all, triton_probe
from engine.inference import TritonEmbedder
from engine.preprocess import (
    BaseJAXPreprocessor,
    FenceHints,
    LoadedImage,
    build_preprocessor,
    load_images,
)
from engine.records import CollectionInfo, VectorRecord
from engine.store import ID_MAX_LENGTH, VectorStore
from jax_embedding.config import ServiceConfig
from producer.publisher import Delivery, EventPublisher
from schemas import ContractError, DeleteEvent, EventLimits
from schemas.events import now_micros
from schemas.search import COLLECTION_NAME_PATTERN

logger = logging.getLogger(__name__)

ImageInput = str | Path
Progress = Callable[[int], object]  # called with the number of images just finished
# How long insert_images waits for its rows to become visible to searches.
SEARCHABLE_TIMEOUT_S = 60.0
# How long delete_images waits for Kafka to acknowledge its deletes.
PUBLISH_TIMEOUT_S = 30.0
# What a pipeline user can do about a reference the fetch fence refused: it takes a config.
PIPELINE_FENCE_HINTS: FenceHints = {
    "path_not_allowed": "add its folder to config.fetch.allowed_roots (fetch.allowed_roots)",
    "forbidden_address": "if the host is trusted, list it in config.fetch.allowed_hosts",
}
_COLLECTION_NAME = re.compile(COLLECTION_NAME_PATTERN)


class ImageEmbeddingPipeline:
    """Embed images, store them in Milvus collections, search them. A context manager.

    ``preprocessor`` replaces the one the configuration describes; it must be a
    :class:`BaseJAXPreprocessor` (subclass one for your own preprocessing).
    """

    def __init__(
        self,
        config: ServiceConfig | None = None,
        preprocessor: BaseJAXPreprocessor | None = None,
    ) -> None:
        """Connects lazily: nothing is contacted until the first call that needs a service.

        Raises:
            ConfigurationError: the configuration is invalid, or ``preprocessor`` is not a
                :class:`BaseJAXPreprocessor`.
        """
        self.config = config if config is not None else ServiceConfig()
        settings = self.config.to_settings()
        if preprocessor is not None and not isinstance(preprocessor, BaseJAXPreprocessor):
            raise ConfigurationError(
                f"preprocessor must be a BaseJAXPreprocessor, got {type(preprocessor).__name__}"
            )
        self.settings = settings
        self.preprocessor = preprocessor or build_preprocessor(settings.preprocess)
        if self.config.cache_compiled_functions:
            self.preprocessor.warmup()
        self._fetcher = ImageFetcher(settings.fetch)
        self._embedder = TritonEmbedder(settings.triton)
        self._store = VectorStore(settings.milvus)
        self._publisher: EventPublisher | None = None  # made by the first delete_images

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        if self._publisher is not None:
            self._publisher.close(PUBLISH_TIMEOUT_S)
        self._fetcher.close()
        self._embedder.close()
        self._store.close()

    # Collections ----------------------------------------------------------------------------

    def create_collection(
        self, name: str | None = None, dim: int | None = None, description: str = ""
    ) -> bool:
        """Create a collection (index from ``config.milvus``) unless it exists; True if created.

        ``name`` defaults to ``config.milvus.collection_name``, ``dim`` to
        ``config.milvus.embedding_dim``.

        Raises:
            InvalidQueryError: Milvus cannot hold a collection of that name.
            StoreUnavailableError: Milvus is unreachable.
        """
        return self._store.create_collection(
            _checked_name(name or self.settings.milvus.collection),
            dimension=dim or self.settings.milvus.dimension,
            index=self.settings.milvus.index_spec(),
            description=description,
            model_tag=self.settings.triton.model_tag,
        )

    def list_collections(self) -> list[str]:
        """Raises: StoreUnavailableError: Milvus is unreachable."""
        return self._store.list_collections()

    def delete_collection(self, name: str) -> None:
        """Drop a collection and its data.

        Raises:
            InvalidQueryError: not a collection name Milvus can hold.
            UnknownCollectionError: no such collection.
            StoreUnavailableError: Milvus is unreachable.
        """
        self._store.drop_collection(_checked_name(name))

    def get_collection_stats(self, name: str | None = None) -> dict[str, Any]:
        """Name, row count, dimension, index, description and model tag of a collection.

        Raises:
            InvalidQueryError: not a collection name Milvus can hold.
            UnknownCollectionError: no such collection.
            StoreUnavailableError: Milvus is unreachable.
        """
        collection = name or self.settings.milvus.collection
        info = self._described(collection)
        return {
            "name": info.name,
            "row_count": self._store.count(collection),
            "dimension": info.dimension,
            "index": info.index.describe(),
            "description": info.description,
            "model_tag": info.model_tag,
        }

    def health_check(self) -> dict[str, bool]:
        """Whether Triton (model ready) and Milvus answer, asked at once: answers within
        ``engine.health.HEALTH_DEADLINE_S`` (3 s) whatever they do; never raises."""
        probes = {"triton": triton_probe(self._embedder), "milvus": milvus_probe(self._store)}
        return {name: result.up for name, result in probe_all(probes, HEALTH_DEADLINE_S).items()}

    # Embedding ------------------------------------------------------------------------------

    def embed_images(
        self,
        inputs: Sequence[ImageInput],
        batch_size: int | None = None,
        *,
        progress: Progress | None = None,
    ) -> npt.NDArray[np.float32]:
        """L2-normalised embeddings ``(len(inputs), dim)`` of paths or http(s) URLs, in order.

        Raises:
            ImageReferenceError: an input cannot be read (missing, outside
                ``config.fetch.allowed_roots``, forbidden address).
            ImageContentError: an input is not a usable image.
            FetchUnavailableError, InferenceUnavailableError: a host or Triton is unavailable.
            InferenceConfigurationError: Triton refused the request (model or tensor names).
        """
        vectors = [
            vector for _, vector in self._embedded_batches(inputs, batch_size, progress=progress)
        ]
        if not vectors:
            return np.zeros((0, self.settings.milvus.dimension), dtype=np.float32)
        return np.concatenate(vectors)

    def insert_images(
        self,
        inputs: Sequence[ImageInput],
        ids: Sequence[str] | None = None,
        metadata: Sequence[dict[str, Any]] | dict[str, Any] | None = None,
        collection_name: str | None = None,
        batch_size: int | None = None,
        *,
        progress: Progress | None = None,
    ) -> list[str]:
        """Embed and upsert images; return their ids once searches can find them.

        ``ids`` default to the inputs themselves; ``metadata`` is one dict per input, or one
        dict for all. An id already stored is replaced.

        Raises:
            UnknownCollectionError: the collection does not exist (create it first).
            ConfigurationError: the collection's dimension differs from the model's vectors.
            InvalidQueryError: ``ids`` or ``metadata`` do not match ``inputs`` one to one, or
                not a collection name Milvus can hold.
            StoreUnavailableError: Milvus is unavailable, or the rows did not become searchable
                in time.
            and the errors of :meth:`embed_images`.
        """
        names = [str(item) for item in ids] if ids is not None else [str(i) for i in inputs]
        extras = _metadata_per_input(metadata, len(inputs))
        if len(names) != len(inputs) or len(set(names)) != len(names):
            raise InvalidQueryError(
                f"need one distinct id per input: {len(inputs)} inputs, {len(names)} ids, "
                f"{len(set(names))} distinct"
            )
        too_long = [name for name in names if len(name.encode()) > ID_MAX_LENGTH]
        if too_long:
            raise InvalidQueryError(
                f"ids are at most {ID_MAX_LENGTH} bytes (UTF-8); {too_long[0][:60]!r}... is "
                "longer: pass shorter ids="
            )
        collection = collection_name or self.settings.milvus.collection
        dimension = self._described(collection).dimension
        version = time.time_ns() // 1_000
        position = 0
        for loaded, vectors in self._embedded_batches(inputs, batch_size, progress=progress):
            if vectors.shape[1] != dimension:
                raise ConfigurationError(
                    f"collection {collection!r} holds {dimension}-d vectors but the model gives "
                    f"{vectors.shape[1]}-d ones: create a collection with dim={vectors.shape[1]}"
                )
            records = [
                self._record(names[position + row], image, vector, extras[position + row], version)
                for row, (image, vector) in enumerate(zip(loaded, vectors, strict=True))
            ]
            self._store.upsert(records, collection)
            position += len(records)
        self._wait_until_searchable(names, collection, version)
        return names

    def delete_images(
        self, ids: Sequence[str], collection_name: str | None = None
    ) -> list[dict[str, Any]]:
        """Delete images by id: publish one delete per id (a tombstone on the ingest topic,
        ``config.kafka.topic``), all of one version, and return once Kafka acknowledged them
        all, with where each went: dicts with ``id``, ``collection``, ``version``,
        ``partition`` and ``offset``, in order (an id given twice is deleted once).

        A worker applies them, in order with the ids' inserts: the rows are gone once it has
        (``trident-dlq status ID`` says ``deleted``), and no insert older than a delete brings
        its id back. An id that is not stored is no error.

        Raises:
            InvalidQueryError: no ids, an id that is not valid (empty, a control character, over
                256 UTF-8 bytes), or not a collection name Milvus can hold; nothing is sent.
            UnknownCollectionError: no such collection.
            BrokerUnavailableError: Kafka did not acknowledge every delete in time (the call
                may be repeated: a delete applied twice deletes once).
            ConfigurationError: Kafka has no such topic, or refused this client.
            PermanentError: Kafka refused a delete for another reason.
            StoreUnavailableError: Milvus could not be asked whether the collection exists.
        """
        collection = collection_name or self.settings.milvus.collection
        self._described(collection)
        if not ids:
            raise InvalidQueryError("give at least one id to delete")
        version = now_micros()
        limits = self.settings.kafka.event_limits
        deletes = [_delete_event(str(i), collection, version, limits) for i in dict.fromkeys(ids)]
        if self._publisher is None:
            self._publisher = EventPublisher(self.settings.kafka)
        deliveries = self._publisher.publish_each(deletes, timeout_s=PUBLISH_TIMEOUT_S)
        failed = [delivery for delivery in deliveries if delivery.error is not None]
        if failed:
            raise _first_failure(failed, len(deletes))
        return [
            {
                "id": event.id,
                "collection": collection,
                "version": event.version,
                "partition": delivery.partition,
                "offset": delivery.offset,
            }
            for event, delivery in zip(deletes, deliveries, strict=True)
        ]

    def search_images(
        self,
        query_input: ImageInput,
        topk: int = 10,
        collection_name: str | None = None,
        filter_expr: str | None = None,
    ) -> list[dict[str, Any]]:
        """The ``topk`` stored images nearest the query image, best first, as dicts with
        ``id``, ``score`` and ``metadata``.

        Raises:
            UnknownCollectionError: no such collection.
            InvalidQueryError: a bad filter expression, a collection of another dimension, or
                not a collection name Milvus can hold.
            StoreUnavailableError: Milvus is unavailable.
            and the errors of :meth:`embed_images`.
        """
        collection = collection_name or self.settings.milvus.collection
        self._described(collection)  # a missing collection fails before any embedding work
        vector = self.embed_images([query_input])[0]
        hits = self._store.search(
            vector, top_k=topk, filter_expr=filter_expr, collection=collection
        )
        return [{"id": hit.id, "score": hit.score, "metadata": hit.metadata} for hit in hits]

    # Internals ------------------------------------------------------------------------------

    def _embedded_batches(
        self, inputs: Sequence[ImageInput], batch_size: int | None, *, progress: Progress | None
    ) -> Iterator[tuple[list[LoadedImage], npt.NDArray[np.float32]]]:
        """Embedded inputs, one batch at a time (so a long insert holds one batch of pixels)."""
        step = batch_size or self.config.preprocess.batch_size
        if step < 1:
            raise InvalidQueryError(f"batch_size must be at least 1, got {step}")
        for start in range(0, len(inputs), step):
            loaded = load_images(
                self._fetcher,
                inputs[start : start + step],
                max_pixels=self.settings.fetch.max_pixels,
                short_side=self.preprocessor.decode_short_side,
                fence_hints=PIPELINE_FENCE_HINTS,
            )
            model_input = self.preprocessor.preprocess([image.pixels for image in loaded])
            vectors = _l2_normalised(self._embedder.embed(model_input))
            if progress is not None:
                progress(len(loaded))
            yield loaded, vectors

    def _record(
        self,
        item_id: str,
        image: LoadedImage,
        vector: npt.NDArray[np.float32],
        metadata: dict[str, Any],
        version: int,
    ) -> VectorRecord:
        return VectorRecord(
            id=item_id,
            vector=vector,
            metadata=metadata,
            source=image.reference,
            content_sha256=image.content_sha256,
            model_version=self.settings.triton.model_tag,
            event_version=version,
            ingested_at_ms=version // 1_000,
        )

    def _described(self, collection: str) -> CollectionInfo:
        try:
            return self._store.describe_collection(_checked_name(collection))
        except UnknownCollectionError as exc:
            raise UnknownCollectionError(
                f"no collection named {collection!r}: create it first, with "
                f"pipeline.create_collection({collection!r}) or "
                f"jax-embedding collection create --name {collection}"
            ) from exc

    def _wait_until_searchable(self, ids: list[str], collection: str, version: int) -> None:
        """Poll with the default consistency (what searches use) until every row of this
        insert is visible; reads stay off Strong consistency, which costs every search."""
        deadline = time.monotonic() + SEARCHABLE_TIMEOUT_S
        pending = set(ids)
        while pending:
            rows = self._store.get(sorted(pending), collection)
            pending -= {str(row["id"]) for row in rows if int(row["event_version"]) >= version}
            if not pending:
                return
            if time.monotonic() > deadline:
                raise StoreUnavailableError(
                    f"{len(pending)} of {len(ids)} rows written to {collection!r} were still not "
                    f"searchable after {SEARCHABLE_TIMEOUT_S:.0f}s; Milvus may be overloaded"
                )
            time.sleep(0.2)


def _checked_name(name: str) -> str:
    """``name``, if Milvus can hold a collection of that name.

    Raises:
        InvalidQueryError: it cannot; checked here because Milvus would answer with an error
            that reads like an outage.
    """
    if not _COLLECTION_NAME.fullmatch(name):
        raise InvalidQueryError(
            f"invalid collection name {name!r}: choose one of letters, digits and underscores "
            f"that matches {COLLECTION_NAME_PATTERN}"
        )
    return name


def _delete_event(item_id: str, collection: str, version: int, limits: EventLimits) -> DeleteEvent:
    try:
        event = DeleteEvent(id=item_id, collection=collection, version=version)
        limits.check_id(event.id)
    except (ValidationError, ContractError) as exc:
        problems = (
            "; ".join(str(error["msg"]) for error in exc.errors())
            if isinstance(exc, ValidationError)
            else str(exc)
        )
        raise InvalidQueryError(
            f"id {item_id[:80]!r} cannot be deleted ({problems}): ids are 1 to 256 UTF-8 "
            "bytes without control characters"
        ) from exc
    return event


def _first_failure(failed: list[Delivery], total: int) -> TridentError:
    """Unavailable when any delete failed for a transient reason (repeat the call), else the
    first refusal."""
    errors = [delivery.error for delivery in failed if delivery.error is not None]
    summary = f"Kafka did not take {len(failed)} of {total} deletes; {failed[0].key!r}: "
    if any(isinstance(error, RetriableError) for error in errors):
        return BrokerUnavailableError(summary + str(errors[0]))
    return type(errors[0])(summary + str(errors[0]), reason=errors[0].reason)


def _l2_normalised(vectors: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    result: npt.NDArray[np.float32] = (vectors / np.maximum(norms, 1e-12)).astype(np.float32)
    return result


def _metadata_per_input(
    metadata: Sequence[dict[str, Any]] | dict[str, Any] | None, count: int
) -> list[dict[str, Any]]:
    if metadata is None:
        return [{} for _ in range(count)]
    if isinstance(metadata, dict):
        return [dict(metadata) for _ in range(count)]
    if len(metadata) != count or not all(isinstance(item, dict) for item in metadata):
        raise InvalidQueryError(
            f"metadata must be one dict, or a list of {count} dicts (one per input); "
            f"got {len(metadata)} items"
        )
    return [dict(item) for item in metadata]
