"""Process one micro-batch of consumed records: everything between fetching and committing.

:class:`BatchProcessor` turns records into durable effects and reports, for each record, one
outcome:

- ``STORED`` (upserted) or ``SKIPPED`` (nothing to write: superseded, stale, unchanged);
- ``DEAD`` (a permanent failure, or a per-record transient one past its retry budget): the
  caller dead-letters it with ``item.dead_letter``;
- ``REQUEUE`` (its image host failed transiently and the budget is not used up): the caller
  re-publishes it to its topic with ``item.attempts`` in the ``trident.retry.attempts`` header;
- ``UNFINISHED`` (a stop was requested mid-way): the record must be consumed again.

A dependency-wide outage (Triton or Milvus unavailable through the retries) raises instead: no
record of the batch has an outcome worth keeping. The processor never commits and never talks to
Kafka: the consumer loop owns offsets and the producer.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Protocol, TypeVar

import numpy as np
import numpy.typing as npt
from confluent_kafka import Message

from engine.errors import (
    FetchUnavailableError,
    InvalidEventError,
    InvalidRowError,
    PermanentError,
    Reason,
    Stage,
    TridentError,
    UnknownCollectionError,
)
from engine.images import ImageDecodeError, decode_image
from engine.settings import FetchSettings, RetrySettings
from engine.store import StoredVersion, VectorRecord
from schemas import DEFAULT_EVENT_LIMITS, ContractError, EventLimits, IngestEvent, decode_event
from schemas.dead_letter import HEADER_RETRY_ATTEMPTS
from schemas.events import ImageRef
from worker.dead_letter import DeadLetter
from worker.metrics import Step, WorkerMetrics
from worker.retry import call_with_retries

logger = logging.getLogger(__name__)

T = TypeVar("T")


class Fetcher(Protocol):
    def fetch_many(self, refs: Sequence[ImageRef]) -> list[bytes | TridentError]: ...


class Preprocessor(Protocol):
    def preprocess(self, images: Sequence[npt.NDArray[np.uint8]]) -> npt.NDArray[np.float32]: ...


class Embedder(Protocol):
    def embed(self, batch: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]: ...


class Store(Protocol):
    def stored_versions(
        self, ids: Sequence[str], collection: str | None = None
    ) -> dict[str, StoredVersion]: ...
    def validate(self, record: VectorRecord, collection: str | None = None) -> None: ...
    def upsert(self, records: Sequence[VectorRecord], collection: str | None = None) -> int: ...
    def get(
        self, ids: Sequence[str], collection: str | None = None, *, with_vectors: bool = False
    ) -> list[dict[str, object]]: ...


class Outcome(StrEnum):
    PENDING = "pending"
    STORED = "stored"
    SKIPPED = "skipped"
    DEAD = "dead_lettered"
    REQUEUE = "requeue"
    UNFINISHED = "unfinished"


@dataclass(eq=False)
class Item:
    """One consumed record on its way through the stages."""

    message: Message
    event: IngestEvent | None = None
    data: bytes | None = None
    content_sha256: str = ""
    pixels: npt.NDArray[np.uint8] | None = None
    reuse_vector: npt.NDArray[np.float32] | None = None
    # Attempts at this record's own transient failure so far, including earlier deliveries.
    attempts: int = 0
    outcome: Outcome = Outcome.PENDING
    skip_reason: str = ""
    requeue_reason: str = ""
    dead_letter: DeadLetter | None = None

    @property
    def pending(self) -> bool:
        return self.outcome is Outcome.PENDING

    def fail(self, error: TridentError, stage: Stage, *, reason: str | None = None) -> None:
        self.outcome = Outcome.DEAD
        self.dead_letter = DeadLetter(
            message=self.message,
            stage=error.stage or stage,
            reason=reason or error.reason,
            error=error,
            attempts=max(1, self.attempts),
            first_failed_at=datetime.now(UTC),
        )

    def skip(self, reason: str) -> None:
        self.outcome = Outcome.SKIPPED
        self.skip_reason = reason


@dataclass
class BatchResult:
    items: list[Item] = field(default_factory=list)

    def with_outcome(self, outcome: Outcome) -> list[Item]:
        return [item for item in self.items if item.outcome is outcome]


class BatchProcessor:
    """Decode, fetch, preprocess, embed and upsert one micro-batch (see the module docstring).

    Owns its decoding thread pool: :meth:`close` it.
    """

    def __init__(
        self,
        *,
        fetcher: Fetcher,
        preprocessor: Preprocessor,
        embedder: Embedder,
        store: Store,
        fetch_settings: FetchSettings,
        retry_settings: RetrySettings,
        model_version: str,
        default_collection: str,
        metrics: WorkerMetrics,
        should_stop: Callable[[], bool] = lambda: False,
        event_limits: EventLimits = DEFAULT_EVENT_LIMITS,
    ) -> None:
        self._fetcher = fetcher
        self._preprocessor = preprocessor
        self._embedder = embedder
        self._store = store
        self._fetch_settings = fetch_settings
        self._retry = retry_settings
        self._model_version = model_version
        self._default_collection = default_collection
        self._metrics = metrics
        self._should_stop = should_stop
        # The producer's limits: what it accepted, the worker accepts too.
        self._event_limits = event_limits
        self._decoders = ThreadPoolExecutor(
            max_workers=max(1, fetch_settings.concurrency), thread_name_prefix="decode"
        )

    def close(self) -> None:
        self._decoders.shutdown(wait=True, cancel_futures=True)

    def process(self, messages: Sequence[Message]) -> BatchResult:
        """Run every stage; return each record's outcome.

        Raises:
            RetriableError: Triton or Milvus stayed unavailable through the retries. Nothing of
                this batch may be committed; the caller rewinds and pauses.
            ConfigurationError: Triton refused the request as invalid for its model (the
                deployment does not match the settings; no record is to blame).
        """
        result = BatchResult(
            [Item(message, attempts=_attempts_so_far(message)) for message in messages]
        )
        with self._timed(Step.DECODE_EVENT):
            self._decode_events(result.items)
        with self._timed(Step.FETCH):
            self._fetch(result.items)
        with self._timed(Step.VERSION_LOOKUP):
            self._skip_unchanged(result.items)
        with self._timed(Step.DECODE_IMAGE):
            self._decode_images(result.items)
        to_embed = [item for item in result.items if item.pending and item.reuse_vector is None]
        vectors = self._embed(to_embed)
        with self._timed(Step.UPSERT):
            self._upsert(result.items, dict(zip(to_embed, vectors, strict=True)))
        return result

    # Stages -------------------------------------------------------------------------------

    def _decode_events(self, items: list[Item]) -> None:
        for item in items:
            try:
                # The contract's limits are at most the store's field sizes, so an id the store
                # cannot hold fails here, before it is looked up or fetched.
                item.event = decode_event(item.message.value(), self._event_limits)
            except ContractError as exc:
                item.fail(InvalidEventError(str(exc), reason=exc.reason), Stage.DECODE_EVENT)
        # Several versions of one id in a batch: only the newest needs work.
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
                    current.skip("superseded")
                newest[key] = item
            else:
                item.skip("superseded")

    def _fetch(self, items: list[Item]) -> None:
        """Fetch every pending item's bytes; retry the transient failures, item by item.

        An image host failing is this record's problem, not an outage: after the attempts this
        pass allows, the record is re-queued, or dead-lettered once ``retry.record_attempts``
        (counted across deliveries) are used up. Either way its partition moves on.
        """
        waiting = [item for item in items if item.pending]
        # This pass may spend ``retry.attempts`` of each record's ``retry.record_attempts``.
        pass_ends = {
            item: min(item.attempts + self._retry.attempts, self._retry.record_attempts)
            for item in waiting
        }
        while waiting:
            results = self._fetcher.fetch_many([item.event.image for item in waiting if item.event])
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
            waiting = self._fetch_again(transient, pass_ends)

    def _fetch_again(
        self, transient: list[tuple[Item, FetchUnavailableError]], pass_ends: dict[Item, int]
    ) -> list[Item]:
        """Which transiently failed items to fetch again now (after a backoff); settle the rest."""
        if not transient:
            return []
        again: list[Item] = []
        for item, error in transient:
            if self._should_stop():
                item.outcome = Outcome.UNFINISHED
            elif item.attempts >= self._retry.record_attempts:
                item.fail(error, Stage.FETCH, reason=Reason.RETRIES_EXHAUSTED)
            elif item.attempts >= pass_ends[item]:
                # This pass's share of attempts is spent: try again later, from the topic.
                item.outcome = Outcome.REQUEUE
                item.requeue_reason = error.reason
            else:
                again.append(item)
        if again:
            first = min(item.attempts for item in again)
            time.sleep(
                min(self._retry.initial_backoff_s * 2 ** (first - 1), self._retry.max_backoff_s)
            )
        return again

    def _skip_unchanged(self, items: list[Item]) -> None:
        """Stale-version guard and inference skip, against what is already stored.

        Collections are created on purpose: the items of one that does not exist are
        dead-lettered (``unknown_collection``), never written.
        """
        for collection, group in self._by_collection(items).items():
            ids = [item.event.id for item in group if item.event]
            try:
                stored = self._with_retries(
                    functools.partial(self._store.stored_versions, ids, collection),
                    Step.VERSION_LOOKUP,
                    "version lookup",
                )
            except UnknownCollectionError as exc:
                for item in group:
                    item.fail(exc, Stage.UPSERT)
                continue
            reusable: list[Item] = []
            for item in group:
                assert item.event is not None
                known = stored.get(item.event.id)
                if known is None:
                    continue
                if known.event_version > item.event.version:
                    item.skip("stale_version")
                elif (
                    known.content_sha256 == item.content_sha256
                    and known.model_version == self._model_version
                ):
                    if known.event_version == item.event.version:
                        item.skip("unchanged")
                    else:
                        reusable.append(item)
            if reusable:
                self._reuse_stored_vectors(collection, reusable)

    def _reuse_stored_vectors(self, collection: str, items: list[Item]) -> None:
        # Same image, same model, newer event: keep the vector, write the new metadata/version.
        rows = self._with_retries(
            lambda: self._store.get(
                [i.event.id for i in items if i.event], collection, with_vectors=True
            ),
            Step.VERSION_LOOKUP,
            "vector lookup",
        )
        vectors = {str(row["id"]): row["embedding"] for row in rows}
        for item in items:
            assert item.event is not None
            if item.event.id in vectors:
                item.reuse_vector = np.asarray(vectors[item.event.id], dtype=np.float32)

    def _decode_images(self, items: list[Item]) -> None:
        # Pillow releases the GIL while decoding, so threads use every core.
        todo = [i for i in items if i.pending and i.reuse_vector is None and i.data is not None]
        list(self._decoders.map(self._decode_one, todo))

    def _decode_one(self, item: Item) -> None:
        assert item.data is not None
        try:
            item.pixels = decode_image(item.data, max_pixels=self._fetch_settings.max_pixels).pixels
        except ImageDecodeError as exc:
            item.fail(exc, Stage.DECODE_IMAGE)
        finally:
            item.data = None  # the bytes are no longer needed; free them early

    def _embed(self, items: list[Item]) -> npt.NDArray[np.float32]:
        if not items:
            return np.zeros((0, 0), dtype=np.float32)
        with self._timed(Step.PREPROCESS):
            batch = self._preprocessor.preprocess(
                [item.pixels for item in items if item.pixels is not None]
            )
        with self._timed(Step.EMBED):
            return self._with_retries(lambda: self._embedder.embed(batch), Step.EMBED, "inference")

    def _upsert(self, items: list[Item], vectors: dict[Item, npt.NDArray[np.float32]]) -> None:
        now_ms = int(time.time() * 1000)
        by_collection: dict[str, list[tuple[Item, VectorRecord]]] = {}
        for collection, group in self._by_collection(items).items():
            for item in group:
                vector = item.reuse_vector if item.reuse_vector is not None else vectors.get(item)
                if vector is None or item.event is None:
                    continue
                record = VectorRecord(
                    id=item.event.id,
                    vector=vector,
                    metadata=item.event.metadata,
                    source=item.event.source(),
                    content_sha256=item.content_sha256,
                    model_version=self._model_version,
                    event_version=item.event.version,
                    ingested_at_ms=now_ms,
                )
                if self._valid(item, record, collection):
                    by_collection.setdefault(collection, []).append((item, record))
        for collection, pairs in by_collection.items():
            self._write(collection, pairs)

    def _valid(self, item: Item, record: VectorRecord, collection: str) -> bool:
        try:
            self._with_retries(
                functools.partial(self._store.validate, record, collection),
                Step.UPSERT,
                "row validation",
            )
        except (InvalidRowError, UnknownCollectionError) as exc:
            item.fail(exc, Stage.UPSERT)
            return False
        return True

    def _write(self, collection: str, pairs: list[tuple[Item, VectorRecord]]) -> None:
        """Upsert the rows; when the server refuses the request for a row's value, bisect the
        batch until the refused rows stand alone, dead-letter them and store the rest."""
        try:
            self._with_retries(
                functools.partial(self._store.upsert, [record for _, record in pairs], collection),
                Step.UPSERT,
                "upsert",
            )
        except (InvalidRowError, UnknownCollectionError) as exc:
            if len(pairs) == 1 or isinstance(exc, UnknownCollectionError):
                for item, _ in pairs:
                    item.fail(exc, Stage.UPSERT)
                return
            middle = len(pairs) // 2
            self._write(collection, pairs[:middle])
            self._write(collection, pairs[middle:])
            return
        for item, _ in pairs:
            item.outcome = Outcome.STORED
        self._metrics.upserted.inc(len(pairs))

    # Helpers ------------------------------------------------------------------------------

    def _collection(self, item: Item) -> str:
        return (item.event.collection if item.event else None) or self._default_collection

    def _by_collection(self, items: list[Item]) -> dict[str, list[Item]]:
        groups: dict[str, list[Item]] = {}
        for item in items:
            if item.pending and item.event is not None:
                groups.setdefault(self._collection(item), []).append(item)
        return groups

    def _with_retries(self, fn: Callable[[], T], step: Step, what: str) -> T:
        return call_with_retries(
            fn,
            self._retry,
            what=what,
            should_stop=self._should_stop,
            on_retry=lambda exc: self._metrics.retries.labels(step, exc.reason).inc(),
        )

    def _timed(self, step: Step) -> Any:
        return self._metrics.step_seconds.labels(step).time()


def _attempts_so_far(message: Message) -> int:
    """The attempts an earlier delivery recorded in the retry header (0 for a fresh record)."""
    headers = message.headers() or []
    pairs = headers.items() if isinstance(headers, dict) else headers
    for key, value in pairs:
        if key == HEADER_RETRY_ATTEMPTS and value is not None:
            try:
                return max(0, int(value))
            except ValueError:
                return 0
    return 0
