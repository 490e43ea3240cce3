"""Bodies of the query API's other routes: collections, insert, embed, health and errors.

The field names of :class:`CreateCollectionRequest` (``name``, ``dim``, ``description``) and
:class:`InsertRequest` (``inputs``, ``ids``, ``metadata``, ``collection_name``) are the earlier
API's and stay as they are.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from schemas.search import CollectionName

MAX_INSERT_ITEMS = 1000
# The index types and metrics a collection can be created with. The contracts import nothing of
# the engine, so the names are here; engine.indexes reads them and holds each type's parameters
# and their ranges (the one place for those).
IndexType = Literal["FLAT", "IVF_FLAT", "HNSW"]
Metric = Literal["COSINE", "IP", "L2"]


class CreateCollectionRequest(BaseModel):
    """A new collection: its dimension (default: the model's), metric and index."""

    model_config = ConfigDict(extra="forbid")

    name: CollectionName
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


class IndexDescription(BaseModel):
    index_type: str
    metric: str
    params: dict[str, int]
    search_params: dict[str, int]


class CollectionStats(BaseModel):
    name: str
    row_count: int
    dimension: int
    index: IndexDescription
    description: str
    model_tag: str


class CollectionList(BaseModel):
    collections: list[str]
    default: str = Field(description="The collection searched when none is named.")


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


class InsertAccepted(BaseModel):
    """The events were published; the worker ingests them asynchronously."""

    ids: list[str]
    collection: str
    status: Literal["accepted"] = "accepted"


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
