"""Milvus adapter: collections, upserts, lookups and similarity search.

Owns pymilvus's errors, classified by their codes (the server's, which pymilvus passes on, or
the gRPC status under pymilvus's own error) and by what was asked, never by who asked:

- connection failures, timeouts, "not ready", quotas and rate limiting:
  :class:`StoreUnavailableError` (retriable) for every operation;
- credentials the server refuses: :class:`StoreAuthenticationError` (a
  :class:`ConfigurationError`: fix ``milvus.token``), never an outage;
- a write refused for its values (code 1100 "exceeds max length", a value that cannot be packed):
  :class:`InvalidRowError` (permanent; the caller isolates the rows by bisecting the batch, see
  ``worker.pipeline``), after :meth:`VectorStore.validate` has already caught what can be checked
  before writing; any other refusal of a write is retriable;
- a search or an ``ids_matching`` filter the server refuses (bad filter, wrong dimension):
  :class:`InvalidQueryError`, and so is an index it refuses (``invalid_index``; the collection
  made for it is dropped again);
- a collection that does not exist: :class:`UnknownCollectionError`; one that exists, but with
  another dimension or without a vector index: :class:`CollectionConflictError`;
- any other refusal of a read or of collection management: retriable (nothing a record did).

The message is read only where the server gives no code at all (see ``_kind_of``).

Deletes keep a **tombstone** per deleted id, so that a delete's version outlives the row it
removed (an upsert older than a delete must never bring the id back, whenever it arrives):
Milvus has no "deleted" marker, so the tombstones of collection ``c`` live in a companion
collection, :func:`tombstone_collection` (``c__tombstones``), made on the first delete: the id,
the delete's version and when it was written, plus the 2-d constant vector Milvus requires of
every collection. The companion lives and dies with its collection (``drop_collection`` drops
both), is never listed, and its name is reserved. ``stored_versions`` answers the newer of the
row and the tombstone of each id; ``delete`` writes the tombstones, then removes the rows;
``get_record``, ``tombstone`` and ``ids_matching`` serve an item's page and delete-by-filter.

**Aliases.** A name may be a Milvus alias of a collection (a rebuilt collection's name is one:
its versions are the concrete collections :func:`version_collection`, ``images_v2``). Every
read and write by name works through an alias: it is resolved to the concrete collection
(:meth:`VectorStore.resolve_alias`; a name's description is cached ``milvus.alias_cache_s`` at
most, since a name can become an alias and an alias move), whose data and tombstone companion
are used. A name found missing is
looked for again for ``milvus.missing_recheck_s`` before :class:`UnknownCollectionError`,
and a data call that finds its collection gone (renamed under it) is made once more by name:
the window of a migration (``rename_collection``, then ``create_alias``) fails nothing.

Ids are written into expressions JSON-quoted (``_ids_expr``), which Milvus's parser reads with
the same escapes: an id holding quotes or backslashes names itself and nothing else.

The write path (:meth:`VectorStore.upsert`) does not go through pymilvus's rows API, whose
float-by-float packing of 1280-d vectors cost more CPU than the server's work: requests are
packed by columns (``engine.store_requests``, the same request on the wire) and sent on the
client's own gRPC stub, a large call in chunks with several in flight. That stub, its
``check_status`` and its per-collection write timestamps (what ``Session`` consistency reads
wait for) are pymilvus internals of the pinned 2.6 line; ``tests/integration/test_store_writes.py``
holds them to what the rows API does.
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from enum import Enum
from typing import Any, TypeVar

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
    CollectionConflictError,
    ConfigurationError,
    InvalidQueryError,
    InvalidRowError,
    ModelSpecError,
    Reason,
    Stage,
    StoreAuthenticationError,
    StoreUnavailableError,
    TridentError,
    UnknownCollectionError,
)
from engine.indexes import IndexSpec
from engine.models import Box, ModelSpec
from engine.records import (
    RECORD_FIELDS,
    VECTOR_FIELD,
    CollectionInfo,
    Consistency,
    Hit,
    ItemRegions,
    RegionHit,
    StoredRecord,
    StoredVersion,
    VectorRecord,
)
from engine.settings import MilvusSettings
from engine.store_requests import pack_upsert
from schemas.events import ID_MAX_BYTES, SOURCE_MAX_BYTES, VERSION_MAX
from schemas.events import METADATA_MAX_BYTES as SCHEMA_METADATA_MAX_BYTES
from schemas.search import COLLECTION_NAME_PATTERN

logger = logging.getLogger(__name__)

T = TypeVar("T")

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
# How long create_collection waits for a creator beside it (workers starting at once) to index
# the collection it has just made, before calling it a collection without an index.
INDEX_WAIT_S = 5.0
# How often a name found missing is looked up again within milvus.missing_recheck_s.
_RECHECK_EVERY_S = 0.1

_COLLECTION_NAME = re.compile(COLLECTION_NAME_PATTERN)
_COLLECTION_NAME_MAX = 255
# A rebuilt collection's name is an alias; its versions are the concrete collections
# ``<alias>_v<N>`` (version_collection, version_number: the one place of that pattern).
_VERSION_INFIX = "_v"

# The companion collection of tombstones (module docstring): its name's suffix, reserved, and
# its fields. Milvus 2.3 cannot hold a collection without a vector field, nor load one without
# an index: a constant 2-d vector under a FLAT index costs 8 bytes a row and no index build.
TOMBSTONE_SUFFIX = "__tombstones"
# The companion collection of region vectors (issue 24) of a collection made with regions: one
# row per region of an item's version (REGION_FIELDS, the box as four floats, the vector), its
# id "<version>:<region>:<item id>". Made with its collection, reserved like the tombstones'.
REGION_SUFFIX = "__regions"
REGION_FIELDS = ("id", "item_id", "event_version", "box_x0", "box_y0", "box_x1", "box_y1")
_REGION_BOX = REGION_FIELDS[3:]
# Room for "<version>:<region>:" before the item's id in a region's primary key.
_REGION_ID_EXTRA = 48
# A region search fetches this many region hits per item asked for, per query vector, before
# grouping them by item (each item has at most its recipe's regions of one version, plus, for
# a bounded window, those of a version being replaced), up to QUERY_LIMIT_MAX.
REGION_OVER_FETCH = 20
# Candidates whose version one read checks beyond the ``limit`` asked for.
REGION_CHECK_SLACK = 10
# Items whose older regions one delete request removes (an expression of one clause each).
_REGION_DELETES_PER_REQUEST = 100


COMPANION_SUFFIXES = (TOMBSTONE_SUFFIX, REGION_SUFFIX)
TOMBSTONE_FIELDS = ("id", "event_version", "deleted_at_ms")
_TOMBSTONE_VECTOR = "_tombstone"
_TOMBSTONE_DIM = 2
# Ids per read or delete request: bounds the expression, and stays under Milvus's query window.
IDS_PER_REQUEST = 1_000
# Milvus refuses a query window (offset + limit) above this.
QUERY_LIMIT_MAX = 16_384

# Milvus's error codes (its ``merr`` package: ``status.code`` from 2.3 on, MilvusException.code),
# which pymilvus also uses for what it finds itself (2: it could not connect, with the gRPC error
# chained). Servers before 2.3 give only the legacy ``error_code`` (``compatible_code``).
_COLLECTION_NOT_FOUND = 100
_INVALID_PARAMETER_CODES = frozenset({1100, 1101, 1102})  # invalid, missing, too large
_AUTHENTICATION_CODES = frozenset({1400, 1800})  # not authenticated, needs authentication
_NOT_PERMITTED = 1401
# "Try again later": not ready or unavailable (1, 2), over a memory, request, disk, rate or
# resource quota (3, 4, 7, 8, 9, 12, 1807), time tick lag (11), a collection or partition still
# loading (101, 103, 106, 201, 202), replicas, channels, segments or nodes coming and going
# (400-906), I/O and the message queue (1001, 1002, 1302, 1303), the server's own cancel and
# timeout (10000, 10001).
_UNAVAILABLE_CODES = frozenset(
    {1, 2, 3, 4, 7, 8, 9, 11, 12, 101, 103, 106, 201, 202, 400, 401, 500, 501, 503, 504}
    | {600, 601, 602, 604, 901, 902, 903, 904, 905, 906, 1001, 1002, 1302, 1303, 1807}
    | {10000, 10001}
)
# No code: 0 (a server before 2.3) and 65535 (merr's "unexpected error": an error the server
# passed on without one). Then the legacy code decides, if it says anything:
_LEGACY_NOT_FOUND = frozenset({4, 28})  # CollectionNotExists, CollectionNameNotFound
_LEGACY_INVALID = frozenset({5})  # IllegalArgument
# NotShardLeader, NoReplicaAvailable, ForceDeny, RateLimit, InsufficientMemoryToLoad, memory and
# disk quotas, TimeTickLongDelay, NotReadyServe, NotReadyCoordActivating, DataCoordNA.
_LEGACY_UNAVAILABLE = frozenset({45, 46, 48, 49, 52, 53, 54, 55, 56, 57, 100})
_NO_CODE = frozenset({0, 65535})
# ... and, as a last resort where neither code says anything, the message: Milvus 2.3 passes
# some errors of its query nodes (a node gone, a channel not ready) and of the data (a vector
# of another size) on without a code.
_TRANSIENT_WORDS = (
    "not ready",
    "unavailable",
    "timeout",
    "timed out",
    "deadline",
    "rate limit",
    "too many requests",
    "node not found",
    "no available",
    "not loaded",
    "not healthy",
    "abnormal",
)
_REFUSED_ROW_WORDS = ("invalid parameter", "exceeds max length", "mismatch")
# pymilvus's own checks of the data before sending it.
_INVALID_DATA_ERRORS = (ParamError, DataNotMatchException, DataTypeNotMatchException)


class _Kind(Enum):
    """What a failure says, before what was asked decides what it means (``_translate``)."""

    UNAVAILABLE = "unavailable"
    UNAUTHENTICATED = "unauthenticated"
    NOT_PERMITTED = "not_permitted"
    NO_COLLECTION = "no_collection"
    BAD_VALUES = "bad_values"  # the request's values, for certain
    REFUSED = "refused"  # refused, for no reason given


class _Operation(Enum):
    """What a call does, which decides what a refusal by the server means (module docstring)."""

    READ = "read"
    WRITE = "write"
    SEARCH = "search"
    ADMIN = "admin"
    INDEX = "index"  # building an index: a refusal is of its parameters
    DELETE = "delete"  # a write, for a delete: a refusal of its values is the delete's


_WRITES = frozenset({_Operation.WRITE, _Operation.DELETE})


def _description_of(text: str) -> dict[str, str]:
    # Collections made elsewhere have a plain description; ours hold JSON (see
    # collection_schema). Those made before models were recorded by name have no model_name.
    try:
        parsed = orjson.loads(text) if text.startswith("{") else None
    except orjson.JSONDecodeError:
        parsed = None
    if not isinstance(parsed, dict):
        return {"description": text, "model_tag": "", "model_name": ""}
    return {key: str(parsed.get(key, "")) for key in ("description", "model_tag", "model_name")}


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
        # name -> (description, until when it may be used: ``milvus.alias_cache_s``, since a
        # name may become an alias, or an alias move; None: for good, set by tests).
        self._collections: dict[str, tuple[CollectionInfo, float | None]] = {}
        # Companion collections of tombstones this store found (or made) and loaded.
        self._tombstones: set[str] = set()

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
            self._tombstones.clear()
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
        kwargs.setdefault("timeout", self._settings.timeout_s)
        return self._run(operation, what, lambda client: getattr(client, method)(*args, **kwargs))

    def _run(self, operation: _Operation, what: str, calls: Callable[[MilvusClient], Any]) -> Any:
        """Run ``calls`` on this store's client, translating pymilvus and gRPC errors into ours."""
        client: MilvusClient | None = None
        try:
            client = self._connect()
            return calls(client)
        except (MilvusException, grpc.RpcError, OSError, TimeoutError) as exc:
            error = self._translate(exc, operation, what)
            if isinstance(error, StoreUnavailableError) and client is not None:
                self._retire(client)
            raise error from exc

    def _translate(self, exc: BaseException, operation: _Operation, what: str) -> TridentError:
        kind = _kind_of(exc, operation)
        uri = self._settings.uri
        text = f"Milvus {uri}: {what} failed: {_detail(exc)}"
        if kind is _Kind.UNAUTHENTICATED:
            given = "the token was refused" if self._settings.token else "no token is set"
            return StoreAuthenticationError(
                f"Milvus {uri}: authentication failed ({given}: {_auth_detail(exc)}). Pass a valid "
                'token ("user:password" or an API key) as the milvus.token setting (environment '
                "TRIDENT_MILVUS__TOKEN); for jax-embedding, milvus.token (environment "
                "MILVUS_TOKEN), or milvus.user and milvus.password, in its configuration"
            )
        if kind is _Kind.NOT_PERMITTED:
            return ConfigurationError(
                f"{text} (the user of milvus.token lacks the privilege: grant it, or use another)"
            )
        if kind is _Kind.NO_COLLECTION:
            self._collections.clear()
            self._tombstones.clear()
            return UnknownCollectionError(text)
        refused = kind is _Kind.REFUSED or kind is _Kind.BAD_VALUES
        if refused and operation is _Operation.SEARCH:
            return InvalidQueryError(text, stage=Stage.SEARCH)
        if refused and operation is _Operation.INDEX:
            return InvalidQueryError(text, reason=Reason.INVALID_INDEX)
        if kind is _Kind.BAD_VALUES and operation in _WRITES:
            stage = Stage.DELETE if operation is _Operation.DELETE else Stage.UPSERT
            return InvalidRowError(text, stage=stage)
        # An outage, or a refusal nothing says is the request's: misreading an outage as bad
        # rows would dead-letter good records.
        return StoreUnavailableError(text)

    # Collections ---------------------------------------------------------------------------

    def collection_exists(self, name: str) -> bool:
        """Whether the collection exists (a read: it never creates one).

        A name Milvus cannot hold (it refuses to even look it up) names no collection, and
        neither does a companion collection of tombstones (its name is reserved).

        Raises:
            StoreUnavailableError: Milvus is unreachable or not ready.
        """
        if not _COLLECTION_NAME.fullmatch(name) or is_companion_collection(name):
            return False
        return self._has(name)

    def _has(self, name: str) -> bool:
        return bool(self._call(_Operation.READ, f"has_collection {name}", "has_collection", name))

    def create_collection(
        self,
        name: str,
        *,
        dimension: int | None = None,
        index: IndexSpec | None = None,
        description: str = "",
        model_tag: str = "",
        model_name: str = "",
        regions: bool = False,
    ) -> bool:
        """Create and load a collection unless it exists; return True if it was created.

        ``regions``: the collection holds region vectors too (issue 24), in its companion
        :func:`region_collection` (made with it, with the same index; recorded in its
        description, ``CollectionInfo.regions``). An existing collection asked for regions
        must have been made with them; one made with them is left so when not asked.

        ``dimension`` and ``index`` default to the settings'. ``model_name`` and ``model_tag``
        bind the collection to the model whose vectors it will hold (recorded in its
        description; ``CollectionInfo.bound_model``). An existing collection of that dimension
        and model tag (or with no tag recorded, or none asked) is left as it is (its index is
        not compared): creation is idempotent, so several workers may start at once. A
        creation Milvus refuses leaves no collection behind.

        Raises:
            CollectionConflictError: the collection exists with another dimension or bound to a
                model of another tag (``collection_conflict``), or without a vector index
                (``no_vector_index``), or without regions when they are asked, or the name
                ends in a companion's suffix (``COMPANION_SUFFIXES``: reserved;
                ``collection_conflict``).
            InvalidQueryError: (``invalid_index``) Milvus refused the index parameters.
            StoreAuthenticationError: Milvus refused ``milvus.token``.
            StoreUnavailableError: Milvus is unreachable or not ready.
        """
        if is_companion_collection(name):
            raise CollectionConflictError(
                f"collection {name!r}: names ending in {' or '.join(COMPANION_SUFFIXES)} are "
                "reserved for the tombstones of deletes and region vectors; use another name"
            )
        wanted = dimension or self._settings.dimension
        schema = collection_schema(
            wanted,
            description=description,
            model_tag=model_tag,
            model_name=model_name,
            regions=regions,
        )
        spec = index or self._settings.index_spec()
        created = not self.collection_exists(name) and self._create(name, schema, spec)
        if not created:
            existing = self._described_once_indexed(name)
            if existing.dimension != wanted:
                raise CollectionConflictError(
                    f"collection {name!r} already exists with dimension {existing.dimension}, "
                    f"not {wanted}: use another name, or drop it first"
                )
            if model_tag and existing.model_tag and existing.model_tag != model_tag:
                bound = existing.model_name or "a model"
                raise CollectionConflictError(
                    f"collection {name!r} already exists, bound to {bound} of tag "
                    f"{existing.model_tag!r}, not {model_name or 'a model'} of tag "
                    f"{model_tag!r}: use another name, or drop it first"
                )
            if regions and not existing.regions:
                raise CollectionConflictError(
                    f"collection {name!r} already exists without region vectors (chosen at "
                    "creation): use another name, or drop it first"
                )
        if regions:
            self._create_regions(name, wanted, spec)
        self._call(_Operation.ADMIN, f"load {name}", "load_collection", name)
        self._collections.pop(name, None)
        return created

    def _described_once_indexed(self, name: str) -> CollectionInfo:
        """The collection's description, afresh (it may have been made elsewhere), waiting up to
        ``INDEX_WAIT_S`` for the index of a collection another creator has just made."""
        deadline = time.monotonic() + INDEX_WAIT_S
        while True:
            self._collections.pop(name, None)
            try:
                return self.describe_collection(name)
            except CollectionConflictError as exc:
                if exc.reason != Reason.NO_VECTOR_INDEX or time.monotonic() >= deadline:
                    raise
            time.sleep(0.2)

    def _create(self, name: str, schema: CollectionSchema, spec: IndexSpec) -> bool:
        """Create the collection, then its index; False if another client created it first.

        The two are separate calls so that a collection whose index Milvus refuses is dropped
        again: without an index it can be neither loaded nor searched.
        """
        try:
            self._call(
                _Operation.ADMIN,
                f"create collection {name}",
                "create_collection",
                name,
                schema=schema,
            )
        except StoreUnavailableError:
            # Another worker may have created it first; that is fine.
            if not self.collection_exists(name):
                raise
            return False
        try:
            self._call(
                _Operation.INDEX,
                f"create the {spec.index_type} index of {name}",
                "create_index",
                name,
                _index_params(spec),
            )
        except TridentError:
            self._drop_unindexed(name)
            raise
        logger.info("created collection %s (%s, %s)", name, spec.index_type, spec.metric)
        return True

    def _drop_unindexed(self, name: str) -> None:
        """Drop a collection just created whose index failed, unless it has one after all (a
        creator beside this one indexed it first)."""
        try:
            if self._vector_index(name) is None:
                self._call(_Operation.ADMIN, f"drop {name}", "drop_collection", name)
                logger.warning("dropped collection %s again: its index was not created", name)
        except TridentError as exc:
            logger.warning(
                "collection %s is left without an index (drop it): %s", name, exc.message
            )

    def _vector_index(self, name: str) -> dict[str, Any] | None:
        """Milvus's description of the vector field's index, or None when it has none."""
        what = f"describe index of {name}"
        described = self._call(
            _Operation.READ, what, "describe_index", name, index_name=VECTOR_FIELD
        )
        if not described:
            # An index made elsewhere may have another name.
            names = self._call(
                _Operation.READ,
                f"list indexes of {name}",
                "list_indexes",
                name,
                field_name=VECTOR_FIELD,
            )
            if names:
                described = self._call(
                    _Operation.READ, what, "describe_index", name, index_name=names[0]
                )
        return dict(described) if described else None

    def describe_collection(self, name: str) -> CollectionInfo:
        """Dimension, index, search parameters and model tag of a collection (cached).

        Raises:
            UnknownCollectionError: no such collection.
            CollectionConflictError: the collection has no vector field of that name
                (``collection_conflict``) or no index on it (``no_vector_index``): made elsewhere.
            StoreUnavailableError: Milvus is unreachable or not ready.
        """
        cached = self._collections.get(name)
        if cached is not None and (cached[1] is None or cached[1] > time.monotonic()):
            return cached[0]
        described = self._described(name)
        concrete = str(described.get("collection_name") or name)
        dimension = next(
            (
                int(f.get("params", {}).get("dim", 0))
                for f in described.get("fields", [])
                if f.get("name") == VECTOR_FIELD
            ),
            None,
        )
        if dimension is None:
            raise CollectionConflictError(
                f"collection {name!r} has no vector field {VECTOR_FIELD!r}: it was made "
                "elsewhere, for something else; use another collection"
            )
        index = self._vector_index(name)
        if index is None:
            raise CollectionConflictError(
                f"collection {name!r} has no index on its vector field, so it can be neither "
                "loaded nor searched (it was made elsewhere, or left by a creation that failed): "
                "drop it and create it again",
                reason=Reason.NO_VECTOR_INDEX,
            )
        spec = IndexSpec.from_description(index)
        if spec.index_type == self._settings.index_type:
            # The configured search parameters apply to every collection with that index type.
            spec = spec.model_copy(update={"search_params": self._settings.search_params})
        info = CollectionInfo(
            name=concrete,
            dimension=dimension,
            index=spec,
            dynamic_field=bool(described.get("enable_dynamic_field", False)),
            regions=_records_regions(str(described.get("description", ""))),
            **_description_of(str(described.get("description", ""))),
        )
        self._collections[name] = (info, time.monotonic() + self._settings.alias_cache_s)
        return info

    def _described(self, name: str) -> dict[str, Any]:
        """Milvus's description of the collection (or alias) ``name``.

        A name found missing is looked for again for ``milvus.missing_recheck_s``: a
        migration renames a collection, then makes its old name an alias of it.

        Raises:
            UnknownCollectionError: no such collection or alias (a companion of tombstones is
                none either).
            StoreUnavailableError: Milvus is unreachable or not ready.
        """
        # A name Milvus refuses to look up, or a companion's (reserved), names no collection.
        if not _COLLECTION_NAME.fullmatch(name) or is_companion_collection(name):
            raise UnknownCollectionError(f"no collection named {name!r}")
        # One call when the name exists (an alias's description names its collection): this
        # runs on every search through an alias.
        try:
            return dict(
                self._call(_Operation.READ, f"describe {name}", "describe_collection", name)
            )
        except UnknownCollectionError:
            # Missing, or moved in a migration's window: once more, if it appears again.
            if not self._appears(name):
                raise UnknownCollectionError(f"no collection named {name!r}") from None
            return dict(
                self._call(_Operation.READ, f"describe {name}", "describe_collection", name)
            )

    def _appears(self, name: str) -> bool:
        """Whether the missing ``name`` appears within ``milvus.missing_recheck_s`` (looked up
        every ``_RECHECK_EVERY_S``): a migration's window is a few hundred milliseconds."""
        if not _COLLECTION_NAME.fullmatch(name) or is_companion_collection(name):
            return False
        deadline = time.monotonic() + self._settings.missing_recheck_s
        while time.monotonic() < deadline:
            time.sleep(min(_RECHECK_EVERY_S, max(0.0, deadline - time.monotonic())))
            if self.collection_exists(name):
                return True
        return False

    def resolve_alias(self, name: str) -> str:
        """The concrete collection ``name`` points to: itself when it is a collection (never
        cached: an alias moves).

        Raises:
            UnknownCollectionError: no collection or alias of that name.
            StoreUnavailableError: Milvus is unreachable or not ready.
        """
        return str(self._described(name).get("collection_name") or name)

    def aliases(self) -> dict[str, str]:
        """Every alias and the concrete collection it points to.

        Raises:
            StoreUnavailableError: Milvus is unreachable or not ready.
        """
        found: dict[str, str] = {}
        for name in self.list_collections():
            try:
                described = self._call(
                    _Operation.READ, f"describe {name}", "describe_collection", name
                )
            except UnknownCollectionError:
                continue  # dropped since it was listed
            for alias in described.get("aliases") or []:
                found[str(alias)] = name
        return found

    def create_alias(self, alias: str, collection: str) -> None:
        """Make ``alias`` a name of ``collection``.

        Raises:
            CollectionConflictError: ``alias`` names a collection or another alias already.
            UnknownCollectionError: no collection ``collection``.
            StoreUnavailableError: Milvus is unreachable or not ready.
        """
        if self.collection_exists(alias):
            raise CollectionConflictError(
                f"cannot make {alias!r} an alias of {collection!r}: that name is taken"
            )
        self._existing_concrete(collection)
        self._call(_Operation.ADMIN, f"alias {alias}", "create_alias", collection, alias)
        self._forget(alias)
        logger.info("alias %s -> %s", alias, collection)

    def alter_alias(self, alias: str, collection: str) -> None:
        """Point the alias ``alias`` at ``collection`` (atomic: every call by that name after
        it reaches the new collection).

        Raises:
            UnknownCollectionError: no such alias or collection.
            StoreUnavailableError: Milvus is unreachable or not ready.
        """
        self._existing_alias(alias)
        self._existing_concrete(collection)
        self._call(_Operation.ADMIN, f"alter alias {alias}", "alter_alias", collection, alias)
        self._forget(alias)
        logger.info("alias %s -> %s", alias, collection)

    def drop_alias(self, alias: str) -> None:
        """Drop the alias ``alias`` (never its collection).

        Raises:
            UnknownCollectionError: no such alias.
            StoreUnavailableError: Milvus is unreachable or not ready.
        """
        self._existing_alias(alias)
        self._call(_Operation.ADMIN, f"drop alias {alias}", "drop_alias", alias)
        self._forget(alias)

    def rename_collection(self, old: str, new: str, *, alias_old_name: bool = False) -> float:
        """Rename a collection, and its companion of tombstones with it; with
        ``alias_old_name``, make ``old`` an alias of ``new`` at once (a migration). Returns how
        long ``old`` named nothing (seconds; the two calls between, nothing else).

        Raises:
            UnknownCollectionError: no collection ``old`` (an alias is none).
            CollectionConflictError: ``new`` is taken.
            StoreUnavailableError: Milvus is unreachable or not ready.
        """
        self._existing_concrete(old)
        companions_taken = any(self._has(c(new)) for c in (tombstone_collection, region_collection))
        if self.collection_exists(new) or companions_taken:
            raise CollectionConflictError(f"cannot rename {old!r} to {new!r}: that name is taken")
        companion = tombstone_collection(old)
        has_companion = self._has(companion)
        self._tombstones.discard(companion)
        began = time.monotonic()
        self._call(_Operation.ADMIN, f"rename {old}", "rename_collection", old, new)
        if alias_old_name:
            self._call(_Operation.ADMIN, f"alias {old}", "create_alias", new, old)
        missing_s = time.monotonic() - began
        self._forget(old)
        # The companions follow; until they have, readers of ``old``'s tombstones find the name
        # renamed and look it up again (``_still_concrete``).
        regions = region_collection(old)
        if self._has(regions):
            renamed_regions = region_collection(new)
            self._call(
                _Operation.ADMIN, f"rename {regions}", "rename_collection", regions, renamed_regions
            )
        if has_companion:
            renamed = tombstone_collection(new)
            self._call(
                _Operation.ADMIN, f"rename {companion}", "rename_collection", companion, renamed
            )
        logger.info("renamed collection %s to %s (%.3fs without the name)", old, new, missing_s)
        return missing_s

    def create_version(self, like: str, name: str, model: ModelSpec) -> bool:
        """Create (unless it exists) the collection ``name`` bound to ``model``, of its
        dimension, with the index and description of the collection ``like``, and with region
        vectors when ``like`` has them; True if created.

        Raises:
            UnknownCollectionError: no collection ``like``.
            CollectionConflictError: ``name`` exists with another dimension or model, or
                without regions that ``like`` has.
            ModelSpecError: ``like`` has regions and ``model`` no region recipe (nothing made).
            StoreUnavailableError: Milvus is unreachable or not ready.
        """
        info = self.describe_collection(like)
        if info.regions and model.regions is None:
            raise ModelSpecError(
                f"collection {like!r} holds region vectors and model {model.name!r} has no "
                "region recipe, so its version could not have them: choose a model with one"
            )
        return self.create_collection(
            name,
            dimension=model.output_dim,
            index=info.index.model_copy(update={"search_params": {}}),
            description=info.description,
            model_tag=model.model_version_tag,
            model_name=model.name,
            regions=info.regions,
        )

    def copy_tombstones(self, source: str, target: str) -> int:
        """Copy the tombstones kept for ``source`` to ``target``'s companion; return how many.

        Raises:
            UnknownCollectionError: no collection ``source`` or ``target``.
            StoreUnavailableError: Milvus is unreachable or not ready.
        """
        source, target = self._existing(source), self._existing(target)
        companion = self._companion(source, create=False)
        if companion is None:
            return 0

        def read(client: MilvusClient) -> list[dict[str, Any]]:
            rows: list[dict[str, Any]] = []
            iterator = client.query_iterator(
                companion,
                batch_size=IDS_PER_REQUEST,
                filter="",
                output_fields=[*TOMBSTONE_FIELDS, _TOMBSTONE_VECTOR],
                consistency_level="Strong",
                timeout=self._settings.timeout_s,
            )
            try:
                while page := iterator.next():
                    rows += [dict(row) for row in page]
            finally:
                iterator.close()
            return rows

        rows = list(self._run(_Operation.READ, f"read tombstones of {source}", read))
        if rows:
            self._write_tombstones(target, rows)
        return len(rows)

    def _still_concrete(self, name: str) -> None:
        """Raise UnknownCollectionError unless ``name`` is (still) a collection, not an alias."""
        if self.resolve_alias(name) != name:
            raise UnknownCollectionError(f"collection {name!r} was renamed; it is an alias now")

    def _existing_concrete(self, name: str) -> None:
        if self.resolve_alias(name) != name:
            raise CollectionConflictError(f"{name!r} is an alias, not a collection")

    def _existing_alias(self, alias: str) -> None:
        if self.resolve_alias(alias) == alias:
            raise CollectionConflictError(f"{alias!r} is a collection, not an alias")

    def _forget(self, name: str) -> None:
        """Drop what is cached of ``name`` (and, for an alias, of where it pointed)."""
        cached = self._collections.pop(name, None)
        if cached is not None:
            self._tombstones.discard(tombstone_collection(cached[0].name))
        self._tombstones.discard(tombstone_collection(name))

    def _by_name(self, collection: str | None, call: Callable[[str], T]) -> T:
        """``call`` on the concrete collection ``collection`` (default: the settings') names,
        made once more by name when that collection went away under it (renamed, an alias
        moved): see the module docstring.

        Raises:
            UnknownCollectionError: no such collection, twice.
        """
        name = collection or self._settings.collection
        try:
            return call(self._existing(name))
        except UnknownCollectionError:
            self._forget(name)
            return call(self._existing(name))

    def list_collections(self) -> list[str]:
        """The collections' names, sorted; companion collections of tombstones are left out.

        Raises:
            StoreUnavailableError: Milvus is unreachable or not ready.
        """
        names = self._call(_Operation.READ, "list collections", "list_collections")
        return sorted(name for name in names if not is_companion_collection(name))

    def ping(self, timeout_s: float) -> None:
        """Return when Milvus answers a request within ``timeout_s`` (the health probe).

        Raises:
            StoreUnavailableError: no answer in time, or not serving.
            ConfigurationError: Milvus refused ``milvus.token``.
        """
        self._call(_Operation.READ, "health probe", "list_collections", timeout=timeout_s)

    def drop_collection(self, name: str) -> None:
        """Drop a collection and its data, its tombstones first: a collection made again under
        that name must not inherit them (were the call to fail between the two, the collection
        is still there to drop again).

        Raises:
            UnknownCollectionError: no such collection.
            CollectionConflictError: ``name`` is an alias (drop the alias, or the collection it
                points to, by their own names).
            StoreUnavailableError: Milvus is unreachable or not ready.
        """
        if not self.collection_exists(name):
            raise UnknownCollectionError(f"no collection named {name!r}")
        target = self.resolve_alias(name)
        if target != name:
            raise CollectionConflictError(
                f"{name!r} is an alias of collection {target!r}: it is dropped with "
                "trident-reembed (finish, cancel), never through its alias"
            )
        companion = tombstone_collection(name)
        self._tombstones.discard(companion)
        for each in (companion, region_collection(name)):
            if self._has(each):
                self._call(_Operation.ADMIN, f"drop {each}", "drop_collection", each)
        self._call(_Operation.ADMIN, f"drop {name}", "drop_collection", name)
        self._collections.pop(name, None)

    def count(self, collection: str | None = None) -> int:
        """Exact row count (strong consistency: includes rows written just now).

        Raises:
            UnknownCollectionError: no such collection.
            StoreUnavailableError: Milvus is unreachable or not ready.
        """
        rows = self._by_name(
            collection,
            lambda name: self._strong_query(
                name, f"count {name}", filter="", output_fields=["count(*)"]
            ),
        )
        return int(rows[0]["count(*)"]) if rows else 0

    def _strong_query(self, name: str, what: str, **query: Any) -> Any:
        # Strong consistency: sees rows written just now (slow; never on the search path).
        return self._call(_Operation.READ, what, "query", name, consistency_level="Strong", **query)

    def _existing(self, collection: str | None) -> str:
        """The concrete collection's name (``collection`` or the one its alias points to), once
        it is known to exist (a read never creates one)."""
        return self.describe_collection(collection or self._settings.collection).name

    # Writes --------------------------------------------------------------------------------

    def validate(self, record: VectorRecord, collection: str | None = None) -> None:
        """Check, before writing, that the collection can hold the row.

        Raises:
            InvalidRowError: the id is empty or over ``ID_MAX_LENGTH`` UTF-8 bytes
                (``empty_id``, ``id_too_long``), the source over ``SOURCE_MAX_LENGTH``
                (``source_too_long``), the metadata not JSON or over ``METADATA_MAX_BYTES``
                encoded (``metadata_not_json``, ``metadata_too_large``), the vector not of the
                collection's dimension or not finite (``wrong_dimension``, ``not_finite``), or
                its regions not of its id and version, or their vectors not one per box, of
                that dimension and finite.
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
        if record.regions is not None:
            _region_rows(*_regions_of_record(record), record.vector.shape[0])

    def upsert(self, records: Sequence[VectorRecord], collection: str | None = None) -> int:
        """Insert or replace records by id; return how many were written.

        Safe to call from several threads at once. A call of more than ``upsert_chunk_rows``
        records is sent as several requests, up to ``upsert_in_flight`` at a time; it returns or
        raises once none of them is in flight any more. A refused call may have written some of
        its chunks: upserts are idempotent, so retrying or bisecting it rewrites them unchanged.

        Into a collection made with regions, each record's regions (``VectorRecord.regions``)
        are written first (:meth:`upsert_regions_of`, which deletes the item's regions of older
        versions; a record without regions has its older ones deleted), then the rows. So a
        failure between the two leaves the row at its older version, and the record, delivered
        again, is embedded again rather than skipped as unchanged. A collection without regions
        ignores the records' regions. Returns the rows written, regions not counted.

        Raises:
            InvalidRowError: the server refused a request for a row's value (it refuses the whole
                request: bisect to find the row; :meth:`validate` catches most beforehand), or a
                row cannot be packed (a vector of another dimension, metadata not JSON).
            UnknownCollectionError: no such collection.
            StoreUnavailableError: Milvus is unreachable, throttling or timed out.
        """
        if not records:
            return 0
        return self._by_name(collection, lambda name: self._upsert_into(name, records))

    def _upsert_into(self, name: str, records: Sequence[VectorRecord]) -> int:
        info = self.describe_collection(name)
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
        if info.regions:
            self._write_regions(name, info, records)
        self._send_upserts(name, requests, f"upsert {len(records)} rows into {name}")
        return len(records)

    def _write_regions(
        self, name: str, info: CollectionInfo, records: Sequence[VectorRecord]
    ) -> None:
        """The records' regions into ``name``'s companion (none: the older ones deleted)."""
        empty = np.empty((0, info.dimension), dtype=np.float32)
        items = [
            record.regions
            if record.regions is not None
            else ItemRegions(record.id, record.event_version, (), empty)
            for record in records
        ]
        for record in records:
            if record.regions is not None:
                _regions_of_record(record)  # another item's or version's regions: refused
        self.upsert_regions_of(items, name)

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

    def delete(
        self, ids_with_versions: Sequence[tuple[str, int]], collection: str | None = None
    ) -> None:
        """Delete ids as of their versions: write their tombstones, then delete their rows.

        Unconditional: the caller decides which deletes are not stale (``worker.versions``).
        An id that is not stored is no error (its tombstone is written all the same). The
        tombstones are written first: a failure between the two leaves the tombstone and the
        row, and the delete, done again, completes (both steps are idempotent). Of an id given
        twice, the highest version counts. The companion collection is made on the first delete.
        In a collection made with regions, the items' regions (of every version) are deleted
        after the tombstones and before the rows: no region of a deleted item outlives its row.

        Raises:
            InvalidRowError: (stage ``delete``) an id empty or over ``ID_MAX_LENGTH`` UTF-8 bytes
                (``empty_id``, ``id_too_long``), a version outside 0 to 2**63 - 1
                (``row_rejected``), or a request the server refused for its values.
            UnknownCollectionError: no such collection.
            CollectionConflictError: the collection was made elsewhere, not for vectors.
            StoreUnavailableError: Milvus is unreachable, throttling or timed out.
        """
        versions: dict[str, int] = {}
        for record_id, version in ids_with_versions:
            validate_id(record_id, stage=Stage.DELETE)
            if not 0 <= version <= VERSION_MAX:
                raise InvalidRowError(
                    f"delete of {record_id[:80]!r}: version {version} is outside 0 to 2**63 - 1",
                    reason=Reason.ROW_REJECTED,
                    stage=Stage.DELETE,
                )
            versions[record_id] = max(version, versions.get(record_id, version))
        if versions:
            self._by_name(collection, lambda name: self._delete_from(name, versions))

    def _delete_from(self, name: str, versions: dict[str, int]) -> None:
        deleted_at_ms = int(time.time() * 1000)
        rows = [
            {
                "id": record_id,
                "event_version": version,
                "deleted_at_ms": deleted_at_ms,
                _TOMBSTONE_VECTOR: [0.0] * _TOMBSTONE_DIM,
            }
            for record_id, version in versions.items()
        ]
        try:
            self._write_tombstones(name, rows)
        except UnknownCollectionError:
            # The companion found earlier was dropped since (its collection dropped and made
            # again elsewhere): once the collection is known to exist, make it again.
            self._existing(name)
            self._write_tombstones(name, rows)
        ids = list(versions)
        if self.describe_collection(name).regions:
            self._delete_regions_in(name, ids)
        self._delete_in_chunks(name, ids, IDS_PER_REQUEST, "rows", _ids_expr)

    def _delete_in_chunks(
        self,
        name: str,
        items: Sequence[T],
        per_request: int,
        what: str,
        expr: Callable[[Sequence[T]], str],
    ) -> None:
        """Delete from ``name`` what ``expr`` selects of ``items``, ``per_request`` items a
        request (bounds the expression's length)."""
        for start in range(0, len(items), per_request):
            chunk = items[start : start + per_request]
            self._call(
                _Operation.DELETE,
                f"delete {what} of {len(chunk)} items from {name}",
                "delete",
                name,
                filter=expr(chunk),
            )

    def _write_tombstones(self, name: str, rows: list[dict[str, Any]]) -> None:
        companion = self._companion(name, create=True)
        assert companion is not None  # made when missing
        for start in range(0, len(rows), IDS_PER_REQUEST):
            chunk = rows[start : start + IDS_PER_REQUEST]
            self._call(
                _Operation.DELETE,
                f"write {len(chunk)} tombstones into {companion}",
                "upsert",
                companion,
                data=chunk,
            )

    # Reads ---------------------------------------------------------------------------------

    def stored_versions(
        self,
        ids: Sequence[str],
        collection: str | None = None,
        *,
        consistency: Consistency = "Strong",
    ) -> dict[str, StoredVersion]:
        """The version facts of those ids that are stored or deleted: of each, the newer of its
        row and its tombstone (``deleted=True``). Equal versions: the one written last (the
        tombstone when it was written at or after the row's ``ingested_at_ms``).

        ``Strong`` sees every write acknowledged before the call, whoever made it (and waits up
        to a time tick for it: ~0.2-0.45 s on Milvus 2.3; twice where the collection has
        tombstones, one read each). ``Session`` sees at least every write this process made to
        the collection or its tombstones (the latest of them is sent as the guarantee), at a
        fraction of the cost; other processes' recent writes may be missing.

        Raises:
            UnknownCollectionError: no such collection.
            StoreUnavailableError: Milvus is unreachable or not ready.
        """
        if not ids:
            return {}
        return self._by_name(collection, lambda name: self._versions_in(name, ids, consistency))

    def _versions_in(
        self, name: str, ids: Sequence[str], consistency: Consistency
    ) -> dict[str, StoredVersion]:
        fields = ["id", "event_version", "content_sha256", "model_version", "ingested_at_ms"]
        rows = self._query_ids(name, ids, fields, consistency, f"get versions from {name}")
        tombstones = self._read_tombstones(name, ids, consistency)
        found: dict[str, StoredVersion] = {}
        for row in rows:
            tombstone = tombstones.get(row["id"])
            version = int(row["event_version"])
            if tombstone is None or _row_wins(version, int(row["ingested_at_ms"]), tombstone):
                found[row["id"]] = StoredVersion(
                    version, str(row["content_sha256"]), str(row["model_version"])
                )
        for record_id, (version, _deleted_at_ms) in tombstones.items():
            found.setdefault(record_id, StoredVersion.tombstone(version))
        return found

    def get(
        self, ids: Sequence[str], collection: str | None = None, *, with_vectors: bool = False
    ) -> list[dict[str, Any]]:
        """Stored records by id (missing ids are left out), at the collection's default
        consistency (Bounded: a write of the last few seconds may be missing).

        Raises:
            UnknownCollectionError: no such collection.
            StoreUnavailableError: Milvus is unreachable or not ready.
        """
        fields = [*RECORD_FIELDS, VECTOR_FIELD] if with_vectors else list(RECORD_FIELDS)
        rows = self._by_name(
            collection, lambda name: self._query_ids(name, ids, fields, None, f"get from {name}")
        )
        return [dict(row) for row in rows]

    def get_record(self, record_id: str, collection: str | None = None) -> StoredRecord | None:
        """The stored record of ``record_id`` (no vector), or None when none is stored, at the
        collection's default consistency (Bounded, as :meth:`get`).

        Raises:
            UnknownCollectionError: no such collection.
            StoreUnavailableError: Milvus is unreachable or not ready.
        """
        rows = self.get([record_id], collection)
        if not rows:
            return None
        row = rows[0]
        return StoredRecord(
            id=str(row["id"]),
            metadata=dict(row.get("metadata") or {}),
            source=str(row["source"]),
            event_version=int(row["event_version"]),
            model_version=str(row["model_version"]),
            content_sha256=str(row["content_sha256"]),
            ingested_at_ms=int(row["ingested_at_ms"]),
        )

    def tombstone(self, record_id: str, collection: str | None = None) -> StoredVersion | None:
        """The tombstone kept for ``record_id`` (``deleted=True``, the delete's version), or None
        when it was never deleted; Bounded consistency, as :meth:`get`. A row stored after the
        delete (by a newer upsert) does not remove it: :meth:`get_record` says what is stored.

        Raises:
            UnknownCollectionError: no such collection.
            StoreUnavailableError: Milvus is unreachable or not ready.
        """
        found = self._by_name(
            collection, lambda name: self._read_tombstones(name, [record_id], None)
        ).get(record_id)
        return StoredVersion.tombstone(found[0]) if found else None

    def ids_matching(
        self, filter_expr: str, collection: str | None = None, *, limit: int
    ) -> list[str]:
        """The ids of up to ``limit`` stored records that match ``filter_expr`` (a Milvus
        expression, as :meth:`search` takes it), in no particular order; Strong consistency, so
        every acknowledged write counts.

        Raises:
            InvalidQueryError: the expression is blank, or Milvus refused it; ``limit`` outside
                1 to ``QUERY_LIMIT_MAX``.
            UnknownCollectionError: no such collection.
            StoreUnavailableError: Milvus is unreachable or not ready.
        """
        if not filter_expr.strip():
            raise InvalidQueryError("a filter expression is required", reason=Reason.INVALID_FILTER)
        if not 1 <= limit <= QUERY_LIMIT_MAX:
            raise InvalidQueryError(f"limit {limit} is outside 1 to {QUERY_LIMIT_MAX}")
        rows = self._by_name(
            collection,
            lambda name: self._call(
                _Operation.SEARCH,
                f"ids matching a filter in {name}",
                "query",
                name,
                filter=filter_expr,
                output_fields=["id"],
                limit=limit,
                consistency_level="Strong",
            ),
        )
        return [str(row["id"]) for row in rows]

    def _query_ids(
        self,
        name: str,
        ids: Sequence[str],
        fields: list[str],
        consistency: Consistency | None,
        what: str,
        *,
        guarantee_from: Sequence[str] = (),
        filter_expr: str | None = None,
    ) -> list[dict[str, Any]]:
        """The rows of ``ids`` in ``name``, ``IDS_PER_REQUEST`` at a time, only those matching
        ``filter_expr`` when given (a boolean expression, trusted). ``consistency`` None: the
        collection's default. A ``Session`` read waits for this process's last write to
        ``name`` or to any of ``guarantee_from``."""

        def query(client: MilvusClient) -> list[dict[str, Any]]:
            level: dict[str, Any] = {}
            if consistency is not None:
                level = {"consistency_level": consistency}
            if consistency == "Session" and guarantee_from:
                written = _last_write(client, [name, *guarantee_from])
                if written:
                    level = {"consistency_level": "Customized", "guarantee_timestamp": written}
            rows: list[dict[str, Any]] = []
            for start in range(0, len(ids), IDS_PER_REQUEST):
                expr = _ids_expr(ids[start : start + IDS_PER_REQUEST])
                if filter_expr:
                    expr = f"({expr}) and ({filter_expr})"
                rows += client.query(
                    name,
                    filter=expr,
                    output_fields=fields,
                    timeout=self._settings.timeout_s,
                    **level,
                )
            return rows

        return list(self._run(_Operation.READ, what, query)) if ids else []

    def _read_tombstones(
        self, name: str, ids: Sequence[str], consistency: Consistency | None
    ) -> dict[str, tuple[int, int]]:
        """``id -> (delete's version, deleted_at_ms)`` of the tombstones of ``ids`` in ``name``.

        A Session read of the companion also waits for this process's last write to ``name``
        itself: that write may be the one the caller relies on (``worker.versions``).
        """
        companion = self._companion(name, create=False)
        if companion is None:
            return {}
        what = f"get tombstones from {companion}"
        try:
            rows = self._query_ids(
                companion, ids, list(TOMBSTONE_FIELDS), consistency, what, guarantee_from=[name]
            )
        except UnknownCollectionError:
            # Dropped with its collection by another process since it was found, or renamed
            # with it (a migration: the caller looks the name up again): look again.
            self._still_concrete(name)
            companion = self._companion(name, create=False)
            if companion is None:
                return {}
            rows = self._query_ids(
                companion, ids, list(TOMBSTONE_FIELDS), consistency, what, guarantee_from=[name]
            )
        return {
            str(row["id"]): (int(row["event_version"]), int(row["deleted_at_ms"])) for row in rows
        }

    def _companion(self, name: str, *, create: bool) -> str | None:
        """The companion collection of ``name``'s tombstones, loaded; None when it does not
        exist, unless ``create`` (then it is made, idempotently beside other creators)."""
        companion = tombstone_collection(name)
        if companion in self._tombstones:
            return companion
        if not self._has(companion):
            # Missing because ``name`` was renamed with it since it was described (a
            # migration)? Then its tombstones are its new name's: the caller looks again.
            self._still_concrete(name)
            if not create:
                return None
            self._create_tombstones(companion)
        # Loading a loaded collection returns at once; one made elsewhere may not be loaded yet.
        self._call(_Operation.ADMIN, f"load {companion}", "load_collection", companion)
        self._tombstones.add(companion)
        return companion

    def _create_companion(self, companion: str, schema: CollectionSchema) -> None:
        """Create a companion collection; one another worker made first is no error."""
        try:
            self._call(
                _Operation.ADMIN,
                f"create collection {companion}",
                "create_collection",
                companion,
                schema=schema,
            )
        except StoreUnavailableError:
            if not self._has(companion):  # else another worker made it first
                raise

    def _create_tombstones(self, companion: str) -> None:
        self._create_companion(companion, tombstone_schema())
        index = MilvusClient.prepare_index_params()
        index.add_index(field_name=_TOMBSTONE_VECTOR, index_type="FLAT", metric_type="L2")
        # Idempotent: the same index again is no error. Any refusal of this constant index is
        # the server's state, never a record's: ADMIN makes it retriable.
        self._call(_Operation.ADMIN, f"index {companion}", "create_index", companion, index)
        logger.info("created collection %s (the tombstones of deletes)", companion)

    # Regions (issue 24) ---------------------------------------------------------------------

    def _create_regions(self, name: str, dimension: int, spec: IndexSpec) -> None:
        """Make (idempotently, beside other creators) and load ``name``'s region companion."""
        companion = region_collection(name)
        if not self._has(companion):
            self._create_companion(companion, region_schema(dimension))
        if self._vector_index(companion) is None:
            self._call(
                _Operation.INDEX,
                f"create the {spec.index_type} index of {companion}",
                "create_index",
                companion,
                _index_params(spec.model_copy(update={"search_params": {}})),
            )
            logger.info("created collection %s (region vectors)", companion)
        self._call(_Operation.ADMIN, f"load {companion}", "load_collection", companion)

    def _regions_of(self, collection: str | None) -> tuple[str, CollectionInfo]:
        """The concrete collection's name and description, once it is known to have regions.

        Raises:
            UnknownCollectionError: no such collection.
            CollectionConflictError: it was made without regions.
        """
        info = self.describe_collection(self._existing(collection))
        if not info.regions:
            raise CollectionConflictError(
                f"collection {info.name!r} was made without region vectors (chosen at creation)"
            )
        return info.name, info

    def upsert_regions(
        self,
        item_id: str,
        version: int,
        boxes: Sequence[Box],
        vectors: npt.NDArray[np.float32],
        collection: str | None = None,
    ) -> int:
        """Make ``boxes`` / ``vectors`` (one row each) the regions of ``item_id`` at
        ``version``: :meth:`upsert_regions_of` for one item.

        Raises:
            As :meth:`upsert_regions_of`.
        """
        return self.upsert_regions_of([ItemRegions(item_id, version, boxes, vectors)], collection)

    def upsert_regions_of(self, items: Sequence[ItemRegions], collection: str | None = None) -> int:
        """Make each item's boxes / vectors (one row each) its regions at its version: write
        them all (``UPSERT_CHUNK_ROWS`` rows a request), then delete the items' rows of older
        versions (one request a chunk of items). Returns how many rows were written.

        Rows of a newer version are kept (a late write of an older version never removes
        them); its own rows are garbage then, never returned (:meth:`search_regions` checks
        versions) and removed by the item's next upsert or delete. Idempotent; a failure
        between the writes and the deletes leaves both versions' rows, and the newer version's
        next write (or the item's delete) removes the older ones.

        Raises:
            InvalidRowError: an empty or too long id, a version outside 0 to 2**63 - 1, boxes
                and vectors of other counts, a vector of another dimension or not finite (nothing
                is written then).
            UnknownCollectionError: no such collection.
            CollectionConflictError: the collection was made without regions.
            StoreUnavailableError: Milvus is unreachable, throttling or timed out.
        """
        for item in items:
            validate_id(item.item_id)
        if not items:
            return 0
        name, info = self._regions_of(collection)
        rows = [
            row
            for item in items
            for row in _region_rows(
                item.item_id, item.version, item.boxes, item.vectors, info.dimension
            )
        ]
        companion = region_collection(name)
        for start in range(0, len(rows), self._chunk_rows):
            chunk = rows[start : start + self._chunk_rows]
            self._call(
                _Operation.WRITE,
                f"write {len(chunk)} regions into {companion}",
                "upsert",
                companion,
                data=chunk,
            )
        newest: dict[str, int] = {}
        for item in items:
            newest[item.item_id] = max(item.version, newest.get(item.item_id, item.version))
        self._delete_in_chunks(
            companion,
            list(newest.items()),
            _REGION_DELETES_PER_REQUEST,
            "older regions",
            lambda pairs: " or ".join(
                f"(item_id == {_quoted(item_id)} and event_version < {version})"
                for item_id, version in pairs
            ),
        )
        return len(rows)

    def delete_regions(self, ids: Sequence[str], collection: str | None = None) -> None:
        """Delete every region of the items ``ids`` (of any version).

        Raises:
            InvalidRowError: (stage ``delete``) an id empty or too long.
            UnknownCollectionError: no such collection.
            CollectionConflictError: the collection was made without regions.
            StoreUnavailableError: Milvus is unreachable, throttling or timed out.
        """
        for item_id in ids:
            validate_id(item_id, stage=Stage.DELETE)
        name, _ = self._regions_of(collection)
        self._delete_regions_in(name, ids)

    def _delete_regions_in(self, name: str, ids: Sequence[str]) -> None:
        self._delete_in_chunks(
            region_collection(name),
            list(dict.fromkeys(ids)),
            IDS_PER_REQUEST,
            "the regions",
            lambda chunk: _ids_expr(chunk, field="item_id"),
        )

    def search_regions(
        self,
        vectors: Sequence[npt.NDArray[np.float32]],
        limit: int,
        collection: str | None = None,
        *,
        filter_expr: str | None = None,
    ) -> list[RegionHit]:
        """The ``limit`` items whose regions best match any of ``vectors`` (e.g. a query
        embedded at the global and at the region size), best first, each with its best
        region's score and box; with ``filter_expr`` (a Milvus boolean expression on the
        collection's own fields, as :meth:`search` takes it, already validated), only items
        whose stored row matches it.

        Fetches ``limit * REGION_OVER_FETCH`` region hits per vector (at most
        ``QUERY_LIMIT_MAX``), keeps each item's best, then, best first, ``limit +
        REGION_CHECK_SLACK`` items a read, keeps only items whose stored row has the region's
        version (read at the collection's default consistency, as a
        whole-image search reads): a region of a replaced or deleted version is never
        returned once the replacement or delete is visible to searches.

        Raises:
            UnknownCollectionError: no such collection.
            CollectionConflictError: the collection was made without regions.
            InvalidQueryError: a vector of another dimension.
            StoreUnavailableError: Milvus is unreachable or not ready.
        """
        if not vectors or limit < 1:
            return []
        return self._by_name(
            collection,
            lambda name: self._search_regions_in(name, vectors, limit, filter_expr),
        )

    def _search_regions_in(
        self,
        name: str,
        vectors: Sequence[npt.NDArray[np.float32]],
        limit: int,
        filter_expr: str | None,
    ) -> list[RegionHit]:
        name, info = self._regions_of(name)
        queries = [_query_vector(v, name, info.dimension) for v in vectors]
        fetch = min(limit * REGION_OVER_FETCH, QUERY_LIMIT_MAX)
        companion = region_collection(name)
        results = self._call(
            _Operation.SEARCH,
            f"search {companion}",
            "search",
            companion,
            data=[q.tolist() for q in queries],
            limit=fetch,
            output_fields=list(REGION_FIELDS[1:]),
            search_params={
                "metric_type": info.index.metric,
                "params": info.index.query_params(window=fetch),
            },
        )
        higher = info.index.metric != "L2"
        best = _best_per_item(results or [], higher_is_better=higher)
        ranked = sorted(best.values(), key=lambda hit: hit.score, reverse=higher)
        # Best first, a few more than asked at a time: most candidates are current, so one
        # small read usually settles it (reading every candidate's version cost more).
        found: list[RegionHit] = []
        step = limit + REGION_CHECK_SLACK
        for start in range(0, len(ranked), step):
            chunk = ranked[start : start + step]
            current = self._current_versions(name, [hit.id for hit in chunk], filter_expr)
            found += [hit for hit in chunk if current.get(hit.id) == hit.event_version]
            if len(found) >= limit:
                break
        return found[:limit]

    def _current_versions(
        self, name: str, ids: list[str], filter_expr: str | None
    ) -> dict[str, int]:
        """``id -> event_version`` of the stored rows of ``ids`` that match ``filter_expr``
        (the collection's default consistency: what a search of it sees)."""
        rows = self._query_ids(
            name,
            ids,
            ["id", "event_version"],
            None,
            f"check region versions in {name}",
            filter_expr=filter_expr,
        )
        return {str(row["id"]): int(row["event_version"]) for row in rows}

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
        return self._by_name(
            name, lambda concrete: self._search_in(concrete, vector, top_k, filter_expr, offset)
        )

    def _search_in(
        self,
        name: str,
        vector: npt.NDArray[np.float32] | Sequence[float],
        top_k: int,
        filter_expr: str | None,
        offset: int,
    ) -> list[Hit]:
        info = self.describe_collection(name)
        query = _query_vector(vector, name, info.dimension)
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
            search_params={
                "metric_type": info.index.metric,
                "params": info.index.query_params(window=top_k + offset),
            },
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
    dimension: int,
    *,
    description: str = "",
    model_tag: str = "",
    model_name: str = "",
    regions: bool = False,
) -> CollectionSchema:
    """The schema of the store's collections: the fields of :class:`VectorRecord`, no dynamic
    field, and in its description (JSON) the collection's own description and the name and tag
    of the model it is bound to (its dimension is the vector field's), and ``"regions": true``
    for a collection with region vectors."""
    bound: dict[str, Any] = {
        "description": description,
        "model_tag": model_tag,
        "model_name": model_name,
    }
    if regions:
        bound["regions"] = True
    schema = MilvusClient.create_schema(
        auto_id=False,
        enable_dynamic_field=False,
        # The model rides in the description so that stats, the query API and the workers
        # can read it on any server (Milvus has no other per-collection property we can rely on).
        description=orjson.dumps(bound).decode(),
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


def region_schema(dimension: int) -> CollectionSchema:
    """The schema of a companion collection of region vectors (see ``REGION_SUFFIX``)."""
    schema = MilvusClient.create_schema(
        auto_id=False,
        enable_dynamic_field=False,
        description="trident: the region vectors of the items of the collection of that name",
    )
    schema.add_field(
        "id", DataType.VARCHAR, is_primary=True, max_length=ID_MAX_LENGTH + _REGION_ID_EXTRA
    )
    schema.add_field("item_id", DataType.VARCHAR, max_length=ID_MAX_LENGTH)
    schema.add_field("event_version", DataType.INT64)
    for field in _REGION_BOX:
        schema.add_field(field, DataType.FLOAT)
    schema.add_field(VECTOR_FIELD, DataType.FLOAT_VECTOR, dim=dimension)
    return schema


def _region_rows(
    item_id: str,
    version: int,
    boxes: Sequence[Box],
    vectors: npt.NDArray[np.float32],
    dimension: int,
) -> list[dict[str, Any]]:
    """The companion's rows of one item's regions.

    Raises:
        InvalidRowError: counts, dimension, finiteness or version out of range.
    """
    matrix = np.asarray(vectors, dtype=np.float32)
    problem = None
    if not 0 <= version <= VERSION_MAX:
        problem = (Reason.ROW_REJECTED, f"version {version} is outside 0 to 2**63 - 1")
    elif matrix.ndim != 2 or matrix.shape != (len(boxes), dimension):
        problem = (
            Reason.WRONG_DIMENSION,
            f"{len(boxes)} boxes need vectors [{len(boxes)}, {dimension}], got {matrix.shape}",
        )
    elif not np.isfinite(matrix).all():
        problem = (Reason.NOT_FINITE, "a region vector is not finite")
    if problem is not None:
        reason, detail = problem
        raise InvalidRowError(
            f"regions of {item_id[:80]!r}: {detail}", reason=reason, stage=Stage.UPSERT
        )
    return [
        {
            "id": f"{version}:{index}:{item_id}",
            "item_id": item_id,
            "event_version": version,
            **dict(zip(_REGION_BOX, (float(c) for c in box), strict=True)),
            VECTOR_FIELD: row.tolist(),
        }
        for index, (box, row) in enumerate(zip(boxes, matrix, strict=True))
    ]


def _regions_of_record(
    record: VectorRecord,
) -> tuple[str, int, Sequence[Box], npt.NDArray[np.float32]]:
    """What :func:`_region_rows` checks of a record's regions, as of the record's id and
    version (regions of another item or version are refused as the record's)."""
    regions = record.regions
    assert regions is not None
    if (regions.item_id, regions.version) != (record.id, record.event_version):
        raise InvalidRowError(
            f"row {record.id[:80]!r}: its regions are of {regions.item_id[:80]!r} at version "
            f"{regions.version}, not of the row's version {record.event_version}",
            reason=Reason.ROW_REJECTED,
            stage=Stage.UPSERT,
        )
    return record.id, record.event_version, regions.boxes, regions.vectors


def _best_per_item(results: Sequence[Any], *, higher_is_better: bool) -> dict[str, RegionHit]:
    """Each item's best region hit over every query vector's hits (of one version: the best
    one's; the version check keeps or drops it)."""
    best: dict[str, RegionHit] = {}
    for per_query in results:
        for found in per_query:
            entity = dict(found.get("entity", {}))
            item = str(entity["item_id"])
            score = float(found["distance"])
            kept = best.get(item)
            if kept is not None and (
                score <= kept.score if higher_is_better else score >= kept.score
            ):
                continue
            box = tuple(round(float(entity[f]), 6) for f in _REGION_BOX)
            best[item] = RegionHit(
                item, score, (box[0], box[1], box[2], box[3]), int(entity["event_version"])
            )
    return best


def _records_regions(text: str) -> bool:
    """Whether a collection's description records region vectors (``collection_schema``)."""
    try:
        parsed = orjson.loads(text) if text.startswith("{") else None
    except orjson.JSONDecodeError:
        return False
    return isinstance(parsed, dict) and parsed.get("regions") is True


def _quoted(value: str) -> str:
    # JSON-quoted, as _ids_expr writes ids: Milvus's parser reads the same escapes.
    return orjson.dumps(value).decode()


def tombstone_schema() -> CollectionSchema:
    """The schema of a companion collection of tombstones (see the module docstring)."""
    schema = MilvusClient.create_schema(
        auto_id=False,
        enable_dynamic_field=False,
        description="trident: the tombstones of deletes from the collection of that name",
    )
    schema.add_field("id", DataType.VARCHAR, is_primary=True, max_length=ID_MAX_LENGTH)
    schema.add_field("event_version", DataType.INT64)
    schema.add_field("deleted_at_ms", DataType.INT64)
    schema.add_field(_TOMBSTONE_VECTOR, DataType.FLOAT_VECTOR, dim=_TOMBSTONE_DIM)
    return schema


def _companion_name(name: str, suffix: str) -> str:
    """``name + suffix``, or, where that would exceed Milvus's 255 characters, a prefix of
    ``name`` and a digest of all of it before the suffix."""
    companion = name + suffix
    if len(companion) <= _COLLECTION_NAME_MAX:
        return companion
    digest = hashlib.sha256(name.encode()).hexdigest()[:16]
    keep = _COLLECTION_NAME_MAX - len(suffix) - len(digest) - 1
    return f"{name[:keep]}_{digest}{suffix}"


def tombstone_collection(name: str) -> str:
    """The name of the companion collection that keeps the tombstones of collection ``name``:
    ``name + TOMBSTONE_SUFFIX`` (shortened as :func:`_companion_name` says)."""
    return _companion_name(name, TOMBSTONE_SUFFIX)


def region_collection(name: str) -> str:
    """The name of the companion collection that keeps the region vectors of collection
    ``name``: ``name + REGION_SUFFIX`` (shortened as :func:`_companion_name` says)."""
    return _companion_name(name, REGION_SUFFIX)


def is_tombstone_collection(name: str) -> bool:
    """Whether ``name`` is (reserved for) a companion collection of tombstones."""
    return name.endswith(TOMBSTONE_SUFFIX)


def is_companion_collection(name: str) -> bool:
    """Whether ``name`` is (reserved for) a companion collection: tombstones or regions."""
    return name.endswith(COMPANION_SUFFIXES)


def validate_id(record_id: str, *, stage: Stage = Stage.UPSERT) -> None:
    """Check that an id fits the primary key (before it is even looked up).

    Raises:
        InvalidRowError: empty (``empty_id``), or over ``ID_MAX_LENGTH`` UTF-8 bytes
            (``id_too_long``), charged to ``stage``.
    """
    size = len(record_id.encode("utf-8", errors="surrogatepass"))
    if size == 0:
        raise InvalidRowError("empty id", reason=Reason.EMPTY_ID, stage=stage)
    if size > ID_MAX_LENGTH:
        raise InvalidRowError(
            f"id {record_id[:40]!r}... is {size} UTF-8 bytes; the store holds {ID_MAX_LENGTH}",
            reason=Reason.ID_TOO_LONG,
            stage=stage,
        )


def _query_vector(
    vector: npt.NDArray[np.float32] | Sequence[float], name: str, dimension: int
) -> npt.NDArray[np.float32]:
    """``vector`` as a flat float32 array of collection ``name``'s ``dimension``.

    Raises:
        InvalidQueryError: (``wrong_dimension``) another number of dimensions.
    """
    query = np.asarray(vector, dtype=np.float32).reshape(-1)
    if query.shape[0] != dimension:
        raise InvalidQueryError(
            f"vector has {query.shape[0]} dimensions; collection {name!r} holds {dimension}",
            reason=Reason.WRONG_DIMENSION,
            stage=Stage.SEARCH,
        )
    return query


def _ids_expr(ids: Sequence[str], field: str = "id") -> str:
    """``<field> in [...]`` with each id JSON-quoted (module docstring): never pymilvus's own
    ``ids=``, which quotes without escaping (an id ``a','b`` would name ``a`` and ``b``)."""
    return f"{field} in [{', '.join(map(_quoted, ids))}]"


def _row_wins(row_version: int, ingested_at_ms: int, tombstone: tuple[int, int]) -> bool:
    """Whether a row outranks the tombstone of its id: a newer version, or the same version
    written after the delete (an upsert equal to a delete and later than it is not stale)."""
    version, deleted_at_ms = tombstone
    return row_version > version or (row_version == version and ingested_at_ms > deleted_at_ms)


def _last_write(client: MilvusClient, names: Sequence[str]) -> int:
    """The timestamp of this process's last write to any of ``names`` (0: none), as pymilvus
    keeps it for its Session reads (the same internals as ``_pipeline``)."""
    handler = client._get_connection()
    database = client._generate_call_context().get_db_name()
    return max(
        (ts_utils.get_collection_ts(name, handler.server_address, database) or 0 for name in names),
        default=0,
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


def _index_params(spec: IndexSpec) -> Any:
    """pymilvus's index parameters for the vector field."""
    index = MilvusClient.prepare_index_params()
    # Build parameters nested under "params": milvus-lite ignores the flat form.
    build = spec.build_params()
    index.add_index(
        field_name=VECTOR_FIELD,
        index_type=spec.index_type,
        metric_type=spec.metric,
        params={"params": build} if build else {},
    )
    return index


def _kind_of(exc: BaseException, operation: _Operation) -> _Kind:
    """What a failure of a call says, by its codes (see the constants above)."""
    status = _grpc_status(exc)
    if status is grpc.StatusCode.UNAUTHENTICATED:
        return _Kind.UNAUTHENTICATED
    if status is grpc.StatusCode.PERMISSION_DENIED:
        return _Kind.NOT_PERMITTED
    if status is not None or not isinstance(exc, MilvusException):
        return _Kind.UNAVAILABLE  # the channel, the connection or a deadline
    if isinstance(exc, _INVALID_DATA_ERRORS):
        return _Kind.BAD_VALUES
    code = exc.code if isinstance(exc.code, int) else None
    if code is not None and code not in _NO_CODE:
        return _kind_of_code(code)
    legacy = exc.compatible_code
    if legacy in _LEGACY_NOT_FOUND:
        return _Kind.NO_COLLECTION
    if legacy in _LEGACY_UNAVAILABLE:
        return _Kind.UNAVAILABLE
    if legacy in _LEGACY_INVALID:
        return _Kind.BAD_VALUES
    # The last resort: no code says anything, the message may.
    words = str(exc.message).lower()
    if any(word in words for word in _TRANSIENT_WORDS):
        return _Kind.UNAVAILABLE
    if operation in _WRITES and any(word in words for word in _REFUSED_ROW_WORDS):
        return _Kind.BAD_VALUES
    return _Kind.REFUSED


def _kind_of_code(code: int) -> _Kind:
    if code == _COLLECTION_NOT_FOUND:
        return _Kind.NO_COLLECTION
    if code in _AUTHENTICATION_CODES:
        return _Kind.UNAUTHENTICATED
    if code == _NOT_PERMITTED:
        return _Kind.NOT_PERMITTED
    if code in _INVALID_PARAMETER_CODES:
        return _Kind.BAD_VALUES
    if code in _UNAVAILABLE_CODES:
        return _Kind.UNAVAILABLE
    return _Kind.REFUSED


def _grpc_status(exc: BaseException) -> grpc.StatusCode | None:
    """The gRPC status of a failed call: a gRPC error's own, or the one pymilvus put in its
    error's code (a retry that timed out) or chained under it (it could not connect)."""
    link: BaseException | None = exc
    while link is not None:
        code = getattr(link, "code", None)
        if isinstance(link, grpc.RpcError) and callable(code):
            status = code()
            return status if isinstance(status, grpc.StatusCode) else None
        if isinstance(code, grpc.StatusCode):
            return code
        # pymilvus raises ``e from e``: an error can be its own cause.
        link = link.__cause__ if link.__cause__ is not link else None
    return None


def _auth_detail(exc: BaseException) -> str:
    """The server's reason for refusing the credentials (pymilvus's own message around it says
    "server unavailable", whatever the reason)."""
    link: BaseException | None = exc
    while link is not None:
        if isinstance(link, grpc.RpcError) and callable(getattr(link, "details", None)):
            return str(link.details())
        link = link.__cause__
    return _detail(exc)


def _detail(exc: BaseException) -> str:
    """What went wrong, in the server's words (no Python class names)."""
    if isinstance(exc, MilvusException):
        cause = exc.__cause__
        if isinstance(cause, grpc.RpcError) and callable(getattr(cause, "details", None)):
            return f"{exc.message} ({cause.details()})"
        return f"{exc.message} (code {exc.code})"
    if isinstance(exc, grpc.RpcError) and callable(getattr(exc, "details", None)):
        return f"{exc.details()} ({_grpc_status(exc)})"
    return str(exc) or type(exc).__name__


def _close_quietly(client: MilvusClient) -> None:
    try:
        client.close()
    except Exception as exc:  # closing a dead channel may fail; nothing is lost
        logger.debug("closing Milvus client failed: %s", exc)


def version_collection(alias: str, number: int) -> str:
    """The concrete collection of version ``number`` of the alias ``alias``: ``<alias>_v<N>``."""
    return f"{alias}{_VERSION_INFIX}{number}"


def version_number(alias: str, name: str) -> int | None:
    """The version number ``name`` has as a version of ``alias`` (``images_v2``: 2), or None."""
    prefix = alias + _VERSION_INFIX
    rest = name[len(prefix) :] if name.startswith(prefix) else ""
    return int(rest) if rest.isdigit() and not rest.startswith("0") else None
