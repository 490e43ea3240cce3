"""The event's limits: what the store can hold, checked on decode and before publishing."""

from __future__ import annotations

import orjson
import pytest
from pydantic import ValidationError

from schemas import (
    DEFAULT_EVENT_LIMITS,
    ContractError,
    EventLimitError,
    EventLimits,
    IngestEvent,
    InlineImage,
    PathImage,
    UrlImage,
    decode_event,
    encode_event,
)
from schemas.events import ID_MAX_BYTES, METADATA_MAX_BYTES, SOURCE_MAX_BYTES


def _event(**fields: object) -> IngestEvent:
    values: dict[str, object] = {"id": "a", "image": PathImage(path="/data/a.jpg")}
    values.update(fields)
    return IngestEvent.model_validate(values)


def _refused(event: IngestEvent, limits: EventLimits = DEFAULT_EVENT_LIMITS) -> EventLimitError:
    """The limit error, both from the producer's check and from decoding the wire form."""
    with pytest.raises(EventLimitError) as checked:
        limits.check(event)
    with pytest.raises(EventLimitError) as decoded:
        decode_event(encode_event(event), limits)
    assert (decoded.value.limit, decoded.value.reason) == (
        checked.value.limit,
        checked.value.reason,
    )
    return checked.value


def test_the_defaults_are_the_store_field_sizes() -> None:
    assert DEFAULT_EVENT_LIMITS.id_max_bytes == ID_MAX_BYTES == 256
    assert DEFAULT_EVENT_LIMITS.source_max_bytes == SOURCE_MAX_BYTES == 2048
    assert DEFAULT_EVENT_LIMITS.metadata_max_bytes == METADATA_MAX_BYTES == 64 * 1024


def test_limits_may_be_lowered_but_never_raised_above_what_the_store_holds() -> None:
    assert EventLimits(metadata_max_bytes=1024).metadata_max_bytes == 1024
    for field, ceiling in (
        ("id_max_bytes", ID_MAX_BYTES),
        ("source_max_bytes", SOURCE_MAX_BYTES),
        ("metadata_max_bytes", METADATA_MAX_BYTES),
    ):
        with pytest.raises(ValidationError, match=field):
            EventLimits.model_validate({field: ceiling + 1})
    with pytest.raises(ValidationError, match="unknown"):
        EventLimits.model_validate({"unknown": 1})


def test_id_length_counts_utf8_bytes_not_characters() -> None:
    assert DEFAULT_EVENT_LIMITS.check(_event(id="a" * 256)) is None
    # 86 CJK characters are 258 bytes: fewer characters than the limit, more bytes.
    error = _refused(_event(id="猫" * 86))
    assert (error.limit, error.reason, error.size, error.maximum) == (
        "id_max_bytes",
        "id_too_long",
        258,
        256,
    )
    assert "id_max_bytes=256" in str(error)
    assert "258 bytes" in str(error)


def test_source_reference_length_counts_bytes_for_paths_and_urls() -> None:
    path = "/data/" + "é" * 1021  # 6 + 2042 = 2048 bytes: exactly at the limit
    assert DEFAULT_EVENT_LIMITS.check(_event(image=PathImage(path=path))) is None
    error = _refused(_event(image=PathImage(path=path + "x")))
    assert (error.limit, error.reason, error.size) == ("source_max_bytes", "source_too_long", 2049)
    url = UrlImage.model_validate({"url": "https://example.org/" + "a" * 2100})
    assert _refused(_event(image=url)).limit == "source_max_bytes"


def test_metadata_size_is_measured_once_encoded_and_is_configurable() -> None:
    # {"k":"..."} is 8 bytes of JSON around the value.
    at_limit = {"k": "x" * (METADATA_MAX_BYTES - 8)}
    assert len(orjson.dumps(at_limit)) == METADATA_MAX_BYTES
    assert DEFAULT_EVENT_LIMITS.check(_event(metadata=at_limit)) is None
    error = _refused(_event(metadata={"k": "x" * (METADATA_MAX_BYTES - 7)}))
    assert (error.limit, error.reason) == ("metadata_max_bytes", "metadata_too_large")

    small = EventLimits(metadata_max_bytes=100)
    error = _refused(_event(metadata={"k": "x" * 100}), small)
    assert "metadata_max_bytes=100" in str(error)
    # The worker's default limits accept what the stricter producer refused.
    assert decode_event(encode_event(_event(metadata={"k": "x" * 100}))).metadata["k"]


def test_inline_images_are_bounded_and_the_error_says_to_publish_a_reference() -> None:
    limits = EventLimits(inline_image_max_bytes=1000)
    assert limits.check(_event(image=InlineImage(data=b"x" * 1000))) is None
    error = _refused(_event(image=InlineImage(data=b"x" * 1001)), limits)
    assert (error.limit, error.reason) == ("inline_image_max_bytes", "inline_image_too_large")
    assert "reference" in str(error)
    assert DEFAULT_EVENT_LIMITS.inline_image_max_bytes == 512 * 1024


@pytest.mark.parametrize(
    ("metadata", "where"),
    [
        ({"score": float("nan")}, "metadata.score"),
        ({"score": float("inf")}, "metadata.score"),
        ({"nested": {"deep": [1, float("-inf")]}}, r"metadata.nested.deep\[1\]"),
        ({"big": 2**63}, "metadata.big"),
        ({"when": b"bytes"}, "metadata.when"),
        ({"tags": ("a", "b")}, "metadata.tags"),
        ({"set": {1, 2}}, "metadata.set"),
        ({"inner": {1: "int key"}}, "metadata.inner"),
    ],
)
def test_metadata_must_be_json_safe(metadata: dict[str, object], where: str) -> None:
    with pytest.raises(ValidationError, match=where):
        _event(metadata=metadata)


def test_json_safe_metadata_of_every_type_round_trips() -> None:
    metadata = {
        "s": "é",
        "i": -(2**63),
        "f": 0.5,
        "b": True,
        "n": None,
        "l": [1, "two", [3.0]],
        "o": {"x": {"y": []}},
    }
    event = _event(metadata=metadata)
    assert decode_event(encode_event(event)).metadata == metadata


def test_integers_beyond_64_bits_on_the_wire_are_refused_as_schema_errors() -> None:
    payload = b'{"id": "a", "image": {"kind": "path", "path": "/x"}, "metadata": {"n": %d}}' % (
        2**64 - 1
    )
    with pytest.raises(ContractError) as caught:
        decode_event(payload)
    assert caught.value.reason == "schema_invalid"
    assert "64-bit" in str(caught.value)
