"""The delete contract (``schemas.deletes``): a tombstone keyed by the id, its headers, its
default version, and the clear errors of a tombstone that breaks it."""

from __future__ import annotations

import time

import pytest

from schemas import (
    HEADER_COLLECTION,
    HEADER_VERSION,
    VERSION_MAX,
    ContractError,
    DeleteEvent,
    EventLimitError,
    EventLimits,
    decode_delete,
    timestamp_version,
)


@pytest.mark.parametrize(
    "delete",
    [
        DeleteEvent(id="cats/0001.jpg", version=17),
        DeleteEvent(id="猫/ü ' \" \\ x", collection="pets", version=0),
        DeleteEvent(id="x", collection="c_1", version=VERSION_MAX),
    ],
)
def test_what_a_publisher_writes_decodes_to_the_same_delete(delete: DeleteEvent) -> None:
    decoded = decode_delete(delete.key(), delete.headers(), timestamp_ms=1)
    assert decoded == delete


def test_the_headers_carry_the_version_always_and_the_collection_when_named() -> None:
    assert DeleteEvent(id="a", version=5).headers() == [(HEADER_VERSION, b"5")]
    assert DeleteEvent(id="a", collection="c", version=5).headers() == [
        (HEADER_VERSION, b"5"),
        (HEADER_COLLECTION, b"c"),
    ]
    assert DeleteEvent(id="猫/b").key() == "猫/b".encode()


def test_a_plain_tombstone_deletes_from_the_default_collection_as_of_its_time() -> None:
    decoded = decode_delete(b"a", [("other", b"x"), ("nothing", None)], timestamp_ms=1_234)
    assert decoded == DeleteEvent(id="a", collection=None, version=1_234_999)
    assert timestamp_version(1_234) == 1_234_999


def test_without_a_timestamp_the_version_is_now() -> None:
    before = time.time_ns() // 1_000
    decoded = decode_delete("a", None, timestamp_ms=None)
    assert before <= decoded.version <= time.time_ns() // 1_000


def test_the_version_header_wins_over_the_timestamp_and_the_last_header_counts() -> None:
    headers = [(HEADER_VERSION, b"3"), (HEADER_COLLECTION, b"one"), (HEADER_COLLECTION, b"two")]
    decoded = decode_delete(b"a", headers, timestamp_ms=99)
    assert (decoded.version, decoded.collection) == (3, "two")


@pytest.mark.parametrize(
    ("key", "headers", "reason", "says"),
    [
        (None, [], "empty_event", "without a key"),
        (b"", [], "empty_event", "without a key"),
        (b"\xc3\x28", [], "schema_invalid", "the key is not UTF-8"),
        (b"a\nb", [], "schema_invalid", "id"),
        (b"a", [(HEADER_VERSION, b"1.5")], "schema_invalid", "not a decimal integer"),
        (b"a", [(HEADER_VERSION, b" 7")], "schema_invalid", "not a decimal integer"),
        (b"a", [(HEADER_VERSION, b"-1")], "schema_invalid", "not a decimal integer"),
        (b"a", [(HEADER_VERSION, str(2**63).encode())], "schema_invalid", "version"),
        (b"a", [(HEADER_VERSION, b"\xff")], "schema_invalid", "not UTF-8"),
        (b"a", [(HEADER_COLLECTION, b"has space")], "schema_invalid", "collection"),
        (b"a", [(HEADER_COLLECTION, b"")], "schema_invalid", "collection"),
    ],
)
def test_a_tombstone_that_breaks_the_contract_is_refused_clearly(
    key: bytes | None, headers: list[tuple[str, bytes]], reason: str, says: str
) -> None:
    with pytest.raises(ContractError) as caught:
        decode_delete(key, headers, timestamp_ms=5)
    assert caught.value.reason == reason
    assert says in str(caught.value)


def test_the_id_limit_of_upserts_holds_for_deletes() -> None:
    limits = EventLimits(id_max_bytes=8)
    assert decode_delete("12345678", None, timestamp_ms=1, limits=limits).id == "12345678"
    with pytest.raises(EventLimitError) as caught:
        decode_delete("猫猫猫", None, timestamp_ms=1, limits=limits)  # 9 UTF-8 bytes
    assert (caught.value.reason, caught.value.limit, caught.value.size) == (
        "id_too_long",
        "id_max_bytes",
        9,
    )
    limits.check_id("12345678")
    with pytest.raises(EventLimitError):
        limits.check_id("123456789")
