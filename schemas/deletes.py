"""A delete on the ingest topic: a Kafka tombstone keyed by the id.

Wire form (the convention of other Kafka tools, and what log compaction needs):

- **key**: the id, UTF-8, exactly as its upserts are keyed, so a delete lands in the same
  partition as the id's upserts and is ordered with them;
- **value**: null (a tombstone);
- **headers** (both optional): :data:`HEADER_COLLECTION`, the collection (absent: the worker's
  default), and :data:`HEADER_VERSION`, the delete's version as a decimal integer (digits only,
  at most ``2**63 - 1``).

A delete removes what is stored unless a newer version is stored, and an upsert older than a
delete never brings the id back (``worker.versions``); equal versions: the later record wins, as
log compaction keeps it. A tombstone without a version header (written by another tool) takes
the record's Kafka timestamp as its version: the last microsecond of that millisecond
(:func:`timestamp_version`), on the clock of an :class:`~schemas.events.IngestEvent`'s default
version, so a tombstone is never older than an upsert created in the same millisecond before it.

A tombstone without a key deletes nothing (``empty_event``); one whose key, collection or
version is not valid is refused (``schema_invalid``, or ``id_too_long`` over the id limit): the
worker dead-letters both like any record it cannot read.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Final

from pydantic import Field, ValidationError

from schemas.errors import ContractError, validation_problems
from schemas.events import (
    DEFAULT_EVENT_LIMITS,
    VERSION_MAX,
    EventId,
    EventLimits,
    FrozenModel,
    now_micros,
)
from schemas.search import CollectionName

HEADER_COLLECTION: Final = "trident.collection"
HEADER_VERSION: Final = "trident.version"

# Kafka headers as confluent_kafka gives and takes them (a value may be null).
Headers = list[tuple[str, bytes]]
ReceivedHeaders = Iterable[tuple[str, bytes | str | None]]

_DECIMAL = re.compile(r"[0-9]{1,19}")


class DeleteEvent(FrozenModel):
    """Remove ``id`` from ``collection`` (the worker's default when absent), as of ``version``."""

    id: EventId
    collection: CollectionName | None = Field(
        default=None, description="Target collection; the worker's default when absent."
    )
    version: int = Field(default_factory=now_micros, ge=0, le=VERSION_MAX)

    def key(self) -> bytes:
        """The tombstone's key: the id, as the id's upserts are keyed."""
        return self.id.encode()

    def headers(self) -> Headers:
        """The tombstone's headers: the version always, the collection when one is named."""
        headers = [(HEADER_VERSION, str(self.version).encode())]
        if self.collection is not None:
            headers.append((HEADER_COLLECTION, self.collection.encode()))
        return headers


def timestamp_version(timestamp_ms: int) -> int:
    """The version of a tombstone without a version header, from its Kafka timestamp (ms): the
    last microsecond of that millisecond (see the module docstring)."""
    return timestamp_ms * 1_000 + 999


def decode_delete(
    key: bytes | str | None,
    headers: ReceivedHeaders | None,
    *,
    timestamp_ms: int | None,
    limits: EventLimits = DEFAULT_EVENT_LIMITS,
) -> DeleteEvent:
    """The delete a tombstone stands for.

    Args:
        key: the record's key (the id).
        headers: the record's headers (others than ours are ignored; the last of a name wins).
        timestamp_ms: the record's Kafka timestamp (None or not positive: not available), the
            version when no header gives one; with neither, the version is now.
        limits: the event limits whose ``id_max_bytes`` applies, as for upserts.

    Raises:
        ContractError: no key (``empty_event``), or a key, collection or version that is not
            valid (``schema_invalid``); the message says which.
        EventLimitError: (a ContractError) the id is over ``id_max_bytes`` (``id_too_long``).
    """
    if not key:
        raise ContractError("a tombstone without a key deletes nothing", reason="empty_event")
    found = {name: value for name, value in headers or () if value is not None}
    fields: dict[str, object] = {"id": _text(key, "the key")}
    if HEADER_COLLECTION in found:
        fields["collection"] = _text(found[HEADER_COLLECTION], HEADER_COLLECTION)
    if HEADER_VERSION in found:
        fields["version"] = _decimal(_text(found[HEADER_VERSION], HEADER_VERSION))
    elif timestamp_ms is not None and timestamp_ms > 0:
        fields["version"] = timestamp_version(timestamp_ms)
    try:
        event = DeleteEvent.model_validate(fields)
    except ValidationError as exc:
        problems = validation_problems(exc, whole="<delete>")
        raise ContractError(f"invalid delete: {problems}", reason="schema_invalid") from exc
    limits.check_id(event.id)
    return event


def _text(value: bytes | str, what: str) -> str:
    # Strictly UTF-8: a key decoded with replacement characters would name another id.
    if isinstance(value, str):
        return value
    try:
        return value.decode()
    except UnicodeDecodeError as exc:
        raise ContractError(
            f"invalid delete: {what} is not UTF-8 ({exc})", reason="schema_invalid"
        ) from exc


def _decimal(text: str) -> int:
    if not _DECIMAL.fullmatch(text):
        raise ContractError(
            f"invalid delete: {HEADER_VERSION} {text[:40]!r} is not a decimal integer",
            reason="schema_invalid",
        )
    return int(text)
