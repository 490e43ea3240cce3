"""The error tree every adapter translates its third-party errors into.

Two families, because the worker treats them in opposite ways:

- :class:`PermanentError`: the *input* is bad (invalid event, unreadable image, forbidden
  reference). Retrying cannot help; the event goes to the dead-letter topic at once.
- :class:`RetriableError`: a *service* is down, slow or throttling (Triton, Milvus, an image
  host, Kafka). Retry with backoff, then pause; never dead-letter.

Each error carries a short machine-readable ``reason`` (used in dead-letter headers and metric
labels) and the pipeline ``stage`` it happened in.
"""

from __future__ import annotations

from enum import StrEnum


class Stage(StrEnum):
    """Pipeline stages, in the order the worker runs them."""

    DECODE_EVENT = "decode_event"
    FETCH = "fetch"
    DECODE_IMAGE = "decode_image"
    PREPROCESS = "preprocess"
    EMBED = "embed"
    UPSERT = "upsert"
    DEAD_LETTER = "dead_letter"
    SEARCH = "search"


class TridentError(Exception):
    """Base of every error raised by Embedding Trident's own code."""

    reason: str = "error"

    def __init__(
        self, message: str, *, reason: str | None = None, stage: Stage | None = None
    ) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason
        self.stage = stage

    @property
    def message(self) -> str:
        return str(self)


class PermanentError(TridentError):
    """Bad input: retrying the same event can never succeed. Dead-letter it."""

    reason = "permanent"


class RetriableError(TridentError):
    """A dependency is unavailable, slow or throttled. Retry with backoff; never dead-letter."""

    reason = "unavailable"


class ConfigurationError(TridentError):
    """The settings are inconsistent or name something that does not exist. Fix and restart."""

    reason = "configuration"


# Permanent, by what is wrong with the input.
class InvalidEventError(PermanentError):
    """The message is not a valid ingest event (bad JSON, wrong schema, unknown version)."""

    reason = "invalid_event"


class ImageReferenceError(PermanentError):
    """The image reference cannot be followed: missing file, 404/410, forbidden path or address."""

    reason = "bad_reference"


class ImageContentError(PermanentError):
    """The bytes are not a usable image: not an image, truncated, too many bytes or pixels."""

    reason = "bad_image"


class InvalidQueryError(PermanentError):
    """A malformed search: bad filter expression, wrong vector size, unknown collection or id."""

    reason = "invalid_query"


class UnknownCollectionError(PermanentError):
    """A read or write names a collection that does not exist (collections are created on purpose,
    never as a side effect of using them)."""

    reason = "unknown_collection"


# Retriable, by which service failed.
class FetchUnavailableError(RetriableError):
    """An image host timed out, refused the connection, answered 5xx or 429."""

    reason = "fetch_unavailable"


class InferenceUnavailableError(RetriableError):
    """Triton is down, not ready, overloaded (queue full) or timed out."""

    reason = "triton_unavailable"


class StoreUnavailableError(RetriableError):
    """Milvus is down, not ready, throttling or timed out."""

    reason = "milvus_unavailable"


class BrokerUnavailableError(RetriableError):
    """Kafka did not acknowledge a write in time."""

    reason = "kafka_unavailable"
