"""The records the Milvus adapter stores and answers, and the names of their fields.

Kept apart from :mod:`engine.store` so that :mod:`engine.store_requests` (which packs them) and the
store (which sends them) both depend on this module, never on each other.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from engine.errors import UnknownModelError
from engine.indexes import IndexSpec
from engine.models import Box, ModelSpec

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


@dataclass(frozen=True, slots=True)
class ItemRegions:
    """One item's regions at one version: ``boxes[i]``'s vector is ``vectors[i]``."""

    item_id: str
    version: int
    boxes: Sequence[Box]
    vectors: npt.NDArray[np.float32]


@dataclass(frozen=True, slots=True)
class VectorRecord:
    """One stored embedding with what it was made from.

    ``regions``: the item's region vectors (issue 24), of this id and version, for a collection
    made with regions (:meth:`engine.store.VectorStore.upsert` writes them before the row; a
    record without them there leaves the item without regions). A collection without regions
    ignores them.
    """

    id: str
    vector: npt.NDArray[np.float32]
    metadata: dict[str, Any] = field(default_factory=dict)
    source: str = ""
    content_sha256: str = ""
    model_version: str = ""
    event_version: int = 0
    ingested_at_ms: int = 0
    regions: ItemRegions | None = None

    def to_row(self) -> dict[str, Any]:
        """The record as pymilvus's rows API takes it (``MilvusClient.upsert(data=[...])``)."""
        return {
            "id": self.id,
            VECTOR_FIELD: self.vector.astype(np.float32).tolist(),
            "metadata": self.metadata,
            "source": self.source,
            "content_sha256": self.content_sha256,
            "model_version": self.model_version,
            "event_version": self.event_version,
            "ingested_at_ms": self.ingested_at_ms,
        }


# Read consistency of :meth:`VectorStore.stored_versions` (Milvus's levels of that name).
Consistency = Literal["Strong", "Session"]


@dataclass(frozen=True, slots=True)
class StoredVersion:
    """What the stale-version guard and the inference skip need to know of a stored record.

    ``deleted``: the fact is a tombstone (a delete at ``event_version`` is what is kept; no row,
    so ``content_sha256`` and ``model_version`` are empty and nothing can be reused from it).
    """

    event_version: int
    content_sha256: str
    model_version: str
    deleted: bool = False

    @classmethod
    def tombstone(cls, event_version: int) -> StoredVersion:
        return cls(event_version, "", "", deleted=True)


@dataclass(frozen=True, slots=True)
class StoredRecord:
    """One stored record as the store answers it (no vector): what an item's page shows."""

    id: str
    metadata: dict[str, Any]
    source: str
    event_version: int
    model_version: str
    content_sha256: str
    ingested_at_ms: int


@dataclass(frozen=True, slots=True)
class Hit:
    id: str
    score: float
    metadata: dict[str, Any]
    fields: dict[str, Any]


@dataclass(frozen=True, slots=True)
class RegionHit:
    """An item's best region for a search: its score, the region's normalised box
    ``(x0, y0, x1, y1)`` and the item version the region was made from (always the version
    the item's row had when the search checked it)."""

    id: str
    score: float
    box: tuple[float, float, float, float]
    event_version: int


@dataclass(frozen=True, slots=True)
class CollectionInfo:
    """What a collection was created with.

    ``model_name`` and ``model_tag``: the model the collection is bound to (its vectors are that
    model's). Collections made before models were recorded by name have a tag only, and
    collections made elsewhere (or by a caller that named no model) neither: see
    :meth:`bound_model`.
    """

    name: str
    dimension: int
    index: IndexSpec
    description: str = ""
    model_tag: str = ""
    model_name: str = ""
    # A dynamic schema (made elsewhere: ours are not) takes undeclared keys in "$meta".
    dynamic_field: bool = False
    # Region vectors (issue 24), chosen at creation: a companion collection holds them.
    regions: bool = False

    def bound_model(self, registry: Mapping[str, ModelSpec], configured: ModelSpec) -> ModelSpec:
        """The spec of the model whose vectors this collection holds.

        The recorded name when there is one. Otherwise (a collection made before names were
        recorded) the ``configured`` model when the recorded tag is its tag or no tag was
        recorded at all (today's default, as before), else the first model of ``registry``
        with that tag.

        Raises:
            UnknownModelError: the collection's model is not in ``registry``; the message names
                it and says what to do.
        """
        if self.model_name:
            spec = registry.get(self.model_name)
            if spec is not None:
                return spec
            missing = f"model {self.model_name!r} (tag {self.model_tag!r})"
        else:
            if not self.model_tag or self.model_tag == configured.model_version_tag:
                return configured
            tagged = (s for s in registry.values() if s.model_version_tag == self.model_tag)
            found = next(tagged, None)
            if found is not None:
                return found
            missing = f"a model of tag {self.model_tag!r}"
        raise UnknownModelError(
            f"collection {self.name!r} holds vectors of {missing}, which the model registry does "
            "not have: add the model (trident-models add) and point triton.model_repository at "
            "its repository"
        )
