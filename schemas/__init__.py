"""Versioned wire contracts shared by the producer, the worker and the query API.

Public surface: the ingest event, its image references and size limits, their (de)serialisers,
the dead-letter headers (``schemas.dead_letter``), and the search request/response models.
"""

from schemas.errors import ContractError
from schemas.events import (
    DEFAULT_EVENT_LIMITS,
    EVENT_SCHEMA_VERSION,
    ID_MAX_BYTES,
    METADATA_MAX_BYTES,
    SOURCE_MAX_BYTES,
    EventLimitError,
    EventLimits,
    ImageRef,
    IngestEvent,
    InlineImage,
    PathImage,
    UrlImage,
    decode_event,
    encode_event,
    reference_from_string,
)
from schemas.search import SearchHit, SearchRequest

__all__ = [
    "DEFAULT_EVENT_LIMITS",
    "EVENT_SCHEMA_VERSION",
    "ID_MAX_BYTES",
    "METADATA_MAX_BYTES",
    "SOURCE_MAX_BYTES",
    "ContractError",
    "EventLimitError",
    "EventLimits",
    "ImageRef",
    "IngestEvent",
    "InlineImage",
    "PathImage",
    "SearchHit",
    "SearchRequest",
    "UrlImage",
    "decode_event",
    "encode_event",
    "reference_from_string",
]
