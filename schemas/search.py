"""Search request and response contracts of the query API."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator


class SearchRequest(BaseModel):
    """A JSON similarity search.

    Exactly one query: ``query_input`` (a path or http(s) URL of an image; the earlier API's
    field), ``vector`` (an embedding) or ``id`` (a stored item whose vector is the query).
    """

    model_config = ConfigDict(extra="forbid")

    query_input: str | None = Field(default=None, min_length=1)
    vector: list[float] | None = None
    id: str | None = Field(default=None, min_length=1, max_length=256)
    topk: int = Field(default=10, ge=1, le=1000)
    collection_name: str | None = Field(default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,254}$")
    filter_expr: str | None = Field(default=None, max_length=4096)

    @model_validator(mode="after")
    def _exactly_one_query(self) -> SearchRequest:
        given = [
            name for name in ("query_input", "vector", "id") if getattr(self, name) is not None
        ]
        if len(given) != 1:
            raise ValueError(
                "give exactly one of query_input, vector or id"
                + (f" (got {', '.join(given)})" if given else "")
            )
        return self


class SearchHit(BaseModel):
    """One search result, best first."""

    id: str
    score: float
    metadata: dict[str, Any] = Field(default_factory=dict)
