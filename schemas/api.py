"""Bodies of the query API's other routes: collections, insert, items (record, deletes,
status), embed, health and errors.

The field names of :class:`CreateCollectionRequest` (``name``, ``dim``, ``description``) and
:class:`InsertRequest` (``inputs``, ``ids``, ``metadata``, ``collection_name``) are the earlier
API's and stay as they are. :class:`ItemStatus` is also what ``trident-dlq status`` prints
(``producer.status`` builds it).
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from schemas.search import MAX_FILTER_LENGTH, CollectionName, Filter

MAX_INSERT_ITEMS = 1000
# Deletes of one POST /items/delete: the default cap of a filter's matches, and the hard maximum
# of the cap and of a list of ids (Milvus answers up to 16,384 ids a query).
DEFAULT_DELETE_CAP = 1000
MAX_DELETE_ITEMS = 10_000
DELETE_SELECTION = (
    "give exactly one of ids (a list of item ids), filter (a structured metadata filter) or "
    "filter_expr (a Milvus expression)"
)
# What an item id is on the wire: the event contract checks its UTF-8 size (256 bytes).
ItemId = Annotated[str, Field(min_length=1, max_length=256)]
# The index types and metrics a collection can be created with. The contracts import nothing of
# the engine, so the names are here; engine.indexes reads them and holds each type's parameters
# and their ranges (the one place for those).
IndexType = Literal["FLAT", "IVF_FLAT", "HNSW"]
Metric = Literal["COSINE", "IP", "L2"]


class CreateCollectionRequest(BaseModel):
    """A new collection: the model it is bound to (default: the API's configured model), its
    dimension (default: the model's; when given it must be the model's), metric and index."""

    model_config = ConfigDict(extra="forbid")

    name: CollectionName
    model: str | None = Field(
        default=None,
        min_length=1,
        max_length=256,
        description="A model of the registry (trident-models list); default: the configured one. "
        "The collection holds that model's vectors: workers of another model refuse to write "
        "into it, and searches by image embed with it.",
    )
    dim: int | None = Field(default=None, ge=2, le=32_768)
    description: str = Field(default="", max_length=1024)
    metric: Metric = "COSINE"
    index_type: IndexType = "HNSW"
    # Checked against the index type's parameters and ranges by the service (engine.indexes).
    params: dict[str, int] = Field(
        default_factory=dict, description="Build parameters: HNSW M, efConstruction; IVF nlist."
    )
    search_params: dict[str, int] = Field(
        default_factory=dict, description="Search parameters: HNSW ef; IVF_FLAT nprobe."
    )
    regions: bool = Field(
        default=False,
        description="Also store a vector per region of each image (the model's region recipe: "
        "16 windows of 0.4 x 0.4 for Lite0 uint8), so that a search by a part of an image "
        "finds the image and says where (each hit's box). Chosen at creation; the model must "
        "have a region recipe (the default, Lite0 uint8, has).",
    )


class IndexDescription(BaseModel):
    index_type: str
    metric: str
    params: dict[str, int]
    search_params: dict[str, int]


class CollectionModel(BaseModel):
    """The model a collection is bound to: its vectors are that model's."""

    name: str = Field(description="The model's registry name (Triton's).")
    tag: str = Field(description="Its version tag, stored with every vector.")
    dim: int = Field(description="The collection's vector dimension (the model's output).")


class CollectionStats(BaseModel):
    name: str
    row_count: int
    dimension: int
    index: IndexDescription
    description: str
    model_tag: str
    model: CollectionModel = Field(description="The model it is bound to.")
    regions: bool = Field(
        default=False, description="Made with region vectors: searches by image answer boxes."
    )
    alias_of: str | None = Field(
        default=None,
        exclude_if=lambda value: value is None,  # left out for a collection: as it was
        description="When name is an alias: the collection it points at, whose figures these are.",
    )


class CollectionList(BaseModel):
    collections: list[str]
    default: str = Field(description="The collection searched when none is named.")
    models: dict[str, CollectionModel] = Field(
        default_factory=dict,
        description="Each collection's model, by collection name (collections made elsewhere, "
        "whose model cannot be told, are left out).",
    )
    aliases: dict[str, str] = Field(
        default_factory=dict,
        description="Each alias and the collection it points at (a rebuilt collection's name is "
        "an alias: trident-reembed).",
    )


class CollectionCreated(BaseModel):
    name: str
    created: bool = Field(description="False when a collection of that name already existed.")


class InsertRequest(BaseModel):
    """Images to ingest: paths (under the allowed roots) or http(s) URLs, with optional ids and
    per-image metadata (both lists as long as ``inputs``)."""

    model_config = ConfigDict(extra="forbid")

    inputs: list[str] = Field(min_length=1, max_length=MAX_INSERT_ITEMS)
    ids: list[str] | None = None
    metadata: list[dict[str, Any]] | None = None
    collection_name: CollectionName | None = None

    @model_validator(mode="after")
    def _lists_line_up(self) -> InsertRequest:
        for name in ("ids", "metadata"):
            given = getattr(self, name)
            if given is not None and len(given) != len(self.inputs):
                raise ValueError(f"{name} has {len(given)} entries for {len(self.inputs)} inputs")
        if self.ids is not None and len(set(self.ids)) != len(self.ids):
            raise ValueError("ids must be unique")
        return self


class Published(BaseModel):
    """Where one event went: its partition of the ingest topic and its offset there."""

    id: str
    partition: int
    offset: int


class InsertAccepted(BaseModel):
    """The events were published; the worker ingests them asynchronously."""

    ids: list[str]
    collection: str
    status: Literal["accepted"] = "accepted"
    items: list[Published] = Field(
        default_factory=list, description="Per input, in order: where its event went."
    )


# Items ------------------------------------------------------------------------------------------


class ItemRecord(BaseModel):
    """A stored item, as the store holds it (its vector left out)."""

    id: str
    collection: str
    metadata: dict[str, Any]
    source: str = Field(description="Where the image came from: a path or URL.")
    version: int = Field(description="The version of the event that stored it.")
    model_tag: str = Field(description="The model that made its vector.")
    content_sha256: str = Field(description="SHA-256 of the image bytes, hex.")
    stored_at: datetime = Field(description="When a worker stored it (UTC).")
    stored_in: str | None = Field(
        default=None,
        # Left out unless set: the record of an item named by its collection is as it was.
        exclude_if=lambda value: value is None,
        description="When the collection named is an alias: the collection it points at, "
        "which holds the item.",
    )


class DeletePublished(BaseModel):
    """A delete (a tombstone on the ingest topic) was published; a worker applies it."""

    id: str
    collection: str
    version: int = Field(description="The delete's version: no older upsert brings the id back.")
    partition: int
    offset: int


class DeleteItemsRequest(BaseModel):
    """Delete items by ``ids``, or every item a ``filter`` or ``filter_expr`` matches (the
    search's filters), up to ``max_items``; ``dry_run`` says what would be deleted."""

    model_config = ConfigDict(extra="forbid")

    collection_name: CollectionName | None = None
    ids: list[ItemId] | None = Field(default=None, min_length=1, max_length=MAX_DELETE_ITEMS)
    filter: Filter | None = Field(default=None, description="A structured metadata filter.")
    filter_expr: str | None = Field(
        default=None,
        min_length=1,
        max_length=MAX_FILTER_LENGTH,
        description='A raw Milvus boolean expression, e.g. metadata["category"] == "nature".',
    )
    dry_run: bool = Field(default=False, description="Say what would be deleted; publish nothing.")
    max_items: int = Field(
        default=DEFAULT_DELETE_CAP,
        ge=1,
        le=MAX_DELETE_ITEMS,
        description="The most items a filter may delete: a filter matching more is refused "
        "(422 too_many_matches) unless dry_run.",
    )

    @model_validator(mode="after")
    def _exactly_one_selection(self) -> DeleteItemsRequest:
        given = [
            name for name in ("ids", "filter", "filter_expr") if getattr(self, name) is not None
        ]
        if len(given) != 1:
            raise ValueError(DELETE_SELECTION + (f"; got {', '.join(given)}" if given else ""))
        return self


class DeleteItemsResult(BaseModel):
    """What a ``POST /items/delete`` deleted, or (``dry_run``) would delete."""

    collection: str
    dry_run: bool
    matched: int = Field(description="The ids named, or matched by the filter (at most max_items).")
    truncated: bool = Field(
        description="The filter matches more than max_items (only a dry run answers then): "
        "ids lists the first max_items."
    )
    ids: list[str]
    published: int = Field(description="Deletes published (0 on a dry run).")
    items: list[DeletePublished] = Field(
        default_factory=list, description="Where each delete went (empty on a dry run)."
    )


ItemState = Literal["stored", "pending", "dead_lettered", "deleted", "unknown"]
Operation = Literal["upsert", "delete"]


class StoredFact(BaseModel):
    """What the store holds of the id: its row, or the tombstone of a delete newer than it."""

    version: int
    deleted: bool


class PendingRecord(BaseModel):
    """The newest record of the id that the workers have not processed, on the ingest topic or
    on the retry topic (re-queued by a worker, or replayed from the dead letters)."""

    operation: Operation
    version: int | None = Field(description="None when the record cannot be read as an event.")
    topic: str = Field(description="The ingest topic, or the retry topic.")
    partition: int
    offset: int
    published_at: datetime | None = Field(None, description="The record's Kafka timestamp.")


class DeadLetterSummary(BaseModel):
    """The newest dead letter of the id: why and when its record was given up on."""

    operation: Operation
    version: int | None = Field(description="None when the record cannot be read as an event.")
    stage: str
    reason: str
    detail: str = Field(description="The error's message (at most 1,000 characters).")
    dead_lettered_at: datetime | None
    partition: int = Field(description="Where the dead letter is on the dead-letter topic.")
    offset: int


class ItemStatus(BaseModel):
    """Where an item is: ``stored`` (with its version), ``pending`` (published, not yet
    processed), ``dead_lettered`` (stage, reason, when), ``deleted`` or ``unknown``.

    The newest version decides among what the store holds and the newest dead letter (the store
    on a tie); a pending record decides when it is newer than both (or cannot be read), or when
    it ties with a dead letter it was published after (a replay waiting on the retry topic).
    """

    id: str
    collection: str
    state: ItemState
    version: int | None = Field(description="The version of what decided the state.")
    stored: StoredFact | None = None
    pending: PendingRecord | None = None
    dead_letter: DeadLetterSummary | None = None
    complete: bool = Field(
        default=True,
        description="False when the deadline cut the search short (a pending record or a dead "
        "letter may have been missed): ask again.",
    )


class EmbedRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    query_input: str = Field(min_length=1, max_length=2048, description="A path or http(s) URL.")


class Embedding(BaseModel):
    embedding: list[float]
    dim: int
    model: str


class ServiceState(BaseModel):
    state: Literal["up", "down"]
    detail: str = ""


class HealthReport(BaseModel):
    status: Literal["ok", "degraded"]
    triton: ServiceState
    milvus: ServiceState
    kafka: ServiceState


class ErrorBody(BaseModel):
    """Every error the API answers, whatever its status."""

    error: str = Field(description="A short machine-readable reason code.")
    detail: str = Field(description="What went wrong, for a human.")
