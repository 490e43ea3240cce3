"""The image-ingest event: what the producer publishes and the worker consumes.

Wire format: UTF-8 JSON (orjson), one event per Kafka message, keyed by the event id so that all
versions of one image land in the same partition, in order. ``schema_version`` is checked on
decode; a consumer refuses versions it does not know instead of guessing.
"""

from __future__ import annotations

import base64
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

from schemas.errors import ContractError

EVENT_SCHEMA_VERSION: Final = 1

# Ids become Milvus VARCHAR primary keys and Kafka keys; keep them printable and bounded.
EventId = Annotated[str, Field(min_length=1, max_length=256, pattern=r"^[^\x00-\x1f\x7f]+$")]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class PathImage(_Frozen):
    """An image file on a filesystem the worker can read (only under its allowed roots)."""

    kind: Literal["path"] = "path"
    path: str = Field(min_length=1, max_length=4096)


class UrlImage(_Frozen):
    """An image fetched over http(s)."""

    kind: Literal["url"] = "url"
    url: AnyHttpUrl


class InlineImage(_Frozen):
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


def _now_micros() -> int:
    return time.time_ns() // 1_000


class IngestEvent(_Frozen):
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
        pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,254}$",
        description="Target collection; the worker's default when absent.",
    )
    version: int = Field(default_factory=_now_micros, ge=0)
    created_at: datetime = Field(default_factory=lambda: datetime.now(UTC))

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


def encode_event(event: IngestEvent) -> bytes:
    """Serialise an event to its wire form (compact UTF-8 JSON)."""
    return orjson.dumps(event.model_dump(mode="json"))


def decode_event(payload: bytes | str | None) -> IngestEvent:
    """Parse and validate an event from its wire form.

    Raises:
        ContractError: empty payload, malformed JSON, unknown schema version, or a field that
            fails validation; the message says which.
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
        return IngestEvent.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '<event>'}: {err['msg']}"
            for err in exc.errors()
        )
        reason = "unknown_image_kind" if _is_unknown_kind(exc) else "schema_invalid"
        raise ContractError(f"invalid event: {problems}", reason=reason) from exc


def _is_unknown_kind(exc: ValidationError) -> bool:
    return any(err["type"] == "union_tag_invalid" for err in exc.errors())
