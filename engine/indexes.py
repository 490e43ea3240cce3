"""Vector index choices: which index a collection gets, with which parameters, validated.

Three index types are offered, the ones every Milvus this project runs against (2.3.5 locally,
2.6 in deployments, milvus-lite) builds the same way:

- ``FLAT``: exact search, no parameters; for small collections and recall baselines.
- ``IVF_FLAT``: ``nlist`` clusters at build time, ``nprobe`` of them searched.
- ``HNSW``: graph with ``M`` links per node and ``efConstruction`` at build time, ``ef`` at search.

A parameter the index type does not take, or a value out of its range, is refused with an error
that names it, before anything reaches Milvus.
"""

from __future__ import annotations

from typing import Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

IndexType = Literal["FLAT", "IVF_FLAT", "HNSW"]
Metric = Literal["COSINE", "IP", "L2"]

# Per index type: parameter -> (minimum, maximum, default), for building and for searching.
# Ranges are Milvus's own (its docs' "index parameters" tables).
_BUILD: dict[str, dict[str, tuple[int, int, int]]] = {
    "FLAT": {},
    "IVF_FLAT": {"nlist": (1, 65536, 1024)},
    "HNSW": {"M": (2, 2048, 16), "efConstruction": (1, 2**31 - 1, 200)},
}
_SEARCH: dict[str, dict[str, tuple[int, int, int]]] = {
    "FLAT": {},
    "IVF_FLAT": {"nprobe": (1, 65536, 16)},
    "HNSW": {"ef": (1, 2**31 - 1, 64)},
}


class IndexSpec(BaseModel):
    """The vector index of a collection and how it is searched.

    ``params`` are build parameters, ``search_params`` search-time ones; both may be left empty
    for the defaults (HNSW M=16, efConstruction=200, ef=64; IVF_FLAT nlist=1024, nprobe=16).

    Raises (on construction):
        pydantic.ValidationError: an unknown index type or metric, a parameter the index type does
            not take, or a value out of range; the message names the parameter.
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
        """
        nested = described.get("params")
        raw = nested if isinstance(nested, dict) else described
        index_type = str(described.get("index_type", "FLAT"))
        if index_type not in _BUILD:
            index_type = "FLAT"
        params = {name: int(raw[name]) for name in _BUILD[index_type] if name in raw}
        return cls.model_validate(
            {
                "index_type": index_type,
                "metric": str(described.get("metric_type", "COSINE")),
                "params": params,
            }
        )

    def build_params(self) -> dict[str, int]:
        """Build parameters with the defaults filled in."""
        return _with_defaults(self.params, _BUILD[self.index_type])

    def query_params(self) -> dict[str, int]:
        """Search parameters with the defaults filled in."""
        return _with_defaults(self.search_params, _SEARCH[self.index_type])

    def describe(self) -> dict[str, Any]:
        """A JSON-ready summary (index type, metric, build and search parameters)."""
        return {
            "index_type": self.index_type,
            "metric": self.metric,
            "params": self.build_params(),
            "search_params": self.query_params(),
        }


def _check(
    index_type: str, kind: str, given: dict[str, int], allowed: dict[str, tuple[int, int, int]]
) -> None:
    for name, value in given.items():
        if name not in allowed:
            takes = ", ".join(allowed) or "no parameters"
            raise ValueError(f"{index_type} takes no {kind} parameter {name!r} (it takes {takes})")
        low, high, _default = allowed[name]
        if not low <= value <= high:
            raise ValueError(
                f"{index_type} {kind} parameter {name}={value} is out of range [{low}, {high}]"
            )


def _with_defaults(
    given: dict[str, int], allowed: dict[str, tuple[int, int, int]]
) -> dict[str, int]:
    return {name: given.get(name, default) for name, (_lo, _hi, default) in allowed.items()}
