"""The work on one micro-batch of consumed records, as three stages: prepare, embed, store.

:class:`BatchProcessor` turns records into durable effects. Its stages run one after another
for a batch, on any thread (``worker.stages`` runs each on its own, overlapping batches):

- :meth:`~BatchProcessor.prepare`: decode the records (a record with a null value, a tombstone,
  is a delete: ``schemas.deletes``; any other an ingest event), route each to the collection
  its rows go into, or skip it (``worker.routing``: aliases, rebuilds), screen them against the
  stale-version guard (before any download: ``worker.versions``), fetch the images, skip or
  reuse what is already stored, decode the images, preprocess them into the model's input batch
  and, for the images of collections made with regions, crop and preprocess their regions;
- :meth:`~BatchProcessor.embed`: run the model on that batch (Triton), then the region model on
  the regions;
- :meth:`~BatchProcessor.store`: upsert the vectors and metadata (with their regions, which the
  store writes first), and apply the deletes (rows Milvus refuses are isolated), remembering
  what was written.

Regions (issue 24, ``worker.regions``): whether a collection has them is read from the store
once per collection (``CollectionInfo.regions``). Its images are decoded large enough for their
regions (``RegionEmbedding.decode_short_side``), and never reuse a stored vector: the same image
at a newer version is embedded again, regions included, so the new version has its own. A
worker that cannot make regions (its model has no region recipe) dead-letters the ingest events
of such a collection with a :class:`~engine.errors.ConfigurationError` rather than write a row
without them.

Deletes obey the same version rule as upserts (a record older than what is stored, deleted or in
flight for its id is stale; equal versions: the later record wins, within a batch by offset)
and need no fetch, preprocessing or inference: they go straight to the store stage, which
writes their tombstones and removes their rows (``VectorStore.delete``).

It reports, for each record, one outcome:

- ``STORED`` (upserted), ``DELETED`` (its tombstone written and its row, if any, removed) or
  ``SKIPPED`` (nothing to write: superseded, stale, unchanged);
- ``DEAD`` (a permanent failure, or a per-record transient one past its retry budget): the
  caller dead-letters it with ``item.dead_letter``;
- ``REQUEUE`` (its image host failed transiently and the budget is not used up): the caller
  re-publishes it to the retry topic, ``item.attempts`` in the ``trident.retry.attempts`` header;
- ``UNFINISHED`` (a stop was requested mid-way, or its partition is no longer this worker's):
  the record must be consumed again.

A dependency-wide outage (Triton or Milvus unavailable through the retries) raises instead: no
record of the batch has an outcome worth keeping. A batch cancelled by the caller (``Batch.
cancelled``) raises :class:`BatchAbandonedError` at its next stage or write; a write already sent
completes. Rows are written only for partitions still owned (``worker.ownership``), checked
under a lock that :meth:`BatchProcessor.fence` waits for. The processor never commits and never
talks to Kafka: the consumer loop owns offsets and the producer.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Generic, Protocol, TypeVar

import numpy as np
import numpy.typing as npt
from confluent_kafka import TIMESTAMP_NOT_AVAILABLE, Message

from engine.errors import (
    BatchAbandonedError,
    CollectionConflictError,
    ConfigurationError,
    FetchUnavailableError,
    ImageDecodeError,
    InvalidEventError,
    InvalidRowError,
    PermanentError,
    Reason,
    Stage,
    TridentError,
    UnknownCollectionError,
)
from engine.images import decode_image
from engine.models import Box
from engine.records import Consistency, ItemRegions, StoredVersion, VectorRecord
from engine.regions import RegionBatch
from engine.settings import FetchSettings, RetrySettings
from schemas import (
    DEFAULT_EVENT_LIMITS,
    ContractError,
    DeleteEvent,
    EventLimits,
    IngestEvent,
    decode_delete,
    decode_event,
)
from schemas.dead_letter import HEADER_RETRY_ATTEMPTS
from schemas.events import ImageRef
from worker.dead_letter import DeadLetter
from worker.metrics import Step, WorkerMetrics
from worker.ownership import Owner, Ownership
from worker.regions import RegionEmbedding
from worker.retry import call_with_retries, retry_rounds
from worker.routing import Route
from worker.versions import Candidate, Known, VersionGuard

logger = logging.getLogger(__name__)

T = TypeVar("T")
W = TypeVar("W")
R = TypeVar("R")
# A collection that cannot take the rows (missing, or made elsewhere without a vector index): its
# items are dead-lettered, never written and never a reason to stop the worker.
_UNUSABLE_COLLECTION = (UnknownCollectionError, CollectionConflictError)


class Fetcher(Protocol):
    def fetch_many(self, refs: Sequence[ImageRef]) -> list[bytes | TridentError]: ...


class Preprocessor(Protocol):
    # The batch is the model's input, whatever its dtype (float32, or uint8 when the model
    # normalises itself): the pipeline only hands it on.
    def preprocess(self, images: Sequence[npt.NDArray[np.uint8]]) -> npt.NDArray[Any]: ...


class Router(Protocol):
    def route(self, collection: str) -> Route: ...


class Embedder(Protocol):
    def embed(self, batch: npt.NDArray[Any]) -> npt.NDArray[np.float32]: ...


class Store(Protocol):
    def stored_versions(
        self,
        ids: Sequence[str],
        collection: str | None = None,
        *,
        consistency: Consistency = "Strong",
    ) -> dict[str, StoredVersion]: ...
    def validate(self, record: VectorRecord, collection: str | None = None) -> None: ...
    def upsert(self, records: Sequence[VectorRecord], collection: str | None = None) -> int: ...
    def delete(
        self, ids_with_versions: Sequence[tuple[str, int]], collection: str | None = None
    ) -> None: ...
    def get(
        self, ids: Sequence[str], collection: str | None = None, *, with_vectors: bool = False
    ) -> list[dict[str, object]]: ...


class Outcome(StrEnum):
    PENDING = "pending"
    STORED = "stored"
    DELETED = "deleted"
    SKIPPED = "skipped"
    DEAD = "dead_lettered"
    REQUEUE = "requeue"
    UNFINISHED = "unfinished"


@dataclass(eq=False)
class Item:
    """One consumed record on its way through the stages."""

    message: Message
    owner: Owner
    # What the record asks for: an ingest event, or a delete (the record was a tombstone).
    event: IngestEvent | DeleteEvent | None = None
    # Where its rows go (``worker.routing``); empty until routed: the collection it names.
    collection: str = ""
    known: Known | None = None
    data: bytes | None = None
    content_sha256: str = ""
    pixels: npt.NDArray[np.uint8] | None = None
    reuse_vector: npt.NDArray[np.float32] | None = None
    # Its collection holds region vectors (an ingest event only), and, once embedded, its own.
    regions: bool = False
    region_vectors: npt.NDArray[np.float32] | None = None
    region_boxes: tuple[Box, ...] = ()
    # Attempts at this record's own transient failure so far, including earlier deliveries.
    attempts: int = 0
    outcome: Outcome = Outcome.PENDING
    skip_reason: str = ""
    requeue_reason: str = ""
    dead_letter: DeadLetter | None = None

    @property
    def pending(self) -> bool:
        return self.outcome is Outcome.PENDING

    @property
    def ingest(self) -> IngestEvent | None:
        """The ingest event, unless the record is a delete (or could not be decoded)."""
        return self.event if isinstance(self.event, IngestEvent) else None

    @property
    def is_delete(self) -> bool:
        return isinstance(self.event, DeleteEvent)

    def fail(self, error: TridentError, stage: Stage, *, reason: str | None = None) -> None:
        where = error.stage or stage
        if self.is_delete and where is Stage.UPSERT:
            where = Stage.DELETE  # the store's errors name the write; this one was a delete
        self.outcome = Outcome.DEAD
        self.dead_letter = DeadLetter(
            message=self.message,
            stage=where,
            reason=reason or error.reason,
            error=error,
            attempts=max(1, self.attempts),
            first_failed_at=datetime.now(UTC),
        )

    def skip(self, reason: str) -> None:
        self.outcome = Outcome.SKIPPED
        self.skip_reason = reason


@dataclass(eq=False)
class Batch:
    """One micro-batch: its items (each with its outcome) and what the stages hand on."""

    number: int
    items: list[Item]
    # Set by the caller to abandon the batch; read by the stages and their retries.
    cancelled: threading.Event = field(default_factory=threading.Event)
    to_embed: list[Item] = field(default_factory=list)
    model_input: npt.NDArray[Any] | None = None
    vectors: npt.NDArray[np.float32] | None = None
    # The items of ``to_embed`` whose collection has regions, and their regions' model input.
    region_items: list[Item] = field(default_factory=list)
    region_input: RegionBatch | None = None


class BatchProcessor:
    """Prepare, embed and store micro-batches (see the module docstring).

    The stages of different batches may run at once on different threads, with one thread per
    stage: batches are prepared, and written, in the order they were made (the version guard
    relies on it). Owns its decoding thread pool: :meth:`close` it.
    """

    def __init__(
        self,
        *,
        fetcher: Fetcher,
        preprocessor: Preprocessor,
        embedder: Embedder,
        store: Store,
        ownership: Ownership,
        decode_short_side: int | None = None,
        fetch_settings: FetchSettings,
        retry_settings: RetrySettings,
        model_version: str,
        default_collection: str,
        metrics: WorkerMetrics,
        version_cache_size: int = 50_000,
        should_stop: Callable[[], bool] = lambda: False,
        event_limits: EventLimits = DEFAULT_EVENT_LIMITS,
        collection_model_tag: Callable[[str], str] | None = None,
        router: Router | None = None,
        collection_regions: Callable[[str], bool] | None = None,
        regions: RegionEmbedding | None = None,
    ) -> None:
        """``collection_regions``: whether a collection was made with region vectors (read once
        per collection; None: none is); ``regions``: how this worker makes them (None: it
        cannot, and dead-letters the ingest events of such collections)."""
        self._fetcher = fetcher
        self._preprocessor = preprocessor
        # JPEGs are draft-decoded no smaller than the model's preprocessing needs.
        self._decode_short_side = decode_short_side
        self._embedder = embedder
        self._store = store
        self._ownership = ownership
        self._versions = VersionGuard(ownership, cache_size=version_cache_size)
        self._fetch_settings = fetch_settings
        self._retry = retry_settings
        self._model_version = model_version
        # The model tag each collection is bound to ("" when none was recorded): rows are
        # written only into collections of this worker's model. Read once per collection (a
        # collection's model never changes); None: the collections are not checked.
        self._collection_model_tag = collection_model_tag
        self._bound_tags: dict[str, str] = {}
        # Where each named collection's rows go (None: the collection named).
        self._router = router
        # Which collections hold region vectors: read once per collection, as the model tags
        # (chosen at creation, never changed).
        self._collection_regions = collection_regions
        self._with_regions: dict[str, bool] = {}
        self._regions = regions
        self._default_collection = default_collection
        self._metrics = metrics
        metrics.versions_remembered.set_function(self._versions.remembered_count)
        self._should_stop = should_stop
        # The producer's limits: what it accepted, the worker accepts too.
        self._event_limits = event_limits
        self._numbers = itertools.count(1)
        self._write_lock = threading.Lock()
        self._decoders = ThreadPoolExecutor(
            max_workers=max(1, fetch_settings.concurrency), thread_name_prefix="decode"
        )

    def close(self) -> None:
        self._decoders.shutdown(wait=True, cancel_futures=True)

    def batch(self, records: Sequence[tuple[Message, Owner]]) -> Batch:
        """A new batch of consumed records, each with the assignment it was consumed in."""
        items = [Item(m, owner, attempts=_attempts_so_far(m)) for m, owner in records]
        return Batch(next(self._numbers), items)

    # The three stages -----------------------------------------------------------------------

    def prepare(self, batch: Batch) -> None:
        """Decode, screen, fetch, skip or reuse, decode images, preprocess (regions too).

        Raises:
            StoreUnavailableError: Milvus stayed unavailable through the version lookup's
                retries. Nothing of this batch may be committed; the caller rewinds and pauses.
            BatchAbandonedError: the batch was cancelled.
        """
        self._check(batch)
        items = batch.items
        with self._timed(Step.DECODE_EVENT):
            self._decode_events(items)
        self._drop_revoked(items)
        with self._timed(Step.VERSION_LOOKUP):
            self._route(batch)
            self._screen(batch)
        with self._timed(Step.FETCH):
            self._fetch(batch)
        self._skip_unchanged(batch)
        with self._timed(Step.DECODE_IMAGE):
            self._decode_images(items)
        batch.to_embed = [
            item for item in items if item.pending and item.ingest and item.reuse_vector is None
        ]
        if batch.to_embed:
            with self._timed(Step.PREPROCESS):
                batch.model_input = self._preprocessor.preprocess(
                    [item.pixels for item in batch.to_embed if item.pixels is not None]
                )
            self._preprocess_regions(batch)
            for item in batch.to_embed:
                item.pixels = None  # the model input holds them now

    def embed(self, batch: Batch) -> None:
        """Run the model on the prepared batch (nothing to do if everything was skipped), then
        the region model on its regions, in chunks, with the same retries and cancel checks.

        Raises:
            InferenceUnavailableError: Triton stayed unavailable through the retries.
            ConfigurationError: Triton refused the request as invalid for its model, or for the
                region model (e.g. it does not serve it: the message says how to serve it); the
                deployment does not match the settings, no record is to blame.
            BatchAbandonedError: the batch was cancelled.
        """
        self._check(batch)
        model_input = batch.model_input
        if model_input is None:
            return
        with self._timed(Step.EMBED):
            batch.vectors = self._with_retries(
                lambda: self._embedder.embed(model_input), Step.EMBED, "inference", batch
            )
        batch.model_input = None
        if batch.region_input is not None:
            with self._timed(Step.EMBED_REGIONS):
                self._embed_regions(batch, batch.region_input)
            batch.region_input = None

    def store(self, batch: Batch) -> None:
        """Validate and upsert the rows, and apply the deletes; rows and deletes the store
        refuses are dead-lettered alone.

        Raises:
            StoreUnavailableError: Milvus stayed unavailable through the retries.
            BatchAbandonedError: the batch was cancelled.
        """
        self._check(batch)
        with self._timed(Step.UPSERT):
            self._upsert(batch)
        if any(item.pending and item.is_delete for item in batch.items):
            with self._timed(Step.DELETE):
                self._delete(batch)

    def release(self, batch: Batch) -> None:
        """The batch left the pipeline, whatever became of it: its claimed versions lapse."""
        self._versions.release(batch.number)

    def fence(self) -> None:
        """Return once no write is in progress. Every later write checks, under the same lock,
        that its partitions are still owned: after a revoke, call this before letting go, so no
        write for those partitions can land after the new owner's."""
        with self._write_lock:
            pass

    # Stages -------------------------------------------------------------------------------

    def _decode_events(self, items: list[Item]) -> None:
        for item in items:
            try:
                # The contract's limits are at most the store's field sizes, so an id the store
                # cannot hold fails here, before it is looked up or fetched.
                item.event = self._decode(item.message)
            except ContractError as exc:
                item.fail(InvalidEventError(str(exc), reason=exc.reason), Stage.DECODE_EVENT)
        # Several versions of one id in a batch (upserts and deletes alike): only the newest
        # needs work; of equal versions, the later record.
        newest: dict[tuple[str, str], Item] = {}
        for item in items:
            if item.event is None or not item.pending:
                continue
            key = (self._collection(item), item.event.id)
            current = newest.get(key)
            if (
                current is None
                or current.event is None
                or item.event.version >= current.event.version
            ):
                if current is not None:
                    self._supersede(current)
                newest[key] = item
            else:
                self._supersede(item)

    def _decode(self, message: Message) -> IngestEvent | DeleteEvent:
        """The record's event: a tombstone (a null value) is a delete of the id in its key.

        Raises:
            ContractError: the record breaks its contract (the message says how).
        """
        value = message.value()
        if value is not None:
            return decode_event(value, self._event_limits)
        kind, timestamp_ms = message.timestamp()
        return decode_delete(
            message.key(),
            _header_pairs(message),
            timestamp_ms=timestamp_ms if kind != TIMESTAMP_NOT_AVAILABLE else None,
            limits=self._event_limits,
        )

    def _supersede(self, item: Item) -> None:
        item.skip("superseded")
        if item.is_delete:
            self._metrics.deletes.labels("superseded").inc()

    def _drop_revoked(self, items: list[Item]) -> None:
        # Records of a partition given up since they were consumed belong to its new owner.
        for item in items:
            if item.pending and not self._ownership.owns(item.owner):
                item.outcome = Outcome.UNFINISHED

    def _route(self, batch: Batch) -> None:
        """Give each pending item the collection its rows go into, or skip it (``worker.routing``).

        A collection that cannot be looked up is left as named: the screen dead-letters its
        items (``unknown_collection``).

        Raises:
            StoreUnavailableError: Milvus stayed unavailable through the retries.
        """
        if self._router is None:
            return
        router = self._router
        for named, group in self._by_collection(batch.items).items():
            try:
                route = self._with_retries(
                    functools.partial(router.route, named), Step.VERSION_LOOKUP, "routing", batch
                )
            except _UNUSABLE_COLLECTION:
                continue
            for item in group:
                if route.collection is None:
                    item.skip(route.skip)
                else:
                    item.collection = route.collection

    def _screen(self, batch: Batch) -> None:
        """The stale-version guard, before any download: an older event than what is stored or
        in flight is skipped (``stale_version``) and never fetched.

        Collections are created on purpose: the items of one that does not exist are
        dead-lettered (``unknown_collection``), never written, and so are those of one made
        elsewhere without a vector index (``no_vector_index``). The ingest events of a
        collection bound to another model than the worker's are dead-lettered too
        (``collection_model_mismatch``): its vectors are never mixed with another model's. The
        ingest events of a collection with regions are marked to get them (or, when this
        worker cannot make them, dead-lettered).
        """
        for collection, named in self._by_collection(batch.items).items():
            try:
                self._refuse_other_models(collection, named, batch)
                self._mark_regions(collection, named, batch)
            except _UNUSABLE_COLLECTION as exc:
                for item in named:
                    item.fail(exc, Stage.UPSERT)
                continue
            group = [item for item in named if item.pending]
            if not group:
                continue
            candidates = [
                Candidate(item.event.id, item.event.version, item.owner)
                for item in group
                if item.event
            ]
            try:
                known = self._versions.screen(
                    batch.number, collection, candidates, self._version_reader(collection, batch)
                )
            except _UNUSABLE_COLLECTION as exc:
                for item in group:
                    item.fail(exc, Stage.UPSERT)
                continue
            for item in group:
                assert item.event is not None
                item.known = known[item.event.id]
                if item.known.stale(item.event.version):
                    item.skip("stale_version")
                    if item.is_delete:
                        self._metrics.deletes.labels("stale").inc()

    def _refuse_other_models(self, collection: str, group: list[Item], batch: Batch) -> None:
        """Dead-letter the ingest events of ``group`` when ``collection`` is bound to a model of
        another tag than this worker's; deletes (no vectors) go on.

        Raises:
            UnknownCollectionError, CollectionConflictError: the collection cannot be described.
            StoreUnavailableError: Milvus stayed unavailable through the retries.
        """
        if self._collection_model_tag is None or not any(item.ingest for item in group):
            return
        tag = self._read_once(
            self._bound_tags, collection, self._collection_model_tag, "collection model", batch
        )
        if not tag or tag == self._model_version:
            return
        error = CollectionConflictError(
            f"collection {collection!r} is bound to model tag {tag!r}, and this worker embeds "
            f"with model tag {self._model_version!r}: its vectors would be mixed with another "
            "model's, so nothing was written; run a worker serving the collection's model "
            "(triton.model_name), then replay this dead letter",
            reason=Reason.COLLECTION_MODEL_MISMATCH,
            stage=Stage.UPSERT,
        )
        for item in group:
            if item.ingest:
                item.fail(error, Stage.UPSERT)

    def _read_once(
        self,
        known: dict[str, R],
        collection: str,
        read: Callable[[str], R],
        what: str,
        batch: Batch,
    ) -> R:
        """``known[collection]``, read (with retries) the first time: what a collection was
        created with never changes."""
        if collection not in known:
            known[collection] = self._with_retries(
                functools.partial(read, collection), Step.VERSION_LOOKUP, what, batch
            )
        return known[collection]

    def _mark_regions(self, collection: str, group: list[Item], batch: Batch) -> None:
        """Mark the ingest events of ``group`` for regions when ``collection`` has them; when
        this worker cannot make them, dead-letter those events instead.

        Raises:
            UnknownCollectionError, CollectionConflictError: the collection cannot be described.
            StoreUnavailableError: Milvus stayed unavailable through the retries.
        """
        ingests = [item for item in group if item.pending and item.ingest]
        if self._collection_regions is None or not ingests:
            return
        has = self._read_once(
            self._with_regions, collection, self._collection_regions, "collection regions", batch
        )
        if not has:
            return
        for item in ingests:
            if self._regions is None:
                item.fail(_cannot_make_regions(collection), Stage.EMBED)
            else:
                item.regions = True

    def _short_side_of(self, item: Item) -> int | None:
        """The shorter side to decode ``item``'s image at: its regions' need, when it has them
        and it is more than the model's."""
        if not item.regions or self._regions is None:
            return self._decode_short_side
        return max(self._decode_short_side or 0, self._regions.decode_short_side)

    def _preprocess_regions(self, batch: Batch) -> None:
        """Crop and preprocess the regions of the items of ``to_embed`` that have them."""
        batch.region_items = [
            item for item in batch.to_embed if item.regions and item.pixels is not None
        ]
        if not batch.region_items or self._regions is None:
            return
        with self._timed(Step.PREPROCESS_REGIONS):
            batch.region_input = self._regions.pixels.preprocess(
                [item.pixels for item in batch.region_items if item.pixels is not None]
            )

    def _embed_regions(self, batch: Batch, regions: RegionBatch) -> None:
        """Embed the regions ``chunk_rows`` at a time (each chunk retried as the global batch
        is, the cancel checked between chunks) and hand each item its rows.

        Raises:
            InferenceUnavailableError: Triton stayed unavailable through the retries.
            InferenceConfigurationError: Triton refused the region model's request (it does
                not serve it: the message says how to).
            BatchAbandonedError: the batch was cancelled.
        """
        embedding = self._regions
        assert embedding is not None  # region input is made only with it
        parts = []
        for start in range(0, len(regions), embedding.chunk_rows):
            self._check(batch)
            chunk = regions.pixels[start : start + embedding.chunk_rows]
            parts.append(
                self._with_retries(
                    functools.partial(embedding.embed, chunk),
                    Step.EMBED_REGIONS,
                    "region inference",
                    batch,
                )
            )
        vectors = np.concatenate(parts) if parts else np.zeros((0, 0), dtype=np.float32)
        for index, item in enumerate(batch.region_items):
            rows = np.flatnonzero(regions.items == index)
            item.region_vectors = vectors[rows]
            item.region_boxes = tuple(regions.boxes[row] for row in rows)

    def _regions_of(self, item: Item, event: IngestEvent) -> ItemRegions | None:
        """The item's regions for its record (None: its collection has none)."""
        if item.region_vectors is None:
            return None
        return ItemRegions(event.id, event.version, item.region_boxes, item.region_vectors)

    def _version_reader(
        self, collection: str, batch: Batch
    ) -> Callable[[list[str], Consistency], dict[str, StoredVersion]]:
        def read(ids: list[str], consistency: Consistency) -> dict[str, StoredVersion]:
            self._metrics.version_reads.labels(consistency).inc()
            return self._with_retries(
                functools.partial(
                    self._store.stored_versions, ids, collection, consistency=consistency
                ),
                Step.VERSION_LOOKUP,
                "version lookup",
                batch,
            )

        return read

    def _fetch(self, batch: Batch) -> None:
        """Fetch every pending item's bytes; retry the transient failures, item by item.

        An image host failing is this record's problem, not an outage: after the attempts this
        pass allows, the record is re-queued, or dead-lettered once ``retry.record_attempts``
        (counted across deliveries) are used up. Either way its partition moves on. The rounds
        back off as every retry of the worker does (``worker.retry``); a stop or a cancel ends the
        backoff at once, leaving what was still to fetch ``UNFINISHED``.
        """
        waiting = [item for item in batch.items if item.pending and item.ingest]
        if not waiting:
            return  # nothing to fetch (all skipped, or deletes only)
        # This pass may spend ``retry.attempts`` of each record's ``retry.record_attempts``.
        pass_ends = {
            item: min(item.attempts + self._retry.attempts, self._retry.record_attempts)
            for item in waiting
        }

        def fetch_round() -> list[Item]:
            nonlocal waiting
            waiting = self._fetch_round(waiting, pass_ends, batch)
            return waiting

        retry_rounds(
            fetch_round,
            self._retry,
            should_stop=lambda: self._stopping(batch),
            wake=batch.cancelled,
        )

    def _fetch_round(
        self, waiting: list[Item], pass_ends: dict[Item, int], batch: Batch
    ) -> list[Item]:
        """Fetch the waiting items once; return those to fetch again after a backoff."""
        if self._stopping(batch):
            for item in waiting:
                item.outcome = Outcome.UNFINISHED
            return []
        results = self._fetcher.fetch_many([item.ingest.image for item in waiting if item.ingest])
        transient: list[tuple[Item, FetchUnavailableError]] = []
        for item, fetched in zip(waiting, results, strict=True):
            if isinstance(fetched, bytes):
                item.data = fetched
                item.content_sha256 = hashlib.sha256(fetched).hexdigest()
            elif isinstance(fetched, PermanentError):
                item.fail(fetched, Stage.FETCH)
            elif isinstance(fetched, FetchUnavailableError):
                item.attempts += 1
                transient.append((item, fetched))
                self._metrics.retries.labels(Step.FETCH, fetched.reason).inc()
            else:
                raise fetched
        return self._fetch_again(transient, pass_ends, batch)

    def _fetch_again(
        self,
        transient: list[tuple[Item, FetchUnavailableError]],
        pass_ends: dict[Item, int],
        batch: Batch,
    ) -> list[Item]:
        """Which transiently failed items to fetch again (after a backoff); settle the rest."""
        again: list[Item] = []
        for item, error in transient:
            if self._stopping(batch):
                item.outcome = Outcome.UNFINISHED
            elif item.attempts >= self._retry.record_attempts:
                item.fail(error, Stage.FETCH, reason=Reason.RETRIES_EXHAUSTED)
            elif item.attempts >= pass_ends[item]:
                # This pass's share of attempts is spent: try again later, from the topic.
                item.outcome = Outcome.REQUEUE
                item.requeue_reason = error.reason
            else:
                again.append(item)
        return again

    def _skip_unchanged(self, batch: Batch) -> None:
        """Inference skip, against the versions the guard found: the same image and model as
        stored, at the same version, needs nothing; at a newer version, its stored vector (in a
        collection with regions: nothing, it is embedded again, regions included). A
        tombstone has neither: an upsert after a delete is always written."""
        for collection, group in self._by_collection(batch.items).items():
            reusable: list[Item] = []
            for item in group:
                stored = item.known.stored if item.known else None
                event = item.ingest
                if stored is None or stored.deleted or event is None:
                    continue
                if (
                    stored.content_sha256 == item.content_sha256
                    and stored.model_version == self._model_version
                ):
                    if stored.event_version == event.version:
                        item.skip("unchanged")  # its regions were written before its row
                    elif not item.regions:
                        reusable.append(item)
            if reusable:
                with self._timed(Step.VECTOR_LOOKUP):
                    self._reuse_stored_vectors(collection, reusable, batch)

    def _reuse_stored_vectors(self, collection: str, items: list[Item], batch: Batch) -> None:
        # Same image, same model, newer event: keep the vector, write the new metadata/version.
        rows = self._with_retries(
            lambda: self._store.get(
                [i.event.id for i in items if i.event], collection, with_vectors=True
            ),
            Step.VECTOR_LOOKUP,
            "vector lookup",
            batch,
        )
        # This read is not strongly consistent: a row of an older image may still be served
        # for a moment after a newer one was written. Only the very image's vector is reused;
        # otherwise the item is simply embedded.
        vectors = {
            str(row["id"]): row["embedding"]
            for row in rows
            if row.get("model_version") == self._model_version
        }
        hashes = {str(row["id"]): row.get("content_sha256") for row in rows}
        for item in items:
            assert item.event is not None
            if item.event.id in vectors and hashes[item.event.id] == item.content_sha256:
                item.reuse_vector = np.asarray(vectors[item.event.id], dtype=np.float32)

    def _decode_images(self, items: list[Item]) -> None:
        # Pillow releases the GIL while decoding, so threads use every core.
        todo = [i for i in items if i.pending and i.reuse_vector is None and i.data is not None]
        list(self._decoders.map(self._decode_one, todo))
        for item in items:
            item.data = None  # the bytes are no longer needed; free them early

    def _decode_one(self, item: Item) -> None:
        assert item.data is not None
        try:
            item.pixels = decode_image(
                item.data,
                max_pixels=self._fetch_settings.max_pixels,
                target_short_side=self._short_side_of(item),
            ).pixels
        except ImageDecodeError as exc:
            item.fail(exc, Stage.DECODE_IMAGE)

    def _upsert(self, batch: Batch) -> None:
        vectors: dict[Item, npt.NDArray[np.float32]] = {}
        if batch.vectors is not None:
            vectors = dict(zip(batch.to_embed, batch.vectors, strict=True))
        now_ms = int(time.time() * 1000)
        by_collection: dict[str, list[tuple[Item, VectorRecord]]] = {}
        for collection, group in self._by_collection(batch.items).items():
            for item in group:
                vector = item.reuse_vector if item.reuse_vector is not None else vectors.get(item)
                event = item.ingest
                if vector is None or event is None:
                    continue
                if item.regions and item.region_vectors is None:
                    # Never a row without its regions (prepare gives every such item some).
                    item.fail(_cannot_make_regions(collection), Stage.EMBED)
                    continue
                record = VectorRecord(
                    id=event.id,
                    vector=vector,
                    metadata=event.metadata,
                    source=event.source(),
                    content_sha256=item.content_sha256,
                    model_version=self._model_version,
                    event_version=event.version,
                    ingested_at_ms=now_ms,
                    regions=self._regions_of(item, event),
                )
                if self._valid(item, record, collection, batch):
                    by_collection.setdefault(collection, []).append((item, record))
        for collection, pairs in by_collection.items():
            self._write(collection, pairs, batch, self._upserts)

    def _delete(self, batch: Batch) -> None:
        for collection, group in self._by_collection(batch.items).items():
            pairs = [
                (item, (item.event.id, item.event.version))
                for item in group
                if isinstance(item.event, DeleteEvent)
            ]
            if pairs:
                self._write(collection, pairs, batch, self._deletes)

    def _valid(self, item: Item, record: VectorRecord, collection: str, batch: Batch) -> bool:
        try:
            self._with_retries(
                functools.partial(self._store.validate, record, collection),
                Step.UPSERT,
                "row validation",
                batch,
            )
        except (InvalidRowError, *_UNUSABLE_COLLECTION) as exc:
            item.fail(exc, Stage.UPSERT)
            return False
        return True

    def _write(
        self, collection: str, pairs: list[tuple[Item, W]], batch: Batch, writes: _Writes[W]
    ) -> None:
        """Write the rows (or deletes); when the server refuses the request for a row's value,
        bisect the batch until the refused rows stand alone, dead-letter them and write the
        rest."""
        try:
            written = self._with_retries(
                functools.partial(self._write_owned, collection, pairs, batch, writes),
                writes.step,
                writes.what,
                batch,
            )
        except (InvalidRowError, *_UNUSABLE_COLLECTION) as exc:
            if len(pairs) == 1 or isinstance(exc, _UNUSABLE_COLLECTION):
                for item, _ in pairs:
                    item.fail(exc, Stage.UPSERT)
                return
            middle = len(pairs) // 2
            self._write(collection, pairs[:middle], batch, writes)
            self._write(collection, pairs[middle:], batch, writes)
            return
        for item, _ in written:
            item.outcome = writes.outcome
        writes.count(len(written))

    def _write_owned(
        self, collection: str, pairs: list[tuple[Item, W]], batch: Batch, writes: _Writes[W]
    ) -> list[tuple[Item, W]]:
        """One attempt: write the rows whose partitions are still owned, under the write lock
        (see :meth:`fence`), and remember them; the others are left ``UNFINISHED``."""
        with self._write_lock:
            self._check(batch)
            owned = []
            for item, write in pairs:
                if self._ownership.owns(item.owner):
                    owned.append((item, write))
                else:
                    item.outcome = Outcome.UNFINISHED
            if not owned:
                return owned
            began = time.monotonic()
            writes.send([write for _, write in owned], collection)
            self._versions.wrote(
                collection,
                began,
                [(*writes.fact(write), item.owner) for item, write in owned],
            )
            return owned

    @functools.cached_property
    def _upserts(self) -> _Writes[VectorRecord]:
        return _Writes(
            what="upsert",
            step=Step.UPSERT,
            send=self._store.upsert,
            fact=lambda record: (
                record.id,
                StoredVersion(record.event_version, record.content_sha256, record.model_version),
            ),
            outcome=Outcome.STORED,
            count=self._metrics.upserted.inc,
        )

    @functools.cached_property
    def _deletes(self) -> _Writes[tuple[str, int]]:
        return _Writes(
            what="delete",
            step=Step.DELETE,
            send=self._store.delete,
            fact=lambda delete: (delete[0], StoredVersion.tombstone(delete[1])),
            outcome=Outcome.DELETED,
            count=self._metrics.deletes.labels("applied").inc,
        )

    # Helpers ------------------------------------------------------------------------------

    def _check(self, batch: Batch) -> None:
        if batch.cancelled.is_set():
            raise BatchAbandonedError(f"batch {batch.number} was cancelled")

    def _stopping(self, batch: Batch) -> bool:
        return self._should_stop() or batch.cancelled.is_set()

    def _collection(self, item: Item) -> str:
        if item.collection:
            return item.collection
        return (item.event.collection if item.event else None) or self._default_collection

    def _by_collection(self, items: list[Item]) -> dict[str, list[Item]]:
        groups: dict[str, list[Item]] = {}
        for item in items:
            if item.pending and item.event is not None:
                groups.setdefault(self._collection(item), []).append(item)
        return groups

    def _with_retries(self, fn: Callable[[], T], step: Step, what: str, batch: Batch) -> T:
        return call_with_retries(
            fn,
            self._retry,
            what=what,
            should_stop=lambda: self._stopping(batch),
            on_retry=lambda exc: self._metrics.retries.labels(step, exc.reason).inc(),
            wake=batch.cancelled,
        )

    def _timed(self, step: Step) -> Any:
        return self._metrics.step_seconds.labels(step).time()


@dataclass(frozen=True, slots=True)
class _Writes(Generic[W]):
    """One kind of write of the store stage (upserts of ``VectorRecord``, deletes of ``(id,
    version)``): how to send it, what the version guard remembers of it, what it counts as."""

    what: str
    step: Step
    send: Callable[[list[W], str], object]
    fact: Callable[[W], tuple[str, StoredVersion]]
    outcome: Outcome
    count: Callable[[int], None]


def _header_pairs(message: Message) -> list[tuple[str, bytes | str | None]]:
    headers = message.headers() or []
    return list(headers.items()) if isinstance(headers, dict) else list(headers)


def _attempts_so_far(message: Message) -> int:
    """The attempts an earlier delivery recorded in the retry header (0 for a fresh record)."""
    for key, value in _header_pairs(message):
        if key == HEADER_RETRY_ATTEMPTS and value is not None:
            try:
                return max(0, int(value))
            except ValueError:
                return 0
    return 0


def _cannot_make_regions(collection: str) -> ConfigurationError:
    return ConfigurationError(
        f"collection {collection!r} holds region vectors, and this worker cannot make them (its "
        "model has no region recipe, or preprocess.class is set), so nothing was written: run "
        "a worker of the collection's model with the built-in preprocessing, then replay this "
        "dead letter",
        reason=Reason.COLLECTION_MODEL_MISMATCH,
        stage=Stage.EMBED,
    )
