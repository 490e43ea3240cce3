"""Versioned wire contracts shared by the producer, the worker and the query API.

Public surface: the ingest event, its image references and size limits, their (de)serialisers,
the delete (a tombstone on the ingest topic: ``schemas.deletes``), the dead-letter headers
(``schemas.dead_letter``), and the search request/response models.
"""

from schemas.deletes import (
    HEADER_COLLECTION,
    HEADER_VERSION,
    DeleteEvent,
    decode_delete,
    timestamp_version,
)
from schemas.errors import ContractError, EventLimitError
from schemas.events import (
    DEFAULT_EVENT_LIMITS,
    EVENT_SCHEMA_VERSION,
    ID_MAX_BYTES,
    METADATA_MAX_BYTES,
    SOURCE_MAX_BYTES,
    VERSION_MAX,
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
    "HEADER_COLLECTION",
    "HEADER_VERSION",
    "ID_MAX_BYTES",
    "METADATA_MAX_BYTES",
    "SOURCE_MAX_BYTES",
    "VERSION_MAX",
    "ContractError",
    "DeleteEvent",
    "EventLimitError",
    "EventLimits",
    "ImageRef",
    "IngestEvent",
    "InlineImage",
    "PathImage",
    "SearchHit",
    "SearchRequest",
    "UrlImage",
    "decode_delete",
    "decode_event",
    "encode_event",
    "reference_from_string",
    "timestamp_version",
]
