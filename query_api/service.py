"""What the query API does, independent of HTTP.

:class:`SearchService` turns a query (image bytes, an image reference, a vector or a stored id)
into a vector, searches Milvus with paging, filters and a score threshold, manages collections
and renders thumbnails of stored items.

A collection is bound to the model whose vectors it holds (``CollectionInfo.bound_model``): an
image query is embedded with the model of the collection it searches, so several models are
served at once. The configured model's preprocessor and Triton client are built at start; any
other model's are built on the first query of one of its collections (from
``Settings.for_model``, checked against what Triton serves) and kept. A model with the
configured model's tag makes the same vectors (same weights: ``engine.models``), so its
collections are searched with the configured model.

A name a request gives may be a Milvus alias (a rebuilt collection's public name, moved by
``trident-reembed switch``): every request resolves it once, when it begins
(:meth:`SearchService.target`), and then embeds its query with the model of the collection the
alias pointed at and searches that collection, so an answer never mixes two models' vectors and
the first request that resolves after a switch uses the new model. The resolution is a Milvus
lookup (``VectorStore.resolve_alias``: 7-11 ms median on the loaded 2-core test machine, the
``resolve`` stage of ``Server-Timing``); it is not cached, since a cached target would outlive
the switch (docs/OPERATIONS.md, "Changing the model"). Should the
collection an alias pointed at be dropped under a request (``trident-reembed finish`` right
after a switch), the request is resolved and run once more.

A collection made with regions (issue 24: a vector per region of each image, beside its whole
image's; ``CollectionInfo.regions``) is searched by image with two query vectors: the image
embedded by the collection's model, and by that model's region model (at the regions' smaller
input, preprocessed as the workers preprocess a region: ``engine.regions``). The whole-image
search and the region search (``VectorStore.search_regions``, with the same filter) are merged
per item, keeping its best score, and each hit says where it matched (``SearchHit.box``: the
winning region's box, the whole image's when its own vector won). The region model's runtime
is built like any other model's, on the first such search, its preprocessing compiled at
start when the configured model has a region recipe.

It raises engine/errors.py's errors only; the HTTP layer maps them to statuses. Every query
method takes the request's :class:`StageTimings` and times each stage it runs in it
(query_api.timing). Its methods are called from worker threads, several at once: the clients
it holds are thread-safe.
"""

from __future__ import annotations

import io
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import wait as wait_for_all
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import numpy.typing as npt
from PIL import Image
from pydantic import ValidationError

from engine.errors import (
    CollectionConflictError,
    ConfigurationError,
    ImageReferenceError,
    InferenceConfigurationError,
    InvalidQueryError,
    ModelSpecError,
    Reason,
    UnknownCollectionError,
    UnknownModelError,
)
from engine.fetch import ImageFetcher
from engine.health import HEALTH_DEADLINE_S, Probe, Prober, milvus_probe, triton_probe
from engine.images import decode_image
from engine.indexes import IndexSpec
from engine.inference import TritonEmbedder
from engine.models import WHOLE_IMAGE, Box, ModelBatch, ModelSpec, model_spec, region_model_of
from engine.preprocess import BaseJAXPreprocessor, build_preprocessor
from engine.records import CollectionInfo, Hit, RegionHit
from engine.regions import region_preprocess_settings
from engine.settings import Settings
from engine.store import VectorStore
from query_api.filters import combined_filter
from query_api.timing import Stage, StageTimings
from schemas import PathImage, UrlImage, reference_from_string
from schemas.api import (
    CollectionList,
    CollectionModel,
    CollectionStats,
    CreateCollectionRequest,
    Embedding,
    IndexDescription,
    ServiceState,
)
from schemas.search import MAX_RESULT_WINDOW, SearchHit, SearchOptions, SearchRequest

logger = logging.getLogger(__name__)

_Answer = TypeVar("_Answer")
_First = TypeVar("_First")
_Second = TypeVar("_Second")

# How long a query waits for Triton to have another model ready, the first time one of its
# collections is searched (the configured model is waited for at start instead).
MODEL_READY_WAIT_S = 10.0
# Threads running the second of two calls a search by image makes at once on a collection with
# regions (the region model's embedding beside the whole image's, the region search beside the
# whole-image search): one per such search in flight, the others queue.
SIDE_THREADS = 8


@dataclass(frozen=True)
class ModelRuntime:
    """What embeds a query image with one model: its preprocessing and its Triton client."""

    preprocessor: BaseJAXPreprocessor
    embedder: TritonEmbedder


@dataclass(frozen=True)
class Target:
    """What one request searches: the ``name`` it gave (a collection or an alias), the
    ``collection`` that name pointed at when the request began, and that collection's model."""

    name: str
    collection: str
    model: CollectionModel
    regions: bool = False  # made with region vectors: a search by image answers boxes

    @property
    def is_alias(self) -> bool:
        return self.name != self.collection


@dataclass(frozen=True)
class SearchAnswer:
    """The hits of one search and what answered it."""

    hits: list[SearchHit]
    target: Target


Vector = npt.NDArray[np.float32]


@dataclass(frozen=True)
class ImageQuery:
    """A query image embedded for a collection: by its model (``whole``) and, for a collection
    with regions, by its region model too (``regional``)."""

    whole: Vector
    regional: Vector | None = None


def runtime_from_settings(settings: Settings) -> ModelRuntime:
    """The preprocessor (batches of one) and the Triton client of ``settings.model``."""
    return ModelRuntime(
        preprocessor=build_preprocessor(settings.preprocess, batch_sizes=(1,)),
        # Checked against the model's spec when it is waited for.
        embedder=TritonEmbedder(settings.triton, model=settings.model, role="query"),
    )


def region_runtime_from_settings(settings: Settings, region_model: ModelSpec) -> ModelRuntime:
    """What embeds a query image as the workers embed a region: the region preprocessing
    (batches of one) and a query Triton client of ``region_model``.

    Raises:
        ConfigurationError: a custom preprocessing class (regions take the built-in one), or
            a model these settings cannot serve.
    """
    preprocess = region_preprocess_settings(settings.preprocess, region_model)
    return ModelRuntime(
        preprocessor=build_preprocessor(preprocess, batch_sizes=(1,)),
        embedder=TritonEmbedder(
            settings.for_model(region_model.name).triton, model=region_model, role="query"
        ),
    )


class SearchService:
    """Similarity search by image bytes, image reference, vector or stored id.

    Each query method takes an optional ``timings`` (:class:`~query_api.timing.StageTimings`)
    in which it records the stages it ran; the HTTP handlers pass one per request.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        store: VectorStore,
        embedder: TritonEmbedder,
        preprocessor: BaseJAXPreprocessor,
        fetcher: ImageFetcher,
        runtime_factory: Callable[[Settings], ModelRuntime] = runtime_from_settings,
        region_runtime_factory: Callable[
            [Settings, ModelSpec], ModelRuntime
        ] = region_runtime_from_settings,
    ) -> None:
        self._settings = settings
        self.store = store
        self.embedder = embedder
        self._preprocessor = preprocessor
        self._fetcher = fetcher
        # One runtime per model name, the configured one first; the others made on demand.
        self._runtime_factory = runtime_factory
        self._runtimes = {settings.model.name: ModelRuntime(preprocessor, embedder)}
        # The region models' runtimes, by region model name; one made at start (its
        # preprocessing compiled) waits in _prepared until a search first needs it.
        self._region_runtime_factory = region_runtime_factory
        self._region_runtimes: dict[str, ModelRuntime] = {}
        self._prepared: dict[str, ModelRuntime] = {}
        self._runtimes_lock = threading.Lock()
        self._building: dict[str, threading.Lock] = {}
        self._side = ThreadPoolExecutor(SIDE_THREADS, thread_name_prefix="search-side")
        self._thumbnails = _ThumbnailCache(settings.api.thumbnail_cache_items)
        self._prober = Prober()
        self._started = False

    @classmethod
    def from_settings(cls, settings: Settings) -> SearchService:
        """The service with its clients built from settings (the one place they are built)."""
        # The configured model's, checked at start against its spec (start() waits for it).
        configured = runtime_from_settings(settings)
        return cls(
            settings,
            store=VectorStore(settings.milvus),
            embedder=configured.embedder,
            preprocessor=configured.preprocessor,
            fetcher=ImageFetcher(settings.fetch),
        )

    def start(self) -> None:
        """Make the service ready to answer: compile the preprocessing, then wait for Triton's
        model (up to ``triton.ready_timeout_s``). Idempotent.

        Raises:
            InferenceConfigurationError: Triton does not serve the configured model.
            InferenceUnavailableError: the model was not ready in time.
        """
        if self._started:
            return
        self._preprocessor.warmup()
        self._prepare_regions()
        self.embedder.wait_until_ready(self._settings.triton.ready_timeout_s)
        self._started = True

    def _prepare_regions(self) -> None:
        """Compile the configured model's region preprocessing now, when it has a region
        recipe, so that the first search of a collection with regions does not; Triton is
        asked for the region model only then (a stack without collections with regions need
        not serve it)."""
        spec = self._settings.model
        if spec.regions is None:
            return
        try:
            region = region_model_of(spec, self._settings.triton.registry())
            runtime = self._region_runtime_factory(self._settings, region)
        except ConfigurationError as exc:  # said again, as a 409, by a search that needs it
            logger.info("no region search for model %s: %s", spec.name, exc)
            return
        runtime.preprocessor.warmup()
        with self._runtimes_lock:
            self._prepared[region.name] = runtime

    def close(self) -> None:
        self._side.shutdown(wait=True)
        self._prober.close()
        self._fetcher.close()
        with self._runtimes_lock:
            runtimes = [
                *self._runtimes.values(),
                *self._region_runtimes.values(),
                *self._prepared.values(),
            ]
        for runtime in runtimes:
            runtime.embedder.close()
        self.store.close()

    # Collections and aliases ----------------------------------------------------------------

    def target(self, name: str | None, timings: StageTimings | None = None) -> Target:
        """What a request naming ``name`` (``None``: the default collection) searches now: the
        collection it is, or that it points at as an alias, and that collection's model.

        Raises:
            UnknownCollectionError: no such collection or alias.
            CollectionConflictError: the collection was made elsewhere (no vector field or
                index).
            StoreUnavailableError: Milvus is unavailable.
        """
        public = name or self.store.default_collection
        with _untimed_if_none(timings).stage("resolve"):
            collection = self.store.resolve_alias(public)
            info = self.store.describe_collection(collection)  # cached by the store
        return Target(
            name=public, collection=collection, model=self._model_of(info), regions=info.regions
        )

    def _on_target(
        self,
        name: str | None,
        timings: StageTimings | None,
        run: Callable[[Target], _Answer],
    ) -> tuple[_Answer, Target]:
        """``run`` on what ``name`` names now; once more, resolved again, should the collection
        an alias pointed at be dropped under it (a ``finish`` right after a ``switch``)."""
        target = self.target(name, timings)
        try:
            return run(target), target
        except UnknownCollectionError:
            if not target.is_alias:
                raise
            logger.info(
                "collection %s was dropped under a request: resolving %s again",
                target.collection,
                target.name,
            )
            target = self.target(name, timings)
            return run(target), target

    # Models -----------------------------------------------------------------------------------

    def collection_model(self, collection: str) -> ModelSpec:
        """The model a search of ``collection`` embeds its query image with: the collection's
        own (``CollectionInfo.bound_model``), or the configured one when the two share a tag
        (the same vectors).

        Raises:
            UnknownCollectionError: no such collection.
            CollectionConflictError: (``model_not_served``) the collection's model is not in
                the registry.
            StoreUnavailableError: Milvus is unavailable.
        """
        info = self.store.describe_collection(collection)
        configured = self._settings.model
        try:
            spec = info.bound_model(self._settings.triton.registry(), configured)
        except UnknownModelError as exc:
            raise CollectionConflictError(str(exc), reason=Reason.MODEL_NOT_SERVED) from exc
        return configured if spec.model_version_tag == configured.model_version_tag else spec

    def runtime_for(self, collection: str | None) -> ModelRuntime:
        """What embeds a query of ``collection`` (``None``: the configured model, not bound to
        a collection), made and checked against Triton on first use, then kept.

        Raises:
            UnknownCollectionError: no such collection.
            CollectionConflictError: (``model_not_served``) Triton does not serve the
                collection's model (or serves another model under its name); the message
                names the model to serve.
            InferenceUnavailableError: Triton did not have the model ready in time.
            StoreUnavailableError: Milvus is unavailable.
        """
        if collection is None:
            return self._runtimes[self._settings.model.name]
        spec = self.collection_model(collection)
        bound = f"collection {collection!r} is bound to model {spec.name!r} "
        bound += f"(tag {spec.model_version_tag!r}, {spec.output_dim} dimensions)"
        return self._kept(
            self._runtimes,
            spec,
            lambda: self._start_runtime(
                spec, bound, lambda: self._runtime_factory(self._settings.for_model(spec.name))
            ),
        )

    def region_runtime_for(self, collection: str) -> ModelRuntime:
        """What embeds a query of ``collection`` (made with regions) as a region: its model's
        region model, made and checked against Triton on first use, then kept.

        Raises:
            CollectionConflictError: (``model_not_served``) the collection's model has no
                region recipe in this registry, or Triton does not serve its region model (the
                message names it).
            UnknownCollectionError, InferenceUnavailableError, StoreUnavailableError: as
                :meth:`runtime_for`.
        """
        info = self.store.describe_collection(collection)
        registry = self._settings.triton.registry()
        try:
            # The collection's own model (not the configured one of the same tag: its recipe).
            region = region_model_of(info.bound_model(registry, self._settings.model), registry)
        except (UnknownModelError, ModelSpecError) as exc:
            raise CollectionConflictError(
                f"collection {collection!r} has region vectors, which this API cannot search: "
                f"{exc}",
                reason=Reason.MODEL_NOT_SERVED,
            ) from exc
        bound = f"collection {collection!r} has region vectors of model {region.name!r}"

        def build() -> ModelRuntime:
            with self._runtimes_lock:
                prepared = self._prepared.pop(region.name, None)
            return prepared or self._region_runtime_factory(self._settings, region)

        return self._kept(
            self._region_runtimes, region, lambda: self._start_runtime(region, bound, build)
        )

    def _kept(
        self, kept: dict[str, ModelRuntime], spec: ModelSpec, start: Callable[[], ModelRuntime]
    ) -> ModelRuntime:
        """``kept[spec.name]``, started once (``start``) on first use."""
        with self._runtimes_lock:
            found = kept.get(spec.name)
            building = self._building.setdefault(spec.name, threading.Lock())
        if found is not None:
            return found
        with building:  # one build per model; queries of other models go on meanwhile
            with self._runtimes_lock:
                found = kept.get(spec.name)
            if found is None:
                found = start()
                with self._runtimes_lock:
                    kept[spec.name] = found
        return found

    def _start_runtime(
        self, spec: ModelSpec, bound: str, factory: Callable[[], ModelRuntime]
    ) -> ModelRuntime:
        """``factory``'s runtime, its preprocessing compiled and its model ready on Triton
        (``bound`` says, in errors, which collection needs it)."""
        try:
            runtime = factory()
        except ConfigurationError as exc:
            raise CollectionConflictError(
                f"{bound}, which these settings cannot serve: {exc}",
                reason=Reason.MODEL_NOT_SERVED,
            ) from exc
        try:
            runtime.preprocessor.warmup()
            runtime.embedder.wait_until_ready(
                min(self._settings.triton.ready_timeout_s, MODEL_READY_WAIT_S)
            )
        except ConfigurationError as exc:  # not served, or served unlike its spec
            runtime.embedder.close()
            served = (
                "serves it unlike its spec"
                if not isinstance(exc, InferenceConfigurationError)
                else "does not serve it"
            )
            raise CollectionConflictError(
                f"{bound}, and Triton at {self._settings.triton.url} {served} ({exc}): serve "
                f"{spec.name!r} there (trident-stack up --models {spec.name}, or "
                "trident-models add for a model of your own), or search another collection",
                reason=Reason.MODEL_NOT_SERVED,
            ) from exc
        except BaseException:
            runtime.embedder.close()
            raise
        logger.info("%s: query images are embedded with model %s", bound, spec.name)
        return runtime

    # Health ---------------------------------------------------------------------------------

    def probes(self) -> dict[str, Probe]:
        """The probes of the services a search needs: Triton's model, Milvus."""
        return {"triton": triton_probe(self.embedder), "milvus": milvus_probe(self.store)}

    def states(self, probes: Mapping[str, Probe]) -> dict[str, ServiceState]:
        """Each probe's state, all run at once: answers within ``HEALTH_DEADLINE_S``."""
        results = self._prober.probe_all(probes, HEALTH_DEADLINE_S)
        return {
            name: ServiceState(state=result.state, detail=self._where(name, result.detail))
            for name, result in results.items()
        }

    def _where(self, service: str, detail: str) -> str:
        """``detail``, naming the service's address unless it does already."""
        s = self._settings
        address = {
            "triton": f"Triton {s.triton.url}",
            "milvus": f"Milvus {s.milvus.uri}",
            "kafka": f"Kafka {s.kafka.bootstrap_servers}",
        }.get(service)
        if not detail or address is None or address.split()[1] in detail:
            return detail
        return f"{address}: {detail}"

    # Embeddings -----------------------------------------------------------------------------

    def embed_image(
        self, data: bytes, timings: StageTimings | None = None, collection: str | None = None
    ) -> npt.NDArray[np.float32]:
        """The embedding of one encoded image, by the model of ``collection`` (``None``: the
        configured model).

        Raises:
            ImageContentError: the bytes are not a usable image (``too_many_pixels`` above
                ``fetch.max_pixels``).
            InferenceUnavailableError: Triton is unavailable.
            and, given a collection, the errors of :meth:`runtime_for`.
        """
        timings = _untimed_if_none(timings)
        runtime = self.runtime_for(collection)  # cached: a dictionary lookup after the first
        with timings.stage("decode"):
            pixels = decode_image(
                data,
                max_pixels=self._settings.fetch.max_pixels,
                target_short_side=runtime.preprocessor.decode_short_side,
            ).pixels
        with timings.stage("preprocess"):
            batch = runtime.preprocessor.preprocess([pixels])
        with timings.stage("embed"):
            embedding: npt.NDArray[np.float32] = runtime.embedder.embed(batch)[0]
        return embedding

    def embed_for(
        self, data: bytes, target: Target, timings: StageTimings | None = None
    ) -> ImageQuery:
        """One encoded image embedded for a search of ``target``: by its collection's model,
        and, for a collection with regions, by its region model too (one decode for both).

        Raises:
            As :meth:`embed_image`, and :meth:`region_runtime_for`'s errors.
        """
        if not target.regions:
            return ImageQuery(self.embed_image(data, timings, target.collection))
        timings = _untimed_if_none(timings)
        regional = self.region_runtime_for(target.collection)
        runtime = self.runtime_for(target.collection)
        with timings.stage("decode"):
            pixels = decode_image(
                data,
                max_pixels=self._settings.fetch.max_pixels,
                # Enough pixels for both preprocessings (each resizes from there).
                target_short_side=max(
                    runtime.preprocessor.decode_short_side,
                    regional.preprocessor.decode_short_side,
                ),
            ).pixels
        with timings.stage("preprocess"):
            batch = runtime.preprocessor.preprocess([pixels])
            small = regional.preprocessor.preprocess([pixels])

        def embed(embedder: TritonEmbedder, pixels: ModelBatch, stage: Stage) -> Vector:
            with timings.stage(stage):
                vector: Vector = embedder.embed(pixels)[0]
            return vector

        return ImageQuery(
            *self._at_once(
                lambda: embed(runtime.embedder, batch, "embed"),
                lambda: embed(regional.embedder, small, "embed_regions"),
            )
        )

    def _at_once(
        self, first: Callable[[], _First], second: Callable[[], _Second]
    ) -> tuple[_First, _Second]:
        """``first()`` here while ``second()`` runs on a side thread; both answers, or the first
        error (once both ended: each call has its own deadline, the service's timeouts)."""
        future = self._side.submit(second)
        try:
            answer = first()
        except BaseException:
            wait_for_all([future])
            raise
        return answer, future.result()

    def embed_reference(
        self, reference: str, timings: StageTimings | None = None, collection: str | None = None
    ) -> npt.NDArray[np.float32]:
        """The embedding of the image at a path (under the allowed roots) or http(s) URL, by
        the model of ``collection`` (``None``: the configured model).

        Raises:
            ImageReferenceError: forbidden, malformed or missing reference.
            ImageContentError, InferenceUnavailableError, FetchUnavailableError, and those of
            :meth:`embed_image`.
        """
        return self.embed_image(self.fetch_reference(reference, timings), timings, collection)

    def fetch_reference(self, reference: str, timings: StageTimings | None = None) -> bytes:
        """The bytes of the image at a path (under the allowed roots) or http(s) URL.

        Raises:
            ImageReferenceError: forbidden, malformed or missing reference.
            ImageContentError: too many bytes.
            FetchUnavailableError: the host did not answer in time.
        """
        with _untimed_if_none(timings).stage("fetch"):
            return self._fetcher.fetch(_reference(reference))

    def embedding(self, vector: npt.NDArray[np.float32]) -> Embedding:
        """The wire form of an embedding, naming the model that made it."""
        return Embedding(
            embedding=vector.astype(float).tolist(),
            dim=int(vector.shape[0]),
            model=self._settings.triton.model_tag,
        )

    def vector_of(
        self, item_id: str, collection: str | None, timings: StageTimings | None = None
    ) -> npt.NDArray[np.float32]:
        """The stored vector of ``item_id``.

        Raises:
            UnknownCollectionError: no such collection.
            InvalidQueryError: (``unknown_id``) no such id.
        """
        timings = _untimed_if_none(timings)
        with timings.stage("lookup"):
            rows = self.store.get([item_id], collection, with_vectors=True)
        if not rows:
            raise _unknown_id(item_id)
        return np.asarray(rows[0]["embedding"], dtype=np.float32)

    # Search ---------------------------------------------------------------------------------

    def query(self, request: SearchRequest, timings: StageTimings | None = None) -> SearchAnswer:
        """Answer a JSON search (by reference, vector or id), best first, on the collection the
        named collection or alias is when the request begins (:meth:`target`). A search by
        reference of a collection with regions matches them too (:meth:`search_image_query`).

        Raises:
            UnknownCollectionError, InvalidQueryError (unknown id, wrong dimension, bad filter),
            ImageReferenceError, ImageContentError, RetriableError (a service is down),
            CollectionConflictError (``model_not_served``: see :meth:`runtime_for`).
        """

        def run(target: Target) -> list[SearchHit]:
            if request.query_input is not None:
                data = self.fetch_reference(request.query_input, timings)
                query = self.embed_for(data, target, timings)
                return self.search_image_query(query, request, timings, target)
            if request.id is not None:
                vector = self.vector_of(request.id, target.collection, timings)
                exclude = None if request.include_self else request.id
                return self.search(vector, request, timings, exclude_id=exclude, target=target)
            assert request.vector is not None  # SearchRequest holds exactly one query
            return self.search(request.vector, request, timings, target=target)

        hits, target = self._on_target(request.collection_name, timings, run)
        return SearchAnswer(hits, target)

    def search_image(
        self, data: bytes, options: SearchOptions, timings: StageTimings | None = None
    ) -> SearchAnswer:
        """The hits of an encoded image (embedded as the workers embed what they store, by the
        model of the collection searched: see :meth:`query`; with its regions, on a collection
        that has them: :meth:`search_image_query`).

        Raises:
            ImageContentError, InferenceUnavailableError, UnknownCollectionError,
            InvalidQueryError, StoreUnavailableError, CollectionConflictError
            (``model_not_served``: see :meth:`runtime_for`).
        """

        def run(target: Target) -> list[SearchHit]:
            query = self.embed_for(data, target, timings)
            return self.search_image_query(query, options, timings, target)

        hits, target = self._on_target(options.collection_name, timings, run)
        return SearchAnswer(hits, target)

    def search_image_query(
        self,
        query: ImageQuery,
        options: SearchOptions,
        timings: StageTimings | None,
        target: Target,
    ) -> list[SearchHit]:
        """The hits of an embedded query image in ``target``: with its regions when it has them
        (each hit's ``box`` says where it matched), else as :meth:`search`.

        Raises:
            UnknownCollectionError, InvalidQueryError, StoreUnavailableError.
        """
        if query.regional is None:
            return self.search(query.whole, options, timings, target=target)
        timings = _untimed_if_none(timings)
        expression = combined_filter(options.filter_expr, options.filter)
        # The best offset + topk of the merge are among each side's best offset + topk.
        window = options.offset + options.topk
        collection = target.collection
        vectors = [query.whole, query.regional]

        def whole() -> list[Hit]:
            with timings.stage("search"):
                return self.store.search(
                    query.whole, top_k=window, filter_expr=expression, collection=collection
                )

        def regional() -> list[RegionHit]:
            with timings.stage("search_regions"):
                return self.store.search_regions(
                    vectors, window, collection, filter_expr=expression
                )

        hits, regions = self._at_once(whole, regional)
        higher = self.store.describe_collection(collection).index.metric != "L2"
        best = _merged(hits, regions, higher_is_better=higher)
        page = best[options.offset : window]
        if options.score_threshold is not None:
            kept = self._above_threshold(
                [hit for hit, _ in page], options.score_threshold, collection
            )
            page = page[: len(kept)]  # best first: those above are a prefix
        with timings.stage("lookup"):
            page = self._with_fields(page, collection)
        return [_hit(hit, options.output_fields, target, box) for hit, box in page]

    def _with_fields(self, page: list[tuple[Hit, Box]], collection: str) -> list[tuple[Hit, Box]]:
        """``page`` with the stored fields of the items only a region found (the region search
        answers ids and boxes); an item deleted meanwhile is left out."""
        missing = [hit.id for hit, _ in page if not hit.fields]
        if not missing:
            return page
        rows = {str(row["id"]): row for row in self.store.get(missing, collection)}
        found: list[tuple[Hit, Box]] = []
        for hit, box in page:
            if hit.fields:
                found.append((hit, box))
            elif hit.id in rows:
                fields = dict(rows[hit.id])
                metadata = dict(fields.pop("metadata", None) or {})
                found.append((Hit(hit.id, hit.score, metadata, fields), box))
        return found

    def search(
        self,
        vector: npt.NDArray[np.float32] | Sequence[float],
        options: SearchOptions,
        timings: StageTimings | None = None,
        *,
        exclude_id: str | None = None,
        target: Target | None = None,
    ) -> list[SearchHit]:
        """The hits of ``vector`` on the page ``options`` asks for, ``exclude_id`` left out, in
        ``target`` (default: what ``options.collection_name`` names now).

        Raises:
            UnknownCollectionError, InvalidQueryError, StoreUnavailableError.
        """
        timings = _untimed_if_none(timings)
        if target is None:
            target = self.target(options.collection_name, timings)
        with timings.stage("search"):
            return self._search(vector, options, exclude_id, target)

    def _search(
        self,
        vector: npt.NDArray[np.float32] | Sequence[float],
        options: SearchOptions,
        exclude_id: str | None,
        target: Target,
    ) -> list[SearchHit]:
        collection = target.collection
        expression = combined_filter(options.filter_expr, options.filter)
        if exclude_id is None:
            hits = self.store.search(
                vector,
                top_k=options.topk,
                offset=options.offset,
                filter_expr=expression,
                collection=collection,
            )
        else:
            # Paging must count without the excluded item wherever it ranks: read from the top.
            window = self.store.search(
                vector,
                top_k=min(options.offset + options.topk + 1, MAX_RESULT_WINDOW),
                filter_expr=expression,
                collection=collection,
            )
            kept = [hit for hit in window if hit.id != exclude_id]
            hits = kept[options.offset : options.offset + options.topk]
        if options.score_threshold is not None:
            hits = self._above_threshold(hits, options.score_threshold, collection)
        return [_hit(hit, options.output_fields, target) for hit in hits]

    def _above_threshold(self, hits: list[Hit], threshold: float, collection: str) -> list[Hit]:
        if self.store.describe_collection(collection).index.metric == "L2":  # a distance
            return [hit for hit in hits if hit.score <= threshold]
        return [hit for hit in hits if hit.score >= threshold]

    # Collections ----------------------------------------------------------------------------

    def create_collection(self, request: CreateCollectionRequest) -> bool:
        """Create a collection bound to ``request.model`` (default: the configured model)
        unless it exists; True if it was created.

        Raises:
            InvalidQueryError: (``invalid_index``) a parameter the index type does not take, or
                out of range; (``unknown_model``) a model the registry does not have (the
                message lists the known ones); (``wrong_dimension``) a ``dim`` other than the
                model's; (``invalid_query``) ``regions`` for a model without a region recipe.
            CollectionConflictError: the collection exists with another dimension or model, or
                without regions when they are asked.
            StoreUnavailableError: Milvus is unavailable.
        """
        model = self._requested_model(request.model)
        if request.dim is not None and request.dim != model.output_dim:
            raise InvalidQueryError(
                f"dim {request.dim} does not fit model {model.name!r}, whose vectors have "
                f"{model.output_dim} dimensions: leave dim out (it follows the model), or name "
                "a model of that dimension",
                reason=Reason.WRONG_DIMENSION,
            )
        if request.regions:
            self._check_region_recipe(model)
        try:
            index = IndexSpec(
                index_type=request.index_type,
                metric=request.metric,
                params=request.params,
                search_params=request.search_params,
            )
        except ValidationError as exc:
            messages = "; ".join(str(error["msg"]) for error in exc.errors())
            raise InvalidQueryError(messages, reason="invalid_index") from exc
        return self.store.create_collection(
            request.name,
            dimension=model.output_dim,
            index=index,
            description=request.description,
            model_tag=model.model_version_tag,
            model_name=model.name,
            regions=request.regions,
        )

    def _check_region_recipe(self, model: ModelSpec) -> None:
        try:
            region_model_of(model, self._settings.triton.registry())
        except (ModelSpecError, UnknownModelError) as exc:
            raise InvalidQueryError(str(exc), reason=Reason.INVALID_QUERY) from exc

    def _requested_model(self, name: str | None) -> ModelSpec:
        configured = self._settings.model
        if name is None or name == configured.name:
            return configured
        try:
            return model_spec(name, self._settings.triton.registry())
        except UnknownModelError as exc:
            raise InvalidQueryError(str(exc), reason=Reason.UNKNOWN_MODEL) from exc

    def collection_stats(self, name: str) -> CollectionStats:
        """Row count, dimension, index and model of a collection, or of the one an alias points
        at (``alias_of`` names it).

        Raises:
            UnknownCollectionError: no such collection or alias.
            StoreUnavailableError: Milvus is unavailable.
        """
        collection = self.store.resolve_alias(name)
        info = self.store.describe_collection(collection)
        return CollectionStats(
            name=name,
            alias_of=collection if collection != name else None,
            row_count=self.store.count(collection),
            dimension=info.dimension,
            index=IndexDescription.model_validate(info.index.describe()),
            description=info.description,
            model_tag=info.model_tag,
            model=self._model_of(info),
            regions=info.regions,
        )

    def collections(self) -> CollectionList:
        """Every collection's name and model, every alias and the collection it points at, and
        the name searched by default. Collections made elsewhere (no vector field or index) are
        listed without a model.

        Raises:
            StoreUnavailableError: Milvus is unavailable.
        """
        names = self.store.list_collections()
        models = {}
        for name in names:
            try:
                info = self.store.describe_collection(name)
            except (UnknownCollectionError, CollectionConflictError):
                continue  # dropped meanwhile, or made elsewhere
            models[name] = self._model_of(info)
        return CollectionList(
            collections=names,
            default=self.store.default_collection,
            models=models,
            aliases=self.store.aliases(),
        )

    def drop_collection(self, name: str) -> None:
        """Drop a collection and its data; never through an alias (what it points at serves).

        Raises:
            UnknownCollectionError: no such collection.
            CollectionConflictError: ``name`` is an alias (the message says what to do).
            StoreUnavailableError: Milvus is unavailable.
        """
        collection = self.store.resolve_alias(name)
        if collection != name:
            raise CollectionConflictError(
                f"{name!r} is an alias of collection {collection!r}, which it serves: move it "
                "back or drop it with trident-reembed (rollback, finish), or drop the "
                "collection by its own name"
            )
        self.store.drop_collection(name)

    def _model_of(self, info: CollectionInfo) -> CollectionModel:
        """The model a collection is bound to, as recorded (name, tag), or for a collection
        made before names were recorded, the one its tag names (``bound_model``)."""
        try:
            spec = info.bound_model(self._settings.triton.registry(), self._settings.model)
            name, tag = info.model_name or spec.name, info.model_tag or spec.model_version_tag
        except UnknownModelError:  # shown as recorded; searching it says what to do
            name, tag = info.model_name, info.model_tag
        return CollectionModel(name=name, tag=tag, dim=info.dimension)

    # Thumbnails -----------------------------------------------------------------------------

    def thumbnail(self, collection: str, item_id: str) -> bytes:
        """A JPEG of the stored item's image, its longest side at most ``api.thumbnail_size``.

        Made from the stored source with the fetcher's rules (allowed roots, address policy,
        size limits) and cached per item and image content.

        Raises:
            UnknownCollectionError: no such collection.
            InvalidQueryError: (``unknown_id``) no such item.
            ImageReferenceError: (``no_source``) the item's image was sent inline, so there is
                nothing to fetch; or its source can no longer be followed.
            ImageContentError, FetchUnavailableError, StoreUnavailableError.
        """
        collection = self.store.resolve_alias(collection)
        rows = self.store.get([item_id], collection)
        if not rows:
            raise _unknown_id(item_id)
        source, digest = str(rows[0]["source"]), str(rows[0]["content_sha256"])
        key = (collection, item_id, digest)
        cached = self._thumbnails.get(key)
        if cached is not None:
            return cached
        if not source or source.startswith("inline:"):
            raise ImageReferenceError(
                f"item {item_id!r} was sent inline: no stored image to show", reason="no_source"
            )
        data = self._fetcher.fetch(_reference(source))
        thumbnail = _render_thumbnail(
            data, self._settings.api.thumbnail_size, self._settings.fetch.max_pixels
        )
        self._thumbnails.put(key, thumbnail)
        return thumbnail


class _ThumbnailCache:
    """A bounded, thread-safe LRU of rendered thumbnails."""

    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        self._items: OrderedDict[tuple[str, str, str], bytes] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple[str, str, str]) -> bytes | None:
        with self._lock:
            found = self._items.get(key)
            if found is not None:
                self._items.move_to_end(key)
            return found

    def put(self, key: tuple[str, str, str], value: bytes) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self._capacity:
                self._items.popitem(last=False)


def _render_thumbnail(data: bytes, size: int, max_pixels: int) -> bytes:
    pixels = decode_image(data, max_pixels=max_pixels, target_short_side=size).pixels
    image = Image.fromarray(pixels)
    image.thumbnail((size, size), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=85)
    return out.getvalue()


def _reference(text: str) -> PathImage | UrlImage:
    try:
        return reference_from_string(text)
    except ValidationError as exc:
        raise ImageReferenceError(
            f"not a usable path or http(s) URL: {text[:200]!r}", reason="invalid_reference"
        ) from exc


def _merged(
    hits: Sequence[Hit], regions: Sequence[RegionHit], *, higher_is_better: bool
) -> list[tuple[Hit, Box]]:
    """Whole-image ``hits`` and ``regions`` per item, its best score kept with where it matched
    (``WHOLE_IMAGE`` when its own vector won; a tie goes to the whole image), best first. An item
    only a region found has no fields yet."""

    def better(a: float, b: float) -> bool:
        return a > b if higher_is_better else a < b

    best: dict[str, tuple[Hit, Box]] = {hit.id: (hit, WHOLE_IMAGE) for hit in hits}
    for region in regions:
        found = best.get(region.id)
        if found is None:
            best[region.id] = (Hit(region.id, region.score, {}, {}), region.box)
        elif better(region.score, found[0].score):
            hit = found[0]
            best[region.id] = (Hit(hit.id, region.score, hit.metadata, hit.fields), region.box)
    return sorted(best.values(), key=lambda pair: pair[0].score, reverse=higher_is_better)


def _hit(
    hit: Hit, output_fields: Sequence[str], target: Target, box: Box | None = None
) -> SearchHit:
    return SearchHit(
        id=hit.id,
        score=hit.score,
        metadata=hit.metadata,
        source=str(hit.fields.get("source", "")),
        fields={name: hit.fields[name] for name in output_fields if name in hit.fields},
        collection=target.collection,
        model=target.model.name,
        model_tag=target.model.tag,
        box=box,
    )


def _unknown_id(item_id: str) -> InvalidQueryError:
    return InvalidQueryError(f"no item with id {item_id!r}", reason="unknown_id")


def _untimed_if_none(timings: StageTimings | None) -> StageTimings:
    # Callers outside a request (the earlier pipeline, scripts) need not time the stages.
    return timings if timings is not None else StageTimings()
