"""Versioned wire contracts shared by the producer, the worker and the query API.

Public surface: the ingest event and its image references, their (de)serialisers, and the search
request/response models.
"""

from schemas.errors import ContractError
from schemas.events import (
    EVENT_SCHEMA_VERSION,
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
    "EVENT_SCHEMA_VERSION",
    "ContractError",
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
