"""Vector index choices: which index a collection gets, with which parameters, validated.

The one place for each index type's parameters and their ranges (the settings, the earlier
pipeline's configuration and the query API all read them here; the names of the types and
metrics are the API contract's, :mod:`schemas.api`). Three index types are offered, the ones
every Milvus this project runs against (2.3.5 locally, 2.6 in deployments, milvus-lite) builds
the same way:

- ``FLAT``: exact search, no parameters; for small collections and recall baselines.
- ``IVF_FLAT``: ``nlist`` clusters at build time, ``nprobe`` of them searched.
- ``HNSW``: graph with ``M`` links per node and ``efConstruction`` at build time, ``ef`` at search.

A parameter the index type does not take, or a value out of its range, is refused with an error
that names it, before anything reaches Milvus: a range here is never wider than what the server
takes, so a collection is never created only for its index to be refused.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

from schemas.api import IndexType, Metric

__all__ = [
    "IndexSpec",
    "IndexType",
    "Metric",
    "build_parameter_names",
    "search_parameter_names",
]


class _Range(NamedTuple):
    minimum: int
    maximum: int
    default: int


# Per index type: parameter -> range and default, for building and for searching. Each range was
# tried against the Milvus 2.3.5 server (tests/integration/test_store.py holds the edges):
# - HNSW M: the server takes [1, 2048]; 1 is refused here, as hnswlib's level factor 1/ln(M) is
#   infinite there.
# - HNSW efConstruction: the server says [1, 2147483647] but reads build parameters back through
#   a float, so from 1,000,000 up ("1e+06") it refuses them all, after the collection exists.
# - HNSW ef: the server checks [1, 2147483647], but a search with ef=2147483647 brought it down;
#   32768 is the top of Milvus's documented range. (Below the result window the server refuses
#   the search: see IndexSpec.query_params.)
# - IVF_FLAT nlist and nprobe: [1, 65536], as the server checks them.
_BUILD: dict[str, dict[str, _Range]] = {
    "FLAT": {},
    "IVF_FLAT": {"nlist": _Range(1, 65_536, 1024)},
    "HNSW": {"M": _Range(2, 2048, 16), "efConstruction": _Range(1, 999_999, 200)},
}
_SEARCH: dict[str, dict[str, _Range]] = {
    "FLAT": {},
    "IVF_FLAT": {"nprobe": _Range(1, 65_536, 16)},
    "HNSW": {"ef": _Range(1, 32_768, 64)},
}


def build_parameter_names(index_type: IndexType) -> tuple[str, ...]:
    """The build parameters ``index_type`` takes (none for FLAT)."""
    return tuple(_BUILD[index_type])


def search_parameter_names(index_type: IndexType) -> tuple[str, ...]:
    """The search parameters ``index_type`` takes (none for FLAT)."""
    return tuple(_SEARCH[index_type])


class IndexSpec(BaseModel):
    """The vector index of a collection and how it is searched.

    ``params`` are build parameters, ``search_params`` search-time ones; both may be left empty
    for the defaults (HNSW M=16, efConstruction=200, ef=64; IVF_FLAT nlist=1024, nprobe=16).

    Raises (on construction):
        pydantic.ValidationError: an unknown index type or metric, a parameter the index type does
            not take, or a value out of range; the message names the parameter and its range.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    index_type: IndexType = "HNSW"
    metric: Metric = "COSINE"
    params: dict[str, int] = Field(default_factory=dict)
    search_params: dict[str, int] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check_parameters(self) -> Self:
        _check(self.index_type, "build", self.params, _BUILD[self.index_type])
        _check(self.index_type, "search", self.search_params, _SEARCH[self.index_type])
        return self

    @classmethod
    def from_description(cls, described: dict[str, Any]) -> IndexSpec:
        """The spec of an existing index, from Milvus's ``describe_index`` answer.

        Parameters may come flattened or nested under ``params`` (servers differ); an index type
        this project does not create is described as FLAT and searched with Milvus's defaults.
        The values are the server's, as they are: not checked against this project's ranges,
        which an index made elsewhere need not keep to.
        """
        nested = described.get("params")
        raw = nested if isinstance(nested, dict) else described
        index_type = str(described.get("index_type", "FLAT"))
        if index_type not in _BUILD:
            index_type = "FLAT"
        params = {name: int(raw[name]) for name in _BUILD[index_type] if name in raw}
        spec = cls.model_validate(
            {"index_type": index_type, "metric": str(described.get("metric_type", "COSINE"))}
        )
        return spec.model_copy(update={"params": params})  # model_copy does not validate

    def build_params(self) -> dict[str, int]:
        """Build parameters with the defaults filled in."""
        return _with_defaults(self.params, _BUILD[self.index_type])

    def query_params(self, window: int = 0) -> dict[str, int]:
        """Search parameters with the defaults filled in, for a search of ``window`` results
        (``limit + offset``): HNSW's ``ef`` is raised to it, as Milvus refuses a smaller one."""
        params = _with_defaults(self.search_params, _SEARCH[self.index_type])
        if "ef" in params:
            params["ef"] = max(params["ef"], window)
        return params

    def describe(self) -> dict[str, Any]:
        """A JSON-ready summary (index type, metric, build and search parameters)."""
        return {
            "index_type": self.index_type,
            "metric": self.metric,
            "params": self.build_params(),
            "search_params": self.query_params(),
        }


def _check(index_type: str, kind: str, given: dict[str, int], allowed: dict[str, _Range]) -> None:
    for name, value in given.items():
        if name not in allowed:
            takes = ", ".join(allowed) or "no parameters"
            raise ValueError(f"{index_type} takes no {kind} parameter {name!r} (it takes {takes})")
        low, high, _default = allowed[name]
        if not low <= value <= high:
            raise ValueError(
                f"{index_type} {kind} parameter {name}={value} is out of range [{low}, {high}]"
            )


def _with_defaults(given: dict[str, int], allowed: dict[str, _Range]) -> dict[str, int]:
    return {name: given.get(name, allowed_range.default) for name, allowed_range in allowed.items()}
