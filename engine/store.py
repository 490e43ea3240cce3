"""Milvus adapter: collections, upserts, lookups and similarity search.

Owns pymilvus's errors: connection failures, timeouts, "not ready" and rate limiting become
:class:`StoreUnavailableError` (retriable); a search the server refuses as invalid (bad filter,
wrong dimension, missing collection) becomes :class:`InvalidQueryError`.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt
import orjson
from pymilvus import DataType, MilvusClient
from pymilvus.exceptions import MilvusException

from engine.errors import InvalidQueryError, Stage, StoreUnavailableError, UnknownCollectionError
from engine.indexes import IndexSpec
from engine.settings import MilvusSettings

logger = logging.getLogger(__name__)

VECTOR_FIELD = "embedding"
# Scalar fields stored beside each vector (see VectorRecord).
RECORD_FIELDS = (
    "id",
    "metadata",
    "source",
    "content_sha256",
    "model_version",
    "event_version",
    "ingested_at_ms",
)
ID_MAX_LENGTH = 256
SOURCE_MAX_LENGTH = 2048

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


@dataclass(frozen=True, slots=True)
class VectorRecord:
    """One stored embedding with what it was made from."""

    id: str
    vector: npt.NDArray[np.float32]
    metadata: dict[str, Any] = field(default_factory=dict)
    source: str = ""
    content_sha256: str = ""
    model_version: str = ""
    event_version: int = 0
    ingested_at_ms: int = 0

    def to_row(self) -> dict[str, Any]:
        return {
            "id": self.id,
            VECTOR_FIELD: self.vector.astype(np.float32).tolist(),
            "metadata": self.metadata,
            "source": self.source[:SOURCE_MAX_LENGTH],
            "content_sha256": self.content_sha256,
            "model_version": self.model_version,
            "event_version": self.event_version,
            "ingested_at_ms": self.ingested_at_ms,
        }


@dataclass(frozen=True, slots=True)
class StoredVersion:
    """What the stale-version guard and the inference skip need to know of a stored record."""

    event_version: int
    content_sha256: str
    model_version: str


@dataclass(frozen=True, slots=True)
class Hit:
    id: str
    score: float
    metadata: dict[str, Any]
    fields: dict[str, Any]


@dataclass(frozen=True, slots=True)
class CollectionInfo:
    """What a collection was created with."""

    name: str
    dimension: int
    index: IndexSpec
    description: str = ""
    model_tag: str = ""


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

    Thread-safe for concurrent calls (pymilvus clients are); the connection is opened lazily
    and reopened after a connection failure, so a store outlives a Milvus restart.
    """

    def __init__(self, settings: MilvusSettings) -> None:
        self._settings = settings
        self._client: MilvusClient | None = None
        self._lock = threading.Lock()
        self._collections: dict[str, CollectionInfo] = {}

    @property
    def default_collection(self) -> str:
        return self._settings.collection

    def close(self) -> None:
        with self._lock:
            if self._client is not None:
                try:
                    self._client.close()
                except Exception as exc:
                    logger.debug("closing Milvus client failed: %s", exc)
                self._client = None
            self._collections.clear()

    def _connect(self) -> MilvusClient:
        with self._lock:
            if self._client is None:
                self._client = MilvusClient(
                    uri=self._settings.uri,
                    token=self._settings.token,
                    timeout=self._settings.timeout_s,
                    # pymilvus 2.5 shares one connection per address unless told otherwise,
                    # and close() then disconnects every other store on it (2.6 counts users).
                    alias=f"trident-{uuid.uuid4().hex}",
                )
            return self._client

    def _call(self, stage: Stage, what: str, method: str, *args: Any, **kwargs: Any) -> Any:
        """Run one client call, translating pymilvus and gRPC errors into ours."""
        try:
            client = self._connect()
            kwargs.setdefault("timeout", self._settings.timeout_s)
            return getattr(client, method)(*args, **kwargs)
        except (MilvusException, grpc.RpcError, OSError, TimeoutError) as exc:
            raise self._translate(exc, stage, what) from exc

    def _translate(self, exc: BaseException, stage: Stage, what: str) -> Exception:
        text = f"Milvus {self._settings.uri}: {what} failed: {exc}"
        lowered = str(exc).lower()
        transient = (
            not isinstance(exc, MilvusException)
            or any(marker in lowered for marker in _TRANSIENT_MARKERS)
            or stage is not Stage.SEARCH
        )
        if transient:
            # The channel may be dead (server restarted): reconnect on the next call.
            self.close()
            return StoreUnavailableError(text, stage=stage)
        return InvalidQueryError(text, stage=stage)

    # Collections ---------------------------------------------------------------------------

    def collection_exists(self, name: str) -> bool:
        """Whether the collection exists (a read: it never creates one).

        Raises:
            StoreUnavailableError: Milvus is unreachable or not ready.
        """
        return bool(self._call(Stage.SEARCH, f"has_collection {name}", "has_collection", name))

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
        self._call(Stage.UPSERT, f"load {name}", "load_collection", name)
        self._collections.pop(name, None)
        return created

    def _create(
        self, name: str, dimension: int, spec: IndexSpec, description: str, model_tag: str
    ) -> None:
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
        schema.add_field("model_version", DataType.VARCHAR, max_length=128)
        schema.add_field("event_version", DataType.INT64)
        schema.add_field("ingested_at_ms", DataType.INT64)
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
                Stage.UPSERT,
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
            raise UnknownCollectionError(f"no collection named {name!r}", stage=Stage.SEARCH)
        described = self._call(Stage.SEARCH, f"describe {name}", "describe_collection", name)
        dimension = next(
            int(f.get("params", {}).get("dim", 0))
            for f in described.get("fields", [])
            if f.get("name") == VECTOR_FIELD
        )
        index = self._call(
            Stage.SEARCH,
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
            **_description_of(str(described.get("description", ""))),
        )
        self._collections[name] = info
        return info

    def list_collections(self) -> list[str]:
        return sorted(self._call(Stage.SEARCH, "list collections", "list_collections"))

    def drop_collection(self, name: str) -> None:
        """Drop a collection and its data.

        Raises:
            UnknownCollectionError: no such collection.
            StoreUnavailableError: Milvus is unreachable or not ready.
        """
        if not self.collection_exists(name):
            raise UnknownCollectionError(f"no collection named {name!r}", stage=Stage.UPSERT)
        self._call(Stage.UPSERT, f"drop {name}", "drop_collection", name)
        self._collections.pop(name, None)

    def count(self, collection: str | None = None) -> int:
        """Exact row count (strong consistency: includes rows written just now).

        Raises:
            UnknownCollectionError: no such collection.
            StoreUnavailableError: Milvus is unreachable or not ready.
        """
        name = self._existing(collection)
        rows = self._call(
            Stage.SEARCH,
            f"count {name}",
            "query",
            name,
            filter="",
            output_fields=["count(*)"],
            consistency_level="Strong",
        )
        return int(rows[0]["count(*)"]) if rows else 0

    def _existing(self, collection: str | None) -> str:
        """The collection's name, once it is known to exist (a read never creates one)."""
        name = collection or self._settings.collection
        self.describe_collection(name)
        return name

    # Writes --------------------------------------------------------------------------------

    def upsert(self, records: Sequence[VectorRecord], collection: str | None = None) -> int:
        """Insert or replace records by id; return how many were written.

        Raises:
            StoreUnavailableError: Milvus is unreachable, throttling, or refused the write.
        """
        if not records:
            return 0
        name = self._existing(collection)
        self._call(
            Stage.UPSERT,
            f"upsert {len(records)} rows into {name}",
            "upsert",
            name,
            data=[record.to_row() for record in records],
        )
        return len(records)

    def delete(self, ids: Sequence[str], collection: str | None = None) -> None:
        name = self._existing(collection)
        self._call(Stage.UPSERT, f"delete from {name}", "delete", name, ids=list(ids))

    # Reads ---------------------------------------------------------------------------------

    def stored_versions(
        self, ids: Sequence[str], collection: str | None = None
    ) -> dict[str, StoredVersion]:
        """The version facts of those ids that are stored (strongly consistent read)."""
        if not ids:
            return {}
        name = self._existing(collection)
        rows = self._call(
            Stage.UPSERT,
            f"get versions from {name}",
            "get",
            name,
            ids=list(ids),
            output_fields=["id", "event_version", "content_sha256", "model_version"],
            consistency_level="Strong",
        )
        return {
            row["id"]: StoredVersion(
                int(row["event_version"]), str(row["content_sha256"]), str(row["model_version"])
            )
            for row in rows
        }

    def get(
        self, ids: Sequence[str], collection: str | None = None, *, with_vectors: bool = False
    ) -> list[dict[str, Any]]:
        """Stored records by id (missing ids are left out)."""
        name = self._existing(collection)
        fields = [*RECORD_FIELDS, VECTOR_FIELD] if with_vectors else list(RECORD_FIELDS)
        rows = self._call(
            Stage.SEARCH, f"get from {name}", "get", name, ids=list(ids), output_fields=fields
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
                reason="wrong_dimension",
                stage=Stage.SEARCH,
            )
        results = self._call(
            Stage.SEARCH,
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
