"""The image-ingest event: what the producer publishes and the worker consumes.

Wire format: UTF-8 JSON (orjson), one event per Kafka message, keyed by the event id so that all
versions of one image land in the same partition, in order. ``schema_version`` is checked on
decode; a consumer refuses versions it does not know instead of guessing.

What one event may hold is :class:`EventLimits`: the sizes the store can keep (Milvus counts
VARCHAR lengths in UTF-8 bytes and caps a JSON field at 65,536 bytes) and the inline-image bound
that keeps a message under Kafka's default maximum. :func:`decode_event` (the worker) and the
publishers apply the same limits, so an event the producer accepts is one the store can hold.
Metadata must be JSON-safe: objects with string keys, arrays, strings, finite floats, 64-bit
integers, booleans and null.

A record with a null value (a Kafka tombstone) on the same topic is not an event but a delete of
the id in its key: that contract is :mod:`schemas.deletes`.
"""

from __future__ import annotations

import base64
import math
import time
from datetime import UTC, datetime
from typing import Annotated, Any, Final, Literal

import orjson
from pydantic import (
    AnyHttpUrl,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_serializer,
    field_validator,
)

from schemas.errors import ContractError, EventLimitError, validation_problems
from schemas.search import COLLECTION_NAME_PATTERN

EVENT_SCHEMA_VERSION: Final = 1

# Ids become Milvus VARCHAR primary keys and Kafka keys: printable; their size is an EventLimits.
EventId = Annotated[str, Field(min_length=1, pattern=r"^[^\x00-\x1f\x7f]+$")]

# The store's field sizes: the ceilings of EventLimits (engine/store.py sizes its fields with them).
ID_MAX_BYTES: Final = 256
SOURCE_MAX_BYTES: Final = 2048
METADATA_MAX_BYTES: Final = 65_536
# Inline bytes grow by a third in base64; 512 KiB keeps an event well under Kafka's default
# maximum message (about 1 MB) together with the largest metadata.
INLINE_IMAGE_MAX_BYTES: Final = 512 * 1024
_INT64 = range(-(2**63), 2**63)
# Versions are stored as Milvus INT64: a larger one could never be written.
VERSION_MAX: Final = 2**63 - 1


class FrozenModel(BaseModel):
    """A contract model: immutable, and no field it does not declare."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class PathImage(FrozenModel):
    """An image file on a filesystem the worker can read (only under its allowed roots)."""

    kind: Literal["path"] = "path"
    path: str = Field(min_length=1)

    @field_validator("path")
    @classmethod
    def _no_nul(cls, value: str) -> str:
        # No filesystem path holds a NUL byte, and os functions raise ValueError on one.
        if "\x00" in value:
            raise ValueError("a path cannot contain a NUL byte")
        return value


class UrlImage(FrozenModel):
    """An image fetched over http(s)."""

    kind: Literal["url"] = "url"
    url: AnyHttpUrl


class InlineImage(FrozenModel):
    """Image bytes carried in the event itself (base64 on the wire)."""

    kind: Literal["inline"] = "inline"
    data: bytes = Field(min_length=1)

    @field_validator("data", mode="before")
    @classmethod
    def _from_base64(cls, value: Any) -> Any:
        if isinstance(value, str):
            try:
                return base64.b64decode(value, validate=True)
            except ValueError as exc:
                raise ValueError(f"inline image data is not valid base64: {exc}") from exc
        return value

    @field_serializer("data")
    def _to_base64(self, value: bytes) -> str:
        return base64.b64encode(value).decode("ascii")


ImageRef = Annotated[PathImage | UrlImage | InlineImage, Field(discriminator="kind")]


def reference_from_string(text: str) -> PathImage | UrlImage:
    """An http(s) URL becomes a :class:`UrlImage`, anything else a :class:`PathImage`.

    Raises:
        pydantic.ValidationError: an empty string or a malformed URL.
    """
    if text.startswith(("http://", "https://")):
        return UrlImage.model_validate({"url": text})
    return PathImage(path=text)


def now_micros() -> int:
    """Now, in microseconds since the epoch: the default version of events and deletes."""
    return time.time_ns() // 1_000


class IngestEvent(FrozenModel):
    """One image to embed and store (or re-embed and overwrite) under ``id``.

    ``version`` orders events for the same id: a stored embedding is only ever replaced by an
    event with a version at least as high, so retries and replays cannot roll data back. It
    defaults to the creation time in microseconds.
    """

    schema_version: Literal[1] = EVENT_SCHEMA_VERSION
    id: EventId
    image: ImageRef
    metadata: dict[str, Any] = Field(default_factory=dict)
    collection: str | None = Field(
        default=None,
        pattern=COLLECTION_NAME_PATTERN,
        description="Target collection; the worker's default when absent.",
    )
    version: int = Field(default_factory=now_micros, ge=0, le=VERSION_MAX)
    created_at: datetime = Field(default_factory=lambda: datetime.now(UTC))

    @field_validator("metadata")
    @classmethod
    def _json_safe(cls, metadata: dict[str, Any]) -> dict[str, Any]:
        _check_json_safe(metadata, "metadata")
        return metadata

    def source(self) -> str:
        """A short, loggable description of where the image comes from."""
        match self.image:
            case PathImage(path=path):
                return path
            case UrlImage(url=url):
                return str(url)
            case InlineImage(data=data):
                return f"inline:{len(data)}B"
        raise AssertionError("unreachable")


def _check_json_safe(value: Any, where: str) -> None:
    # orjson would silently write NaN as null and tuples as arrays; the store keeps int64 only.
    if value is None or isinstance(value, bool | str):
        return
    if isinstance(value, int):
        if value not in _INT64:
            raise ValueError(f"{where}: integer {value} is outside the 64-bit range")
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{where}: {value} is not a JSON number")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _check_json_safe(item, f"{where}[{index}]")
    elif isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise ValueError(f"{where}: key {key!r} is not a string")
            _check_json_safe(item, f"{where}.{key}")
    else:
        raise ValueError(f"{where}: {type(value).__name__} is not a JSON type")


class EventLimits(FrozenModel):
    """How large the parts of one ingest event may be, in bytes.

    The stored parts (id, source reference, metadata encoded as JSON) may be limited below the
    store's field sizes, never above them. ``inline_image_max_bytes`` bounds the image bytes an
    event carries; a larger image must be published as a path or URL reference.
    """

    id_max_bytes: int = Field(ID_MAX_BYTES, ge=1, le=ID_MAX_BYTES)
    source_max_bytes: int = Field(SOURCE_MAX_BYTES, ge=1, le=SOURCE_MAX_BYTES)
    metadata_max_bytes: int = Field(METADATA_MAX_BYTES, ge=2, le=METADATA_MAX_BYTES)
    inline_image_max_bytes: int = Field(INLINE_IMAGE_MAX_BYTES, ge=1)

    def check(self, event: IngestEvent) -> None:
        """Raise if ``event`` is over a limit.

        Raises:
            EventLimitError: the first limit exceeded, named in the message and in ``limit``.
        """
        self.check_id(event.id)
        if isinstance(event.image, InlineImage):
            self.check_inline_image(len(event.image.data))
        else:
            source_bytes = len(event.source().encode())
            self._within("source reference", source_bytes, "source_max_bytes", "source_too_long")
        metadata_bytes = len(orjson.dumps(event.metadata))
        self._within("metadata", metadata_bytes, "metadata_max_bytes", "metadata_too_large")

    def check_id(self, event_id: str) -> None:
        """Raise if ``event_id`` is over ``id_max_bytes`` in UTF-8 (the ids of upserts and
        deletes alike).

        Raises:
            EventLimitError: over ``id_max_bytes`` (``id_too_long``).
        """
        size = len(event_id.encode(errors="surrogatepass"))
        self._within("id", size, "id_max_bytes", "id_too_long")

    def check_inline_image(self, size: int) -> None:
        """Raise if ``size`` bytes are too many to carry inline (before reading them).

        Raises:
            EventLimitError: over ``inline_image_max_bytes``; the message says to publish a
                reference instead.
        """
        self._within(
            "inline image",
            size,
            "inline_image_max_bytes",
            "inline_image_too_large",
            hint="; publish it as a path or URL reference instead",
        )

    def _within(self, what: str, size: int, limit: str, reason: str, *, hint: str = "") -> None:
        maximum: int = getattr(self, limit)
        if size > maximum:
            raise EventLimitError(
                f"{what} is {size} bytes, over the limit {limit}={maximum}{hint}",
                reason=reason,
                limit=limit,
                size=size,
                maximum=maximum,
            )


DEFAULT_EVENT_LIMITS: Final = EventLimits()


def encode_event(event: IngestEvent) -> bytes:
    """Serialise an event to its wire form (compact UTF-8 JSON)."""
    return orjson.dumps(event.model_dump(mode="json"))


def decode_event(
    payload: bytes | str | None, limits: EventLimits = DEFAULT_EVENT_LIMITS
) -> IngestEvent:
    """Parse and validate an event from its wire form, within ``limits``.

    Raises:
        ContractError: empty payload, malformed JSON, unknown schema version, or a field that
            fails validation; the message says which.
        EventLimitError: (a ContractError) a part of the event is over its limit.
    """
    if not payload:
        raise ContractError("empty message", reason="empty_event")
    try:
        raw = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        raise ContractError(f"malformed JSON: {exc}", reason="malformed_json") from exc
    if not isinstance(raw, dict):
        raise ContractError("event must be a JSON object", reason="schema_invalid")
    version = raw.get("schema_version", EVENT_SCHEMA_VERSION)
    if version != EVENT_SCHEMA_VERSION:
        raise ContractError(
            f"unsupported schema_version {version!r} (this worker reads {EVENT_SCHEMA_VERSION})",
            reason="unsupported_schema_version",
        )
    try:
        event = IngestEvent.model_validate(raw)
    except ValidationError as exc:
        problems = validation_problems(exc)
        reason = "unknown_image_kind" if _is_unknown_kind(exc) else "schema_invalid"
        raise ContractError(f"invalid event: {problems}", reason=reason) from exc
    limits.check(event)
    return event


def _is_unknown_kind(exc: ValidationError) -> bool:
    return any(err["type"] == "union_tag_invalid" for err in exc.errors())
