"""Search request and response contracts of the query API.

A search names exactly one query (``query_input``, ``vector`` or ``id``; an uploaded image
comes as a multipart form, ``query_api.routes.SearchUpload``, with the same
:class:`SearchOptions`), how many hits (``topk``, bounded, with ``offset`` for paging) and
optionally which hits: a raw Milvus ``filter_expr`` (the earlier API's field) and/or a structured
:data:`Filter` that the API compiles so that no value can inject syntax.

A :data:`Filter` is validated as the one kind its keys name (``and``, ``or``, ``not``, else a
field condition), so a malformed one is reported against that kind alone; the kinds' labels in
an error's location are in angle brackets (``<condition>``), which the API leaves out.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    field_validator,
    model_validator,
)

# The one collection-name rule (what Milvus accepts): searches, ingest events, the store and the
# earlier pipeline's API all check names against it.
COLLECTION_NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]{0,254}$"
MAX_TOPK = 1000
# Milvus refuses offset + limit above 16384.
MAX_RESULT_WINDOW = 16_384
MAX_FILTER_LENGTH = 4096

CollectionName = Annotated[str, Field(pattern=COLLECTION_NAME_PATTERN)]
# Where in a stored image a hit matched: normalised (x0, y0, x1, y1), 0-1, left/top first.
HitBox = tuple[float, float, float, float]
# Extra stored fields a hit may carry besides id, score, metadata and source.
OutputField = Literal["content_sha256", "model_version", "event_version", "ingested_at_ms"]
Scalar = str | int | float | bool


class FieldCondition(BaseModel):
    """One comparison of a metadata field (``metadata["<field>"] <op> <value>``)."""

    model_config = ConfigDict(extra="forbid")

    field: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,63}$", description="A metadata key.")
    op: Literal["eq", "ne", "lt", "le", "gt", "ge", "in", "not_in"] = "eq"
    value: Scalar | list[Scalar] = Field(
        description="A scalar, or a list of scalars (1 to 100) for in / not_in."
    )

    @model_validator(mode="after")
    def _value_fits_operator(self) -> FieldCondition:
        listed = isinstance(self.value, list)
        if self.op in ("in", "not_in"):
            if not listed or not 1 <= len(self.value) <= 100:  # type: ignore[arg-type]
                raise ValueError(f"{self.op} takes a list of 1 to 100 values")
        elif listed:
            raise ValueError(f"{self.op} takes a single value")
        elif self.op in ("lt", "le", "gt", "ge") and isinstance(self.value, bool):
            raise ValueError(f"{self.op} compares numbers or strings, not booleans")
        return self


class AllOf(BaseModel):
    model_config = ConfigDict(extra="forbid")

    and_: list[Filter] = Field(alias="and", min_length=1, max_length=32)


class AnyOf(BaseModel):
    model_config = ConfigDict(extra="forbid")

    or_: list[Filter] = Field(alias="or", min_length=1, max_length=32)


class NoneOf(BaseModel):
    model_config = ConfigDict(extra="forbid")

    not_: Filter = Field(alias="not")


QUERY_EXPECTED = (
    "give exactly one of query_input (a path or http(s) URL of an image), vector or id, or send "
    "the image itself as a multipart form (field file)"
)
FILTER_SHAPE = (
    'a filter is {"field": "<metadata key>", "op": "eq", "value": <value>} (op: eq, ne, lt, '
    'le, gt, ge, in, not_in), or {"and": [filters]}, {"or": [filters]} or {"not": filter}'
)
_FILTER_KINDS: dict[type[BaseModel], str] = {
    FieldCondition: "<condition>",
    AllOf: "<and>",
    AnyOf: "<or>",
    NoneOf: "<not>",
}


def _filter_kind(value: Any) -> str | None:
    """Which kind of filter ``value`` is meant to be, by its keys (None: not an object)."""
    if isinstance(value, BaseModel):
        return _FILTER_KINDS.get(type(value))
    if not isinstance(value, dict):
        return None
    for key in ("and", "or", "not"):
        if key in value:
            return f"<{key}>"
    return "<condition>"


Filter = Annotated[
    Annotated[FieldCondition, Tag("<condition>")]
    | Annotated[AllOf, Tag("<and>")]
    | Annotated[AnyOf, Tag("<or>")]
    | Annotated[NoneOf, Tag("<not>")],
    Discriminator(
        _filter_kind, custom_error_type="invalid_filter", custom_error_message=FILTER_SHAPE
    ),
]


class SearchOptions(BaseModel):
    """What every search takes besides its query (shared by the JSON and multipart forms)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    topk: int = Field(default=10, ge=1, le=MAX_TOPK)
    offset: int = Field(default=0, ge=0, le=MAX_RESULT_WINDOW - 1)
    collection_name: CollectionName | None = None
    filter_expr: str | None = Field(
        default=None,
        min_length=1,
        max_length=MAX_FILTER_LENGTH,
        description='A raw Milvus boolean expression, e.g. metadata["category"] == "nature".',
    )
    filter: Filter | None = Field(default=None, description="A structured metadata filter.")
    output_fields: list[OutputField] = Field(default_factory=list, max_length=4)
    score_threshold: float | None = Field(
        default=None,
        allow_inf_nan=False,
        description="Leave out hits scoring worse (below it for COSINE/IP, above it for L2).",
    )

    @model_validator(mode="after")
    def _window_is_bounded(self) -> SearchOptions:
        if self.offset + self.topk > MAX_RESULT_WINDOW:
            raise ValueError(f"offset + topk must not exceed {MAX_RESULT_WINDOW}")
        return self


class SearchRequest(SearchOptions):
    """A JSON similarity search.

    Exactly one query: ``query_input`` (a path or http(s) URL of an image; the earlier API's
    field), ``vector`` (an embedding) or ``id`` (a stored item whose vector is the query; the
    item itself is left out of the hits unless ``include_self``).
    """

    query_input: str | None = Field(default=None, min_length=1, max_length=2048)
    vector: list[Annotated[float, Field(allow_inf_nan=False)]] | None = Field(
        default=None,
        min_length=1,
        max_length=65_536,
        description="An embedding: finite numbers, not all zero.",
    )
    id: str | None = Field(default=None, min_length=1, max_length=256)
    include_self: bool = False

    @field_validator("vector")
    @classmethod
    def _has_a_direction(cls, vector: list[float] | None) -> list[float] | None:
        # A zero vector is as near to every vector as to any other: every hit would score 0.
        if vector is not None and not any(vector):
            raise ValueError("the vector is all zeros, so it matches nothing: give an embedding")
        return vector

    @model_validator(mode="after")
    def _exactly_one_query(self) -> SearchRequest:
        given = [
            name for name in ("query_input", "vector", "id") if getattr(self, name) is not None
        ]
        if len(given) != 1:
            raise ValueError(QUERY_EXPECTED + (f"; got {', '.join(given)}" if given else ""))
        return self


class SearchHit(BaseModel):
    """One search result, best first."""

    id: str
    score: float
    metadata: dict[str, Any] = Field(default_factory=dict)
    source: str = Field(default="", description="Where the stored image came from.")
    fields: dict[str, Any] = Field(default_factory=dict, description="The output_fields asked.")
    collection: str | None = Field(
        default=None,
        description="The collection that answered: the one the searched name (a collection or "
        "an alias) pointed at when the search began. Every hit of an answer has the same.",
    )
    model: str | None = Field(
        default=None,
        description="The model whose vectors that collection holds (the query image, if any, "
        "was embedded by it): its registry name.",
    )
    model_tag: str | None = Field(default=None, description="That model's version tag.")
    box: HitBox | None = Field(
        default=None,
        description="Where in the stored image the query matched best, as normalised "
        "[x0, y0, x1, y1] (0-1, from the top left): a region's box, or [0, 0, 1, 1] when the "
        "whole image matched best. Searches by image on a collection made with regions answer "
        "it; null otherwise (no regions, or a search by vector or id).",
    )


AllOf.model_rebuild()
AnyOf.model_rebuild()
NoneOf.model_rebuild()
