"""Dead-letter records, filters and the replay plan (records built here; the real topic is used
in tests/integration/test_dead_letter_tool.py)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import orjson
import pytest

from producer.dead_letters import (
    DeadLetterFilter,
    DeadLetterRecord,
    plan_replay,
    replay,
    replay_headers,
)
from producer.dlq_cli import parse_time
from producer.publisher import Delivery
from schemas.dead_letter import (
    DEAD_LETTER_HEADERS,
    HEADER_ATTEMPTS,
    HEADER_PARTITION,
    HEADER_REASON,
    HEADER_REPLAY_COUNT,
    HEADER_STAGE,
    HEADER_TOPIC,
)

T0 = datetime(2026, 12, 1, 8, 0, tzinfo=UTC)


def letter(
    key: str | None,
    *,
    offset: int = 0,
    partition: int = 0,
    stage: str = "fetch",
    reason: str = "not_found",
    replays: int | None = None,
    at: datetime = T0,
    value: bytes | None = None,
) -> DeadLetterRecord:
    headers: list[tuple[str, bytes | None]] = [
        ("origin", b"camera-7"),
        (HEADER_TOPIC, b"trident.ingest"),
        (HEADER_STAGE, stage.encode()),
        (HEADER_REASON, reason.encode()),
        (HEADER_ATTEMPTS, b"1"),
    ]
    if replays is not None:
        headers.insert(1, (HEADER_REPLAY_COUNT, str(replays).encode()))
    payload = value if value is not None else orjson.dumps({"id": key, "version": 5})
    return DeadLetterRecord(
        partition, offset, at, key.encode() if key else None, payload, tuple(headers)
    )


def test_a_record_reads_its_headers_and_its_event() -> None:
    record = letter("cats/1.jpg", replays=2)
    assert (record.id, record.stage, record.reason, record.replay_count) == (
        "cats/1.jpg",
        "fetch",
        "not_found",
        2,
    )
    data = record.to_json()
    assert data["event"] == {"id": "cats/1.jpg", "version": 5}
    assert (data["attempts"], data["replay_count"], data["source"]["topic"]) == (
        1,
        2,
        "trident.ingest",
    )
    assert "value" not in data
    raw = letter(None, value=b"{broken", stage="decode_event", reason="malformed_json")
    assert raw.id == ""
    assert raw.to_json()["event"] is None
    assert raw.to_json()["value"] == "{broken"
    assert letter(None, value=b'{"id": "from-value"}').id == "from-value"
    assert letter(None, value=b'{"id": 7}').id == ""
    assert letter("x").replay_count == 0


def test_filters_select_exactly_what_they_name() -> None:
    records = [
        letter("a-1", offset=0, at=T0),
        letter("a-2", offset=1, stage="decode_event", reason="malformed_json", at=T0),
        letter("b-1", offset=2, reason="path_not_allowed", at=T0 + timedelta(hours=1)),
        letter("b-2", offset=0, partition=1, at=T0 + timedelta(hours=2)),
    ]

    def ids(selection: DeadLetterFilter) -> list[str]:
        return [r.id for r in records if selection.matches(r)]

    assert ids(DeadLetterFilter()) == ["a-1", "a-2", "b-1", "b-2"]
    assert ids(DeadLetterFilter(stages=frozenset({"decode_event"}))) == ["a-2"]
    assert ids(DeadLetterFilter(reasons=frozenset({"not_found"}))) == ["a-1", "b-2"]
    assert ids(DeadLetterFilter(ids=frozenset({"b-1"}))) == ["b-1"]
    assert ids(DeadLetterFilter(id_globs=("a-*",))) == ["a-1", "a-2"]
    assert ids(DeadLetterFilter(ids=frozenset({"b-2"}), id_globs=("a-?",))) == ["a-1", "a-2", "b-2"]
    assert ids(DeadLetterFilter(since=T0 + timedelta(hours=1))) == ["b-1", "b-2"]
    assert ids(DeadLetterFilter(until=T0 + timedelta(hours=1))) == ["a-1", "a-2"]
    assert ids(DeadLetterFilter(partitions=frozenset({1}))) == ["b-2"]
    assert ids(DeadLetterFilter(partitions=frozenset({0}), from_offset=1, to_offset=1)) == ["a-2"]
    assert ids(DeadLetterFilter(reasons=frozenset({"not_found"}), id_globs=("b-*",))) == ["b-2"]


def test_replay_keeps_original_headers_drops_ours_and_counts_up() -> None:
    headers = dict(replay_headers(letter("x", replays=1)))
    assert headers["origin"] == b"camera-7"
    assert headers[HEADER_REPLAY_COUNT] == b"2"
    assert not set(headers) & DEAD_LETTER_HEADERS
    assert [k for k, _ in replay_headers(letter("x"))].count(HEADER_REPLAY_COUNT) == 1
    assert dict(replay_headers(letter("x")))[HEADER_REPLAY_COUNT] == b"1"


def test_the_plan_refuses_records_at_the_cap_and_keeps_the_latest_copy() -> None:
    records = [
        letter("loops", offset=0),  # first failure
        letter("loops", offset=3, replays=1),  # failed again after one replay
        letter("loops", offset=5, replays=2),  # and again
        letter("fixed", offset=1),
        letter("other-version", offset=2, value=orjson.dumps({"id": "loops", "version": 6})),
    ]
    plan = plan_replay(records, max_replays=2)
    assert [r.offset for r in plan.replay] == [1, 2]
    assert [(r.offset, "replayed 2 times" in why) for r, why in plan.refused] == [(5, True)]
    assert sorted(r.offset for r in plan.duplicates) == [0, 3]
    relaxed = plan_replay(records, max_replays=3)
    assert [r.offset for r in relaxed.replay] == [1, 2, 5]
    assert not relaxed.refused


def test_times_are_iso_or_ages() -> None:
    assert parse_time("2026-12-01T08:00:00Z") == T0
    assert parse_time("2026-12-01T08:00:00") == T0  # UTC unless it says otherwise
    assert parse_time("2026-12-01T09:00:00+01:00") == T0
    before = datetime.now(UTC)
    two_hours_ago = parse_time("2h")
    assert before - timedelta(hours=2) <= two_hours_ago <= datetime.now(UTC) - timedelta(hours=2)
    with pytest.raises(argparse.ArgumentTypeError, match="age"):
        parse_time("yesterday")


class RecordingPublisher:
    """The part of ``EventPublisher`` a replay uses; every record acknowledged."""

    def __init__(self) -> None:
        self.sent: list[tuple[bytes | None, int]] = []

    def publish_raw(
        self,
        key: bytes | None,
        value: bytes | None,
        headers: object = None,
        *,
        on_delivery: Callable[[Delivery], None] | None = None,
        partition: int = -1,
    ) -> None:
        self.sent.append((key, partition))
        if on_delivery is not None:
            on_delivery(Delivery((key or b"").decode(), "retry", partition, 0))

    def flush(self, timeout_s: float = 0) -> None:
        pass


def test_a_replay_goes_to_the_partition_it_was_dead_lettered_from() -> None:
    """The retry topic is co-partitioned with the ingest topic: the partition a record failed in
    is its id's, whatever partitioner its producer used; unknown, or another topic: by key."""
    failed_in_3 = replace(letter("a"), headers=(*letter("a").headers, (HEADER_PARTITION, b"3")))
    unknown = letter("b")
    publisher = RecordingPublisher()
    report = replay([failed_in_3, unknown], publisher)  # type: ignore[arg-type]
    assert publisher.sent == [(b"a", 3), (b"b", -1)]
    assert report.delivered == 2
    elsewhere = RecordingPublisher()
    replay([failed_in_3], elsewhere, keep_partition=False)  # type: ignore[arg-type]
    assert elsewhere.sent == [(b"a", -1)]
    assert failed_in_3.source_partition == 3
    assert unknown.source_partition is None
