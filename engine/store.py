"""Milvus adapter: collections, upserts, lookups and similarity search.

Owns pymilvus's errors, classified by what was asked, never by who asked:

- connection failures, timeouts, "not ready" and rate limiting: :class:`StoreUnavailableError`
  (retriable) for every operation;
- a write refused for its values (code 1100 "exceeds max length", a type or dimension mismatch,
  any other invalid parameter, a value that cannot be packed): :class:`InvalidRowError`
  (permanent; the caller isolates the rows by bisecting the batch, see ``worker.pipeline``),
  after :meth:`VectorStore.validate` has already caught what can be checked before writing; any
  other refusal of a write is retriable;
- a search the server refuses (bad filter, wrong dimension): :class:`InvalidQueryError`;
- a collection that does not exist: :class:`UnknownCollectionError`;
- credentials the server refuses: :class:`ConfigurationError` (fix ``milvus.token``);
- any other refusal of a read or of collection management: retriable (nothing a record did).

The write path (:meth:`VectorStore.upsert`) does not go through pymilvus's rows API, whose
float-by-float packing of 1280-d vectors cost more CPU than the server's work: requests are
packed by columns (``engine.store_requests``, the same request on the wire) and sent on the
client's own gRPC stub, a large call in chunks with several in flight. That stub, its
``check_status`` and its per-collection write timestamps (what ``Session`` consistency reads
wait for) are pymilvus internals of the pinned 2.6 line; ``tests/integration/test_store_writes.py``
holds them to what the rows API does.
"""

from __future__ import annotations

import logging
import re
import threading
import time
import uuid
from collections import deque
from collections.abc import Sequence
from enum import Enum
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt
import orjson
from pymilvus import CollectionSchema, DataType, MilvusClient
from pymilvus.client import ts_utils
from pymilvus.client.utils import check_status
from pymilvus.exceptions import (
    DataNotMatchException,
    DataTypeNotMatchException,
    MilvusException,
    ParamError,
)

from engine.errors import (
    ConfigurationError,
    InvalidQueryError,
    InvalidRowError,
    Reason,
    Stage,
    StoreUnavailableError,
    TridentError,
    UnknownCollectionError,
)
from engine.indexes import IndexSpec
from engine.records import (
    RECORD_FIELDS,
    VECTOR_FIELD,
    CollectionInfo,
    Consistency,
    Hit,
    StoredVersion,
    VectorRecord,
)
from engine.settings import MilvusSettings
from engine.store_requests import pack_upsert
from schemas.events import ID_MAX_BYTES, SOURCE_MAX_BYTES
from schemas.events import METADATA_MAX_BYTES as SCHEMA_METADATA_MAX_BYTES
from schemas.search import COLLECTION_NAME_PATTERN

logger = logging.getLogger(__name__)

# Milvus counts VARCHAR max_length in UTF-8 bytes, not characters: both limits are in bytes. The
# event contract's ceilings are these sizes, so what a valid event holds always fits.
ID_MAX_LENGTH = ID_MAX_BYTES
SOURCE_MAX_LENGTH = SOURCE_MAX_BYTES
# Milvus's JSON field limit (common.JSONMaxLength), for the encoded metadata.
METADATA_MAX_BYTES = SCHEMA_METADATA_MAX_BYTES
MODEL_VERSION_MAX_BYTES = 128
# Upserts: rows per request and requests in flight per call. Chosen on the 2-core machine
# (docs/PERFORMANCE.md, "Write path"): past ~1,000 rows a request gains nothing, and a few in
# flight overlap the server's stages (proxy, log, data and query nodes) and the client's packing.
UPSERT_CHUNK_ROWS = 1_000
UPSERT_IN_FLIGHT = 4

_COLLECTION_NAME = re.compile(COLLECTION_NAME_PATTERN)

# Fragments of pymilvus/server messages that mean "try again later", not "you are wrong".
_TRANSIENT_MARKERS = (
    "unavailable",
    "not ready",
    "connect",
    "timeout",
    "timed out",
    "deadline",
    "rate limit",
    "ratelimit",
    "too many requests",
    "service not available",
    "server is closed",
    "node not found",
    "no available",
    "channel not ready",
    "collection not loaded",
    "not healthy",
    "abnormal",
)
# What says "this request's values are wrong", not "I am unwell": pymilvus's own checks of the
# data, the server's ErrParameterInvalid (code 1100: a VARCHAR over max_length, a wrong type or
# dimension...). Any other refusal of a write is taken as transient: misreading an outage as bad
# rows would dead-letter good records.
_INVALID_DATA_ERRORS = (ParamError, DataNotMatchException, DataTypeNotMatchException)
_INVALID_PARAMETER_CODE = 1100
_INVALID_ROW_MARKERS = ("invalid parameter", "exceeds max length", "mismatch")
# ... and ones that mean the collection is gone (dropped after our cache looked it up).
_MISSING_COLLECTION_MARKERS = ("collection not found", "can't find collection")


class _Operation(Enum):
    """What a call does, which decides what a refusal by the server means (module docstring)."""

    READ = "read"
    WRITE = "write"
    SEARCH = "search"
    ADMIN = "admin"


def _description_of(text: str) -> dict[str, str]:
    # Collections made elsewhere have a plain description; ours hold JSON (see _create).
    try:
        parsed = orjson.loads(text) if text.startswith("{") else None
    except orjson.JSONDecodeError:
        parsed = None
    if not isinstance(parsed, dict):
        return {"description": text, "model_tag": ""}
    return {
        "description": str(parsed.get("description", "")),
        "model_tag": str(parsed.get("model_tag", "")),
    }


class VectorStore:
    """Vectors and metadata in Milvus, one collection per dataset.

    Thread-safe for concurrent calls (pymilvus clients and gRPC stubs are); the connection is its
    own (never shared with another store), opened lazily and replaced after a connection failure,
    so a store outlives a Milvus restart. One thread's failure never closes a client another
    thread uses.

    ``upsert_chunk_rows`` and ``upsert_in_flight`` shape :meth:`upsert`'s requests (the defaults
    are the measured best on 2 cores; benchmarks vary them).
    """

    def __init__(
        self,
        settings: MilvusSettings,
        *,
        upsert_chunk_rows: int = UPSERT_CHUNK_ROWS,
        upsert_in_flight: int = UPSERT_IN_FLIGHT,
    ) -> None:
        if upsert_chunk_rows < 1 or upsert_in_flight < 1:
            raise ValueError("upsert_chunk_rows and upsert_in_flight must be at least 1")
        self._settings = settings
        self._chunk_rows = upsert_chunk_rows
        self._in_flight = upsert_in_flight
        self._client: MilvusClient | None = None
        self._lock = threading.Lock()
        self._retired: list[tuple[MilvusClient, float]] = []
        self._collections: dict[str, CollectionInfo] = {}

    @property
    def default_collection(self) -> str:
        return self._settings.collection

    def close(self) -> None:
        """Close the connection (and any retired one); the next call opens a new one."""
        with self._lock:
            clients = [c for c, _ in self._retired]
            if self._client is not None:
                clients.append(self._client)
            self._client, self._retired = None, []
            self._collections.clear()
        for client in clients:
            _close_quietly(client)

    def _connect(self) -> MilvusClient:
        with self._lock:
            if self._client is None:
                self._close_retired_locked()
                self._client = MilvusClient(
                    uri=self._settings.uri,
                    token=self._settings.token,
                    timeout=self._settings.timeout_s,
                    # pymilvus shares one connection between clients of the same URI and token,
                    # and close() removes it for all: a store of its own must own its connection.
                    alias=f"trident-{uuid.uuid4().hex}",
                )
            return self._client

    def _retire(self, client: MilvusClient) -> None:
        """Replace a client whose channel may be dead (server restarted), without closing it
        under another thread's call: it is closed once no call can still be using it."""
        with self._lock:
            if self._client is client:
                self._client = None
                self._retired.append((client, time.monotonic()))

    def _close_retired_locked(self) -> None:
        # Every call is bounded by timeout_s, so after twice that a retired client is unused.
        cutoff = time.monotonic() - 2 * self._settings.timeout_s
        done = [c for c, retired_at in self._retired if retired_at < cutoff]
        self._retired = [(c, at) for c, at in self._retired if at >= cutoff]
        for client in done:
            _close_quietly(client)

    def _call(
        self, operation: _Operation, what: str, method: str, *args: Any, **kwargs: Any
    ) -> Any:
        """Run one client call, translating pymilvus and gRPC errors into ours."""
        client: MilvusClient | None = None
        try:
            client = self._connect()
            kwargs.setdefault("timeout", self._settings.timeout_s)
            return getattr(client, method)(*args, **kwargs)
        except (MilvusException, grpc.RpcError, OSError, TimeoutError) as exc:
            error = self._translate(exc, operation, what)
            if isinstance(error, StoreUnavailableError) and client is not None:
                self._retire(client)
            raise error from exc

    def _translate(self, exc: BaseException, operation: _Operation, what: str) -> TridentError:
        text = f"Milvus {self._settings.uri}: {what} failed: {exc}"
        code = getattr(exc, "code", None)  # grpc.Call errors carry their status
        if callable(code) and code() is grpc.StatusCode.UNAUTHENTICATED:
            return ConfigurationError(f"{text} (check milvus.token)")
        lowered = str(exc).lower()
        if not isinstance(exc, MilvusException) or any(m in lowered for m in _TRANSIENT_MARKERS):
            return StoreUnavailableError(text)
        if any(marker in lowered for marker in _MISSING_COLLECTION_MARKERS):
            self._collections.clear()
            return UnknownCollectionError(text)
        if operation is _Operation.WRITE:
            if _refuses_the_data(exc):
                return InvalidRowError(text, stage=Stage.UPSERT)
            return StoreUnavailableError(text)
        if operation is _Operation.SEARCH:
            return InvalidQueryError(text, stage=Stage.SEARCH)
        return StoreUnavailableError(text)

    # Collections ---------------------------------------------------------------------------

    def collection_exists(self, name: str) -> bool:
        """Whether the collection exists (a read: it never creates one).

        A name Milvus cannot hold (it refuses to even look it up) names no collection.

        Raises:
            StoreUnavailableError: Milvus is unreachable or not ready.
        """
        if not _COLLECTION_NAME.fullmatch(name):
            return False
        return bool(self._call(_Operation.READ, f"has_collection {name}", "has_collection", name))

    def create_collection(
        self,
        name: str,
        *,
        dimension: int | None = None,
        index: IndexSpec | None = None,
        description: str = "",
        model_tag: str = "",
    ) -> bool:
        """Create and load a collection unless it exists; return True if it was created.

        ``dimension`` and ``index`` default to the settings'. An existing collection is left as
        it is (its dimension and index are not compared): creation is idempotent, so several
        workers may start at once.

        Raises:
            StoreUnavailableError: Milvus is unreachable or not ready.
        """
        created = False
        if not self.collection_exists(name):
            spec = index or self._settings.index_spec()
            self._create(name, dimension or self._settings.dimension, spec, description, model_tag)
            created = True
        self._call(_Operation.ADMIN, f"load {name}", "load_collection", name)
        self._collections.pop(name, None)
        return created

    def _create(
        self, name: str, dimension: int, spec: IndexSpec, description: str, model_tag: str
    ) -> None:
        schema = collection_schema(dimension, description=description, model_tag=model_tag)
        index = MilvusClient.prepare_index_params()
        # Build parameters nested under "params": milvus-lite ignores the flat form.
        build = spec.build_params()
        index.add_index(
            field_name=VECTOR_FIELD,
            index_type=spec.index_type,
            metric_type=spec.metric,
            params={"params": build} if build else {},
        )
        try:
            self._call(
                _Operation.ADMIN,
                f"create collection {name}",
                "create_collection",
                name,
                schema=schema,
                index_params=index,
            )
        except StoreUnavailableError:
            # Another worker may have created it first; that is fine.
            if not self.collection_exists(name):
                raise
        logger.info(
            "created collection %s (%s, %s, dim %d)", name, spec.index_type, spec.metric, dimension
        )

    def describe_collection(self, name: str) -> CollectionInfo:
        """Dimension, index, search parameters and model tag of a collection (cached).

        Raises:
            UnknownCollectionError: no such collection.
            StoreUnavailableError: Milvus is unreachable or not ready.
        """
        cached = self._collections.get(name)
        if cached is not None:
            return cached
        if not self.collection_exists(name):
            raise UnknownCollectionError(f"no collection named {name!r}")
        described = self._call(_Operation.READ, f"describe {name}", "describe_collection", name)
        dimension = next(
            int(f.get("params", {}).get("dim", 0))
            for f in described.get("fields", [])
            if f.get("name") == VECTOR_FIELD
        )
        index = self._call(
            _Operation.READ,
            f"describe index of {name}",
            "describe_index",
            name,
            index_name=VECTOR_FIELD,
        )
        spec = IndexSpec.from_description(index)
        if spec.index_type == self._settings.index_type:
            # The configured search parameters apply to every collection with that index type.
            spec = spec.model_copy(update={"search_params": self._settings.search_params})
        info = CollectionInfo(
            name=name,
            dimension=dimension,
            index=spec,
            dynamic_field=bool(described.get("enable_dynamic_field", False)),
            **_description_of(str(described.get("description", ""))),
        )
        self._collections[name] = info
        return info

    def list_collections(self) -> list[str]:
        return sorted(self._call(_Operation.READ, "list collections", "list_collections"))

    def drop_collection(self, name: str) -> None:
        """Drop a collection and its data.

        Raises:
            UnknownCollectionError: no such collection.
            StoreUnavailableError: Milvus is unreachable or not ready.
        """
        if not self.collection_exists(name):
            raise UnknownCollectionError(f"no collection named {name!r}")
        self._call(_Operation.ADMIN, f"drop {name}", "drop_collection", name)
        self._collections.pop(name, None)

    def count(self, collection: str | None = None) -> int:
        """Exact row count (strong consistency: includes rows written just now).

        Raises:
            UnknownCollectionError: no such collection.
            StoreUnavailableError: Milvus is unreachable or not ready.
        """
        name = self._existing(collection)
        rows = self._strong_query(name, f"count {name}", filter="", output_fields=["count(*)"])
        return int(rows[0]["count(*)"]) if rows else 0

    def _strong_query(self, name: str, what: str, **query: Any) -> Any:
        # Strong consistency: sees rows written just now (slow; never on the search path).
        return self._call(_Operation.READ, what, "query", name, consistency_level="Strong", **query)

    def _existing(self, collection: str | None) -> str:
        """The collection's name, once it is known to exist (a read never creates one)."""
        name = collection or self._settings.collection
        self.describe_collection(name)
        return name

    # Writes --------------------------------------------------------------------------------

    def validate(self, record: VectorRecord, collection: str | None = None) -> None:
        """Check, before writing, that the collection can hold the row.

        Raises:
            InvalidRowError: the id is empty or over ``ID_MAX_LENGTH`` UTF-8 bytes
                (``empty_id``, ``id_too_long``), the source over ``SOURCE_MAX_LENGTH``
                (``source_too_long``), the metadata not JSON or over ``METADATA_MAX_BYTES``
                encoded (``metadata_not_json``, ``metadata_too_large``), the vector not of the
                collection's dimension or not finite (``wrong_dimension``, ``not_finite``).
            UnknownCollectionError: no such collection.
            StoreUnavailableError: Milvus is unreachable (to look up the dimension).
        """
        validate_id(record.id)
        problem = _row_problem(record)
        if problem is None:
            dimension = self.describe_collection(collection or self._settings.collection).dimension
            if record.vector.shape != (dimension,):
                problem = (
                    Reason.WRONG_DIMENSION,
                    f"vector shape {record.vector.shape}, collection holds {dimension}",
                )
        if problem is not None:
            reason, detail = problem
            raise InvalidRowError(
                f"row {record.id[:80]!r}: {detail}", reason=reason, stage=Stage.UPSERT
            )

    def upsert(self, records: Sequence[VectorRecord], collection: str | None = None) -> int:
        """Insert or replace records by id; return how many were written.

        Safe to call from several threads at once. A call of more than ``upsert_chunk_rows``
        records is sent as several requests, up to ``upsert_in_flight`` at a time; it returns or
        raises once none of them is in flight any more. A refused call may have written some of
        its chunks: upserts are idempotent, so retrying or bisecting it rewrites them unchanged.

        Raises:
            InvalidRowError: the server refused a request for a row's value (it refuses the whole
                request: bisect to find the row; :meth:`validate` catches most beforehand), or a
                row cannot be packed (a vector of another dimension, metadata not JSON).
            UnknownCollectionError: no such collection.
            StoreUnavailableError: Milvus is unreachable, throttling or timed out.
        """
        if not records:
            return 0
        info = self.describe_collection(collection or self._settings.collection)
        name = info.name
        # Everything is packed before anything is sent: a row that cannot be packed fails the
        # call without writing any of it.
        requests = [
            pack_upsert(
                name,
                records[start : start + self._chunk_rows],
                vector_field=VECTOR_FIELD,
                dimension=info.dimension,
                dynamic_field=info.dynamic_field,
            )
            for start in range(0, len(records), self._chunk_rows)
        ]
        self._send_upserts(name, requests, f"upsert {len(records)} rows into {name}")
        return len(records)

    def _send_upserts(self, name: str, requests: list[Any], what: str) -> None:
        """Send the requests on this store's client; raise the first failure, translated."""
        failures: list[BaseException] = []
        client: MilvusClient | None = None
        try:
            client = self._connect()
            self._pipeline(client, name, requests, failures)
        except (MilvusException, grpc.RpcError, OSError, TimeoutError) as exc:
            failures.append(exc)
        if failures:
            error = self._translate(failures[0], _Operation.WRITE, what)
            if isinstance(error, StoreUnavailableError) and client is not None:
                self._retire(client)
            raise error from failures[0]

    def _pipeline(
        self, client: MilvusClient, name: str, requests: list[Any], failures: list[BaseException]
    ) -> None:
        """Keep ``upsert_in_flight`` requests in flight on the client's gRPC channel; return once
        none is in flight any more (never while a request of this call may still be applied)."""
        handler = client._get_connection()
        # What pymilvus sends with each call (database name, request id).
        context = client._generate_call_context()
        metadata = context.to_grpc_metadata()
        in_flight: deque[Any] = deque()

        def finish() -> None:
            try:
                response = in_flight.popleft().result()
                check_status(response.status)
            except (MilvusException, grpc.RpcError) as exc:
                failures.append(exc)
                return
            # A later Session-consistency read through this client then waits for this write,
            # as after pymilvus's own upsert (the cache keeps the highest timestamp).
            ts_utils.update_collection_ts(
                name, response.timestamp, handler.server_address, context.get_db_name()
            )

        try:
            for request in requests:
                if len(in_flight) >= self._in_flight:
                    finish()
                in_flight.append(
                    handler._stub.Upsert.future(
                        request, timeout=self._settings.timeout_s, metadata=metadata
                    )
                )
        finally:
            while in_flight:
                finish()

    def delete(self, ids: Sequence[str], collection: str | None = None) -> None:
        name = self._existing(collection)
        self._call(_Operation.WRITE, f"delete from {name}", "delete", name, ids=list(ids))

    # Reads ---------------------------------------------------------------------------------

    def stored_versions(
        self,
        ids: Sequence[str],
        collection: str | None = None,
        *,
        consistency: Consistency = "Strong",
    ) -> dict[str, StoredVersion]:
        """The version facts of those ids that are stored.

        ``Strong`` sees every write acknowledged before the call, whoever made it (and waits up
        to a time tick for it: ~0.2-0.45 s on Milvus 2.3). ``Session`` sees at least every write
        this process made to the collection (pymilvus sends the last one's timestamp as the
        guarantee), at a fraction of the cost; other processes' recent writes may be missing.

        Raises:
            UnknownCollectionError: no such collection.
            StoreUnavailableError: Milvus is unreachable or not ready.
        """
        if not ids:
            return {}
        name = self._existing(collection)
        rows = self._call(
            _Operation.READ,
            f"get versions from {name}",
            "get",
            name,
            ids=list(ids),
            output_fields=["id", "event_version", "content_sha256", "model_version"],
            consistency_level=consistency,
        )
        return {
            row["id"]: StoredVersion(
                int(row["event_version"]), str(row["content_sha256"]), str(row["model_version"])
            )
            for row in rows
        }

    def ids(self, collection: str | None = None, *, limit: int = 16_384) -> list[str]:
        """Up to ``limit`` stored ids, duplicates included if there were any (strongly
        consistent; for checks and operators, not for the hot path).

        Raises:
            UnknownCollectionError: no such collection.
            StoreUnavailableError: Milvus is unreachable or not ready.
        """
        name = self._existing(collection)
        rows = self._strong_query(
            name, f"list ids of {name}", filter='id != ""', output_fields=["id"], limit=limit
        )
        return [str(row["id"]) for row in rows]

    def get(
        self, ids: Sequence[str], collection: str | None = None, *, with_vectors: bool = False
    ) -> list[dict[str, Any]]:
        """Stored records by id (missing ids are left out).

        Raises:
            UnknownCollectionError: no such collection.
            StoreUnavailableError: Milvus is unreachable or not ready.
        """
        name = self._existing(collection)
        fields = [*RECORD_FIELDS, VECTOR_FIELD] if with_vectors else list(RECORD_FIELDS)
        rows = self._call(
            _Operation.READ, f"get from {name}", "get", name, ids=list(ids), output_fields=fields
        )
        return [dict(row) for row in rows]

    def search(
        self,
        vector: npt.NDArray[np.float32] | Sequence[float],
        *,
        top_k: int = 10,
        filter_expr: str | None = None,
        collection: str | None = None,
        offset: int = 0,
    ) -> list[Hit]:
        """The ``top_k`` nearest stored vectors after the ``offset`` nearest, best first.

        Raises:
            UnknownCollectionError: no such collection.
            InvalidQueryError: bad filter expression, wrong vector size.
            StoreUnavailableError: Milvus is unreachable or not ready.
        """
        name = collection or self._settings.collection
        info = self.describe_collection(name)
        query = np.asarray(vector, dtype=np.float32).reshape(-1)
        if query.shape[0] != info.dimension:
            raise InvalidQueryError(
                f"vector has {query.shape[0]} dimensions; collection {name!r} holds "
                f"{info.dimension}",
                reason=Reason.WRONG_DIMENSION,
                stage=Stage.SEARCH,
            )
        results = self._call(
            _Operation.SEARCH,
            f"search {name}",
            "search",
            name,
            data=[query.tolist()],
            limit=top_k,
            offset=offset,
            filter=filter_expr or "",
            output_fields=list(RECORD_FIELDS),
            search_params={"metric_type": info.index.metric, "params": info.index.query_params()},
        )
        hits = []
        for found in results[0] if results else []:
            entity = dict(found.get("entity", {}))
            hits.append(
                Hit(
                    id=str(found.get("id", entity.get("id"))),
                    score=float(found["distance"]),
                    metadata=dict(entity.pop("metadata", None) or {}),
                    fields=entity,
                )
            )
        return hits


def collection_schema(
    dimension: int, *, description: str = "", model_tag: str = ""
) -> CollectionSchema:
    """The schema of the store's collections: the fields of
    :class:`VectorRecord`, no dynamic field."""
    schema = MilvusClient.create_schema(
        auto_id=False,
        enable_dynamic_field=False,
        # The model tag rides in the description so that stats can name it on any server.
        description=orjson.dumps({"description": description, "model_tag": model_tag}).decode(),
    )
    schema.add_field("id", DataType.VARCHAR, is_primary=True, max_length=ID_MAX_LENGTH)
    schema.add_field(VECTOR_FIELD, DataType.FLOAT_VECTOR, dim=dimension)
    schema.add_field("metadata", DataType.JSON)
    schema.add_field("source", DataType.VARCHAR, max_length=SOURCE_MAX_LENGTH)
    schema.add_field("content_sha256", DataType.VARCHAR, max_length=64)
    schema.add_field("model_version", DataType.VARCHAR, max_length=MODEL_VERSION_MAX_BYTES)
    schema.add_field("event_version", DataType.INT64)
    schema.add_field("ingested_at_ms", DataType.INT64)
    return schema


def validate_id(record_id: str) -> None:
    """Check that an id fits the primary key (before it is even looked up).

    Raises:
        InvalidRowError: empty (``empty_id``), or over ``ID_MAX_LENGTH`` UTF-8 bytes
            (``id_too_long``).
    """
    size = len(record_id.encode("utf-8", errors="surrogatepass"))
    if size == 0:
        raise InvalidRowError("empty id", reason=Reason.EMPTY_ID, stage=Stage.UPSERT)
    if size > ID_MAX_LENGTH:
        raise InvalidRowError(
            f"id {record_id[:40]!r}... is {size} UTF-8 bytes; the store holds {ID_MAX_LENGTH}",
            reason=Reason.ID_TOO_LONG,
            stage=Stage.UPSERT,
        )


def _row_problem(record: VectorRecord) -> tuple[Reason, str] | None:
    """The first problem of a row that needs no server to find, or None."""
    source_bytes = len(record.source.encode("utf-8", errors="surrogatepass"))
    if source_bytes > SOURCE_MAX_LENGTH:
        return Reason.SOURCE_TOO_LONG, f"source is {source_bytes} bytes (max {SOURCE_MAX_LENGTH})"
    try:
        metadata_bytes = len(orjson.dumps(record.metadata))
    except TypeError as exc:  # orjson.JSONEncodeError: non-str keys, unknown types, ...
        return Reason.METADATA_NOT_JSON, f"metadata is not JSON: {exc}"
    if metadata_bytes > METADATA_MAX_BYTES:
        return (
            Reason.METADATA_TOO_LARGE,
            f"metadata is {metadata_bytes} bytes encoded (max {METADATA_MAX_BYTES})",
        )
    if len(record.model_version.encode()) > MODEL_VERSION_MAX_BYTES:
        return Reason.ROW_REJECTED, "model version tag too long"
    if record.vector.ndim != 1:
        return Reason.WRONG_DIMENSION, f"vector shape {record.vector.shape}"
    if not np.isfinite(record.vector).all():
        return Reason.NOT_FINITE, "vector has NaN or infinite values"
    return None


def _refuses_the_data(exc: MilvusException) -> bool:
    lowered = str(exc).lower()
    return (
        isinstance(exc, _INVALID_DATA_ERRORS)
        or getattr(exc, "code", None) == _INVALID_PARAMETER_CODE
        or any(marker in lowered for marker in _INVALID_ROW_MARKERS)
    )


def _close_quietly(client: MilvusClient) -> None:
    try:
        client.close()
    except Exception as exc:  # closing a dead channel may fail; nothing is lost
        logger.debug("closing Milvus client failed: %s", exc)
