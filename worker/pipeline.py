"""Process one micro-batch of consumed records: everything between fetching and committing.

:class:`BatchProcessor` turns records into durable effects and reports, for each record, one
outcome: stored, skipped (nothing to write), dead-lettered (with the reason), or unfinished
(a dependency stayed unavailable; the record must be consumed again). It never commits and
never talks to Kafka: the consumer loop owns offsets and the dead-letter producer.
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
    InvalidEventError,
    PermanentError,
    RetriableError,
    Stage,
    TridentError,
    UnknownCollectionError,
)
from engine.images import ImageDecodeError, decode_image
from engine.settings import FetchSettings, RetrySettings
from engine.store import StoredVersion, VectorRecord
from schemas import ContractError, IngestEvent, decode_event
from schemas.events import ImageRef
from worker.dead_letter import DeadLetter
from worker.metrics import WorkerMetrics
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
    def upsert(self, records: Sequence[VectorRecord], collection: str | None = None) -> int: ...
    def get(
        self, ids: Sequence[str], collection: str | None = None, *, with_vectors: bool = False
    ) -> list[dict[str, object]]: ...


class Outcome(StrEnum):
    PENDING = "pending"
    STORED = "stored"
    SKIPPED = "skipped"
    DEAD = "dead_lettered"
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
    outcome: Outcome = Outcome.PENDING
    skip_reason: str = ""
    dead_letter: DeadLetter | None = None

    @property
    def pending(self) -> bool:
        return self.outcome is Outcome.PENDING

    def fail(self, error: PermanentError, stage: Stage) -> None:
        self.outcome = Outcome.DEAD
        self.dead_letter = DeadLetter(
            message=self.message,
            stage=error.stage or stage,
            reason=error.reason,
            error=error,
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
    """Decode, fetch, preprocess, embed and upsert one micro-batch (see the module docstring)."""

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
        self._decoders = ThreadPoolExecutor(
            max_workers=max(1, fetch_settings.concurrency), thread_name_prefix="decode"
        )

    def process(self, messages: Sequence[Message]) -> BatchResult:
        """Run every stage; return each record's outcome.

        Raises:
            RetriableError: Triton or Milvus stayed unavailable through the retries. Nothing of
                this batch may be committed; the caller rewinds and pauses.
        """
        result = BatchResult([Item(message) for message in messages])
        with self._timed(Stage.DECODE_EVENT):
            self._decode_events(result.items)
        with self._timed(Stage.FETCH):
            self._fetch(result.items)
            self._skip_unchanged(result.items)
        with self._timed(Stage.DECODE_IMAGE):
            self._decode_images(result.items)
        to_embed = [item for item in result.items if item.pending and item.reuse_vector is None]
        vectors = self._embed(to_embed)
        with self._timed(Stage.UPSERT):
            self._upsert(result.items, dict(zip(to_embed, vectors, strict=True)))
        return result

    # Stages -------------------------------------------------------------------------------

    def _decode_events(self, items: list[Item]) -> None:
        for item in items:
            try:
                item.event = decode_event(item.message.value())
            except ContractError as exc:
                item.fail(InvalidEventError(str(exc), reason=exc.reason), Stage.DECODE_EVENT)
        # Several versions of one id in a batch: only the newest needs work.
        newest: dict[tuple[str, str], Item] = {}
        for item in items:
            if item.event is None:
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
        """Fetch every pending item's bytes; retry the transient failures, item by item."""
        waiting = [item for item in items if item.pending]
        attempt = 1
        while waiting:
            results = self._fetcher.fetch_many([item.event.image for item in waiting if item.event])
            transient: list[Item] = []
            for item, fetched in zip(waiting, results, strict=True):
                if isinstance(fetched, bytes):
                    item.data = fetched
                    item.content_sha256 = hashlib.sha256(fetched).hexdigest()
                elif isinstance(fetched, PermanentError):
                    item.fail(fetched, Stage.FETCH)
                elif isinstance(fetched, RetriableError):
                    transient.append(item)
                    self._metrics.retries.labels(Stage.FETCH.value, fetched.reason).inc()
                else:
                    raise fetched
            if not transient:
                return
            if attempt >= self._retry.attempts or self._should_stop():
                for item in transient:
                    item.outcome = Outcome.UNFINISHED
                logger.warning(
                    "%d images still unreachable after %d attempts", len(transient), attempt
                )
                return
            time.sleep(
                min(self._retry.initial_backoff_s * 2 ** (attempt - 1), self._retry.max_backoff_s)
            )
            attempt += 1
            waiting = transient

    def _skip_unchanged(self, items: list[Item]) -> None:
        """Stale-version guard and inference skip, against what is already stored."""
        by_collection: dict[str, list[Item]] = {}
        for item in items:
            if item.pending:
                by_collection.setdefault(self._collection(item), []).append(item)
        for collection, group in by_collection.items():
            ids = [item.event.id for item in group if item.event]
            try:
                stored = self._with_retries(
                    functools.partial(self._store.stored_versions, ids, collection),
                    Stage.UPSERT,
                    "version lookup",
                )
            except UnknownCollectionError as exc:
                # Collections are created on purpose; an event cannot conjure one up.
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
            Stage.UPSERT,
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
        with self._timed(Stage.PREPROCESS):
            batch = self._preprocessor.preprocess(
                [item.pixels for item in items if item.pixels is not None]
            )
        with self._timed(Stage.EMBED):
            return self._with_retries(lambda: self._embedder.embed(batch), Stage.EMBED, "inference")

    def _upsert(self, items: list[Item], vectors: dict[Item, npt.NDArray[np.float32]]) -> None:
        now_ms = int(time.time() * 1000)
        by_collection: dict[str, list[tuple[Item, VectorRecord]]] = {}
        for item in items:
            vector = item.reuse_vector if item.reuse_vector is not None else vectors.get(item)
            if not item.pending or vector is None or item.event is None:
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
            by_collection.setdefault(self._collection(item), []).append((item, record))
        for collection, pairs in by_collection.items():
            records = [record for _, record in pairs]
            self._with_retries(
                functools.partial(self._store.upsert, records, collection), Stage.UPSERT, "upsert"
            )
            for item, _ in pairs:
                item.outcome = Outcome.STORED
            self._metrics.upserted.inc(len(pairs))

    # Helpers ------------------------------------------------------------------------------

    def _collection(self, item: Item) -> str:
        return (item.event.collection if item.event else None) or self._default_collection

    def _with_retries(self, fn: Callable[[], T], stage: Stage, what: str) -> T:
        return call_with_retries(
            fn,
            self._retry,
            what=what,
            should_stop=self._should_stop,
            on_retry=lambda exc: self._metrics.retries.labels(stage.value, exc.reason).inc(),
        )

    def _timed(self, stage: Stage) -> Any:
        return self._metrics.stage_seconds.labels(stage.value).time()
