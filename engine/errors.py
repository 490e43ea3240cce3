"""The error tree every adapter translates its third-party errors into.

Two families, because the worker treats them in opposite ways:

- :class:`PermanentError`: the *input* is bad (invalid event, unreadable image, forbidden
  reference, a row the store refuses). Retrying cannot help; the record goes to the dead-letter
  topic at once.
- :class:`RetriableError`: a *service* is down, slow or throttling (Triton, Milvus, an image
  host, Kafka). Retry with backoff. Whether it can ever end in a dead letter depends on whose
  fault it is: an image host failing for one record is that record's problem and is capped
  (``retries_exhausted``); Triton, Milvus or Kafka failing is an outage and never dead-letters.

A third, :class:`ConfigurationError`, is neither the input's fault nor a passing outage: the
settings or the deployment are wrong (a wrong Milvus token, a model that does not match).

Each error carries a ``reason`` from :class:`Reason` (dead-letter header and metric label, one
vocabulary for the whole project) and the :class:`Stage` of the pipeline where the record failed.

Every exception class of the project (indentation is inheritance). Three modules define them
all: this one, ``schemas.errors`` (the contracts import nothing of the engine, so their errors
are their own) and ``devstack.errors``; ``tests/unit/test_errors.py`` holds this drawing to the
code::

    Exception
    ├── TridentError                        the project's own errors: reason, stage
    │   ├── PermanentError                  bad input: dead-letter at once
    │   │   ├── InvalidEventError           not a valid ingest event
    │   │   │   └── EntryError              (also ValueError) a producer entry
    │   │   ├── EventTooLargeError          over the broker's message size
    │   │   ├── ImageReferenceError         the reference cannot be followed
    │   │   ├── ImageContentError           the bytes are not a usable image
    │   │   │   └── ImageDecodeError        (also ValueError) one class per reason:
    │   │   │       ├── NotAnImageError
    │   │   │       ├── TruncatedImageError
    │   │   │       ├── CorruptImageError
    │   │   │       ├── TooManyPixelsError
    │   │   │       └── UnsupportedModeError
    │   │   ├── InvalidRowError             a row the store cannot hold
    │   │   ├── InvalidQueryError           a search or an index the store refuses
    │   │   ├── UnknownCollectionError      no such collection
    │   │   └── CollectionConflictError     a collection that exists, but not as asked
    │   ├── RetriableError                  a service is unavailable: retry with backoff
    │   │   ├── FetchUnavailableError       an image host (capped per record)
    │   │   ├── InferenceUnavailableError   Triton
    │   │   ├── StoreUnavailableError       Milvus
    │   │   └── BrokerUnavailableError      Kafka
    │   ├── ConfigurationError              the settings or deployment: fix and restart
    │   │   ├── InferenceConfigurationError Triton refused the request itself
    │   │   ├── StoreAuthenticationError    Milvus refused the credentials
    │   │   ├── TorchPickleError            unreadable model weights
    │   │   ├── UnknownModelError           a model name the registry does not have
    │   │   ├── ModelSpecError              a model spec (file) or an ONNX file that is wrong
    │   │   ├── ModelMismatchError          the served model is not what its spec says
    │   │   └── SourceError                 (also ValueError) an unreadable producer source
    │   └── RebuildRefusedError             a rebuild step refused in its state (not caught up)
    └── BatchAbandonedError                 the worker's cancel signal, never a record's error
    ValueError
    └── schemas.errors.ContractError        a payload breaks a wire contract (callers translate)
        └── schemas.errors.EventLimitError  an event over one of its size limits
    RuntimeError
    └── devstack.errors.StackError          the local stack failed to install, start or stop
"""

from __future__ import annotations

from enum import StrEnum


class Stage(StrEnum):
    """Where in the pipeline a record failed (the ``trident.errors.stage`` dead-letter header).

    This names a place in the record's journey, not a kind of error: how an error is treated is
    decided by its class alone. Timing labels are a separate vocabulary (``worker.metrics.Step``).
    """

    DECODE_EVENT = "decode_event"
    FETCH = "fetch"
    DECODE_IMAGE = "decode_image"
    PREPROCESS = "preprocess"
    EMBED = "embed"
    UPSERT = "upsert"
    DELETE = "delete"
    DEAD_LETTER = "dead_letter"
    SEARCH = "search"


class Reason(StrEnum):
    """Every machine-readable reason an error can carry (dead-letter headers, metric labels)."""

    # Generic, per family.
    ERROR = "error"
    PERMANENT = "permanent"
    UNAVAILABLE = "unavailable"
    CONFIGURATION = "configuration"
    # The event (schemas.ContractError reasons, translated by the worker; the size limits are
    # the event contract's and the store's alike).
    INVALID_EVENT = "invalid_event"
    EMPTY_EVENT = "empty_event"
    MALFORMED_JSON = "malformed_json"
    SCHEMA_INVALID = "schema_invalid"
    UNSUPPORTED_SCHEMA_VERSION = "unsupported_schema_version"
    UNKNOWN_IMAGE_KIND = "unknown_image_kind"
    ID_TOO_LONG = "id_too_long"
    SOURCE_TOO_LONG = "source_too_long"
    METADATA_TOO_LARGE = "metadata_too_large"
    INLINE_IMAGE_TOO_LARGE = "inline_image_too_large"
    MESSAGE_TOO_LARGE = "message_too_large"
    # The image reference.
    BAD_REFERENCE = "bad_reference"
    NOT_FOUND = "not_found"
    GONE = "gone"
    UNREADABLE = "unreadable"
    NOT_A_FILE = "not_a_file"
    SYMLINK_LOOP = "symlink_loop"
    INVALID_PATH = "invalid_path"
    PATH_NOT_ALLOWED = "path_not_allowed"
    INVALID_URL = "invalid_url"
    UNSUPPORTED_SCHEME = "unsupported_scheme"
    UNKNOWN_HOST = "unknown_host"
    FORBIDDEN_ADDRESS = "forbidden_address"
    TOO_MANY_REDIRECTS = "too_many_redirects"
    HTTP_CLIENT_ERROR = "http_client_error"
    # The image bytes.
    BAD_IMAGE = "bad_image"
    BAD_ENCODING = "bad_encoding"
    TOO_MANY_BYTES = "too_many_bytes"
    UNDECODABLE_IMAGE = "undecodable_image"
    NOT_AN_IMAGE = "not_an_image"
    TRUNCATED_IMAGE = "truncated_image"
    CORRUPT_IMAGE = "corrupt_image"
    TOO_MANY_PIXELS = "too_many_pixels"
    UNSUPPORTED_MODE = "unsupported_mode"
    # Rows the store cannot hold.
    ROW_REJECTED = "row_rejected"
    EMPTY_ID = "empty_id"
    METADATA_NOT_JSON = "metadata_not_json"
    WRONG_DIMENSION = "wrong_dimension"
    NOT_FINITE = "not_finite"
    UNKNOWN_COLLECTION = "unknown_collection"
    # A collection that exists, but not as asked: another dimension, or no vector index.
    COLLECTION_CONFLICT = "collection_conflict"
    NO_VECTOR_INDEX = "no_vector_index"
    # A collection bound to another model than the worker's (its vectors would be mixed) or
    # than the query API can serve (Triton does not serve the collection's model).
    COLLECTION_MODEL_MISMATCH = "collection_model_mismatch"
    MODEL_NOT_SERVED = "model_not_served"
    # trident-reembed: a step refused in the rebuild's state.
    REBUILD_REFUSED = "rebuild_refused"
    # Searches and the query API.
    INVALID_QUERY = "invalid_query"
    INVALID_FILTER = "invalid_filter"
    INVALID_INDEX = "invalid_index"
    INVALID_REFERENCE = "invalid_reference"
    UNKNOWN_ID = "unknown_id"
    NO_SOURCE = "no_source"
    BAD_REQUEST = "bad_request"
    TOO_MANY_MATCHES = "too_many_matches"
    # Kafka refused a write for good, by librdkafka error family (producer.publisher).
    KAFKA_UNKNOWN_TOPIC = "kafka_unknown_topic"
    KAFKA_NOT_AUTHORIZED = "kafka_not_authorized"
    KAFKA_INVALID_RECORD = "kafka_invalid_record"
    KAFKA_FATAL = "kafka_fatal"
    KAFKA_REFUSED = "kafka_refused"
    # A record whose own transient failures outlasted its retry budget.
    RETRIES_EXHAUSTED = "retries_exhausted"
    # Transient, per service.
    FETCH_UNAVAILABLE = "fetch_unavailable"
    TIMEOUT = "timeout"
    CONNECTION_ERROR = "connection_error"
    HTTP_SERVER_ERROR = "http_server_error"
    HTTP_THROTTLED = "http_throttled"
    IO_ERROR = "io_error"
    INTERNAL_ERROR = "internal_error"
    TRITON_UNAVAILABLE = "triton_unavailable"
    TRITON_OVERLOADED = "triton_overloaded"
    TRITON_CONFIGURATION = "triton_configuration"
    MILVUS_UNAVAILABLE = "milvus_unavailable"
    KAFKA_UNAVAILABLE = "kafka_unavailable"
    # Deployment.
    MODEL_WEIGHTS = "model_weights"
    UNKNOWN_MODEL = "unknown_model"
    MODEL_SPEC = "model_spec"
    MODEL_MISMATCH = "model_mismatch"
    MILVUS_AUTHENTICATION = "milvus_authentication"


class TridentError(Exception):
    """Base of every error raised by Embedding Trident's own code.

    ``reason`` should be a :class:`Reason` member (a plain string is accepted so that call sites
    stay readable, but ``tests/unit/test_errors.py`` checks every literal in the code base).
    """

    reason: str = Reason.ERROR

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

    reason: str = Reason.PERMANENT


class RetriableError(TridentError):
    """A dependency is unavailable, slow or throttled. Retry with backoff (see the module doc)."""

    reason: str = Reason.UNAVAILABLE


class ConfigurationError(TridentError):
    """The settings are inconsistent or name something that does not exist. Fix and restart."""

    reason: str = Reason.CONFIGURATION


class RebuildRefusedError(TridentError):
    """A ``trident-reembed`` step that the rebuild's state does not allow now (a switch before
    the new collection caught up, a finish before a switch): the message says what to do."""

    reason: str = Reason.REBUILD_REFUSED


# Permanent, by what is wrong with the input.
class InvalidEventError(PermanentError):
    """The message is not a valid ingest event (bad JSON, wrong schema, unknown version)."""

    reason: str = Reason.INVALID_EVENT


class ImageReferenceError(PermanentError):
    """The image reference cannot be followed: missing file, 404/410, forbidden path or address."""

    reason: str = Reason.BAD_REFERENCE


class ImageContentError(PermanentError):
    """The bytes are not a usable image: not an image, truncated, too many bytes or pixels."""

    reason: str = Reason.BAD_IMAGE


class InvalidRowError(PermanentError):
    """The store cannot hold this row: an id or source too long in UTF-8 bytes, metadata too
    large, a vector of the wrong size, or any other value the server refuses for that row."""

    reason: str = Reason.ROW_REJECTED


class InvalidQueryError(PermanentError):
    """A malformed search: bad filter expression, wrong vector size, unknown collection or id."""

    reason: str = Reason.INVALID_QUERY


class UnknownCollectionError(PermanentError):
    """A read or write names a collection that does not exist (collections are created on purpose,
    never as a side effect of using them)."""

    reason: str = Reason.UNKNOWN_COLLECTION


class CollectionConflictError(PermanentError):
    """A collection of that name exists, but not as asked: created with another dimension or
    model, without a vector index (made elsewhere), or bound to a model this process cannot
    embed with (``collection_model_mismatch``, ``model_not_served``). Drop it, use another
    name, or run a worker (or Triton) serving the collection's model."""

    reason: str = Reason.COLLECTION_CONFLICT


# Retriable, by which service failed.
class FetchUnavailableError(RetriableError):
    """An image host timed out, refused the connection, answered 5xx or 429.

    Concerns one record's reference, so the worker caps it per record (``retry.record_attempts``).
    """

    reason: str = Reason.FETCH_UNAVAILABLE


class InferenceUnavailableError(RetriableError):
    """Triton is down, not ready, overloaded (queue full) or timed out."""

    reason: str = Reason.TRITON_UNAVAILABLE


class StoreUnavailableError(RetriableError):
    """Milvus is down, not ready, throttling or timed out."""

    reason: str = Reason.MILVUS_UNAVAILABLE


class BrokerUnavailableError(RetriableError):
    """Kafka did not acknowledge a write or a commit in time."""

    reason: str = Reason.KAFKA_UNAVAILABLE


# Configuration, by what is misconfigured.
class InferenceConfigurationError(ConfigurationError):
    """Triton rejected the request itself: wrong model name, tensor name, shape or dtype."""

    reason = Reason.TRITON_CONFIGURATION


class StoreAuthenticationError(ConfigurationError):
    """Milvus refused the credentials: a wrong or missing token (``milvus.token``)."""

    reason = Reason.MILVUS_AUTHENTICATION


class TorchPickleError(ConfigurationError):
    """The file is not a readable legacy torch state dict (wrong format, corrupt, unsafe)."""

    reason = Reason.MODEL_WEIGHTS


class UnknownModelError(ConfigurationError):
    """A model name the registry (``engine.models``) does not have; the message lists it."""

    reason = Reason.UNKNOWN_MODEL


class ModelSpecError(ConfigurationError):
    """A model spec that cannot be used: an unreadable or invalid spec file, a name taken twice,
    or an ONNX file whose tensors do not match its spec."""

    reason = Reason.MODEL_SPEC


class ModelMismatchError(ConfigurationError):
    """The model Triton serves under the configured name is not the one its spec describes
    (tensor names, dims, data types): the repository and the settings disagree."""

    reason = Reason.MODEL_MISMATCH


class SourceError(ConfigurationError, ValueError):
    """A source that cannot be read at all (missing list file or manifest, no header row)."""


# Permanent: the image bytes (engine.images), one class per dead-letter reason.
class ImageDecodeError(ImageContentError, ValueError):
    """The bytes cannot become an image; ``reason`` is the dead-letter code. Permanent."""

    reason = Reason.UNDECODABLE_IMAGE

    def __init__(self, message: str) -> None:
        super().__init__(message, stage=Stage.DECODE_IMAGE)


class NotAnImageError(ImageDecodeError):
    """Not an image in any supported format (``not_an_image``)."""

    reason = Reason.NOT_AN_IMAGE


class TruncatedImageError(ImageDecodeError):
    """A supported image whose data ends early (``truncated_image``)."""

    reason = Reason.TRUNCATED_IMAGE


class CorruptImageError(ImageDecodeError):
    """A supported image whose data the decoder rejects (``corrupt_image``)."""

    reason = Reason.CORRUPT_IMAGE


class TooManyPixelsError(ImageDecodeError):
    """Width x height over the limit: a decompression bomb or just too big (``too_many_pixels``)."""

    reason = Reason.TOO_MANY_PIXELS


class UnsupportedModeError(ImageDecodeError):
    """A pixel format with no sensible RGB rendering, e.g. float images (``unsupported_mode``)."""

    reason = Reason.UNSUPPORTED_MODE


# Permanent: the producer's input.
class EntryError(InvalidEventError, ValueError):
    """One entry that cannot become an event; the message names its origin and the problem."""


class EventTooLargeError(PermanentError):
    """The message is larger than the broker (or the producer's ``message.max.bytes``) accepts."""

    reason: str = Reason.MESSAGE_TOO_LARGE


# Not an error of a record or a service: the worker's signal that a batch was cancelled.
class BatchAbandonedError(Exception):
    """The batch was cancelled (an outage rewind, a stop): nothing of it may be kept."""
