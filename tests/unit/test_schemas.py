"""The ingest event contract: round trips, validation, clear errors."""

from __future__ import annotations

import base64
import re
from collections.abc import Callable

import orjson
import pytest
from pydantic import ValidationError

from schemas import (
    EVENT_SCHEMA_VERSION,
    ContractError,
    IngestEvent,
    InlineImage,
    PathImage,
    SearchRequest,
    UrlImage,
    decode_event,
    encode_event,
)
from schemas.search import COLLECTION_NAME_PATTERN, SearchOptions


@pytest.mark.parametrize(
    "image",
    [
        PathImage(path="/data/cat.jpg"),
        UrlImage(url="https://example.org/cat.jpg"),  # type: ignore[arg-type]
        InlineImage(data=b"\x89PNG\r\n\x1a\nrest"),
    ],
)
def test_round_trip_keeps_every_field(image: PathImage | UrlImage | InlineImage) -> None:
    event = IngestEvent(
        id="cat-1", image=image, metadata={"tags": ["a", "b"], "n": 3}, collection="pets"
    )
    decoded = decode_event(encode_event(event))
    assert decoded == event
    assert decoded.schema_version == EVENT_SCHEMA_VERSION


def test_inline_bytes_travel_as_base64() -> None:
    event = IngestEvent(id="x", image=InlineImage(data=b"\x00\x01binary"))
    wire = orjson.loads(encode_event(event))
    assert wire["image"] == {"kind": "inline", "data": base64.b64encode(b"\x00\x01binary").decode()}


def test_versions_default_to_increasing_timestamps() -> None:
    first = IngestEvent(id="a", image=PathImage(path="/p"))
    second = IngestEvent(id="a", image=PathImage(path="/p"))
    assert second.version >= first.version > 0


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"", "empty_event"),
        (b"{not json", "malformed_json"),
        (b"[1, 2]", "schema_invalid"),
        (b'{"id": "a"}', "schema_invalid"),
        (b'{"id": "", "image": {"kind": "path", "path": "/x"}}', "schema_invalid"),
        (b'{"id": "a", "image": {"kind": "ftp", "path": "/x"}}', "unknown_image_kind"),
        (b'{"id": "a", "image": {"kind": "url", "url": "file:///etc/passwd"}}', "schema_invalid"),
        (b'{"id": "a", "image": {"kind": "inline", "data": "***"}}', "schema_invalid"),
        (b'{"id": "a", "image": {"kind": "path", "path": "/x\\u0000.jpg"}}', "schema_invalid"),
        (b'{"id": "a", "image": {"kind": "path", "path": "/x"}, "surprise": 1}', "schema_invalid"),
        (
            b'{"schema_version": 99, "id": "a", "image": {"kind": "path", "path": "/x"}}',
            "unsupported_schema_version",
        ),
        (
            b'{"id": "a", "image": {"kind": "path", "path": "/x"}, "collection": "1bad-name"}',
            "schema_invalid",
        ),
    ],
)
def test_invalid_payloads_raise_a_clear_permanent_error(payload: bytes, reason: str) -> None:
    with pytest.raises(ContractError) as caught:
        decode_event(payload)
    assert caught.value.reason == reason
    assert str(caught.value)


def test_error_names_the_offending_field() -> None:
    with pytest.raises(ContractError, match="image"):
        decode_event(b'{"id": "a"}')


def test_search_request_needs_exactly_one_query() -> None:
    assert SearchRequest(query_input="/x.jpg").topk == 10
    with pytest.raises(ValueError, match="exactly one"):
        SearchRequest()
    with pytest.raises(ValueError, match="exactly one"):
        SearchRequest(query_input="/x.jpg", vector=[0.1])
    with pytest.raises(ValueError):
        SearchRequest(vector=[0.1], topk=0)


def test_the_contracts_import_nothing_else_of_the_project() -> None:
    import ast  # noqa: PLC0415
    from pathlib import Path  # noqa: PLC0415

    project = {"engine", "worker", "producer", "query_api", "devstack"}
    offenders = []
    for path in (Path(__file__).parents[2] / "schemas").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else [alias.name for alias in node.names]
                if isinstance(node, ast.Import)
                else []
            )
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] in project]
    assert not offenders


@pytest.mark.parametrize(
    "name", ["images", "_x", "Pets_2", "a" * 255, "a" * 256, "2pets", "bad name!", "", "chats-1"]
)
def test_events_and_searches_share_one_collection_name_rule(name: str) -> None:
    def accepted(build: Callable[[], object]) -> bool:
        try:
            build()
        except ValidationError:
            return False
        return True

    event = accepted(lambda: IngestEvent(id="x", image=PathImage(path="/a"), collection=name))
    search = accepted(lambda: SearchOptions(collection_name=name))
    assert event == search == bool(re.fullmatch(COLLECTION_NAME_PATTERN, name))
