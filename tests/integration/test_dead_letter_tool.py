"""``trident-dlq`` on the real stack: records dead-lettered by a real worker are inspected,
replayed after the fix and stored; the replay cap and the filters hold; nothing else moves."""

from __future__ import annotations

import shutil
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
from confluent_kafka import Consumer, TopicPartition
from confluent_kafka.admin import AdminClient

from engine.kafka import consumer_config
from engine.settings import Settings
from engine.store import VectorStore
from producer import EventPublisher
from producer.dlq_cli import main as dlq
from schemas import IngestEvent, PathImage
from schemas.dead_letter import DEAD_LETTER_HEADERS, HEADER_REPLAY_COUNT
from tests.integration.conftest import (
    committed_everything,
    dead_letters,
    running_worker,
    small_images,
    wait_for,
)
from tests.integration.topics import end_offsets, records_after, settings_file

pytestmark = pytest.mark.stack


def group_offsets(settings: Settings) -> dict[tuple[str, int], int]:
    """The workers' committed offsets on the ingest, retry and dead-letter topics."""
    probe = Consumer(consumer_config(settings.kafka))  # the workers' group id; never subscribes
    try:
        partitions = [
            TopicPartition(topic, p)
            for topic in settings.kafka.topics().all
            for p in end_offsets(settings, topic)
        ]
        return {(tp.topic, tp.partition): tp.offset for tp in probe.committed(partitions, 10)}
    finally:
        probe.close()


def reader_groups(settings: Settings) -> list[str]:
    """Consumer groups the broker knows that the dead-letter tool could have made."""
    admin = AdminClient({"bootstrap.servers": settings.kafka.bootstrap_servers})
    listed = admin.list_consumer_groups(request_timeout=10).result()
    return [g.group_id for g in listed.valid if g.group_id.startswith("trident-dlq")]


def run_dlq(args: list[str], config: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    command, *rest = args
    code = dlq([command, "--config", str(config), *rest])
    return code, capsys.readouterr().out


def json_lines(output: str) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in output.splitlines() if line.strip()]


def publish(settings: Settings, events: list[IngestEvent], **raw: bytes) -> None:
    with EventPublisher(settings.kafka) as publisher:
        for event in events:
            publisher.publish(event)
        for key, value in raw.items():
            publisher.publish_raw(key.encode(), value, headers=[("origin", b"test")])
        report = publisher.flush()
    assert report.failed == 0, report.failures


def test_missing_files_are_inspected_replayed_after_the_fix_and_stored(
    settings: Settings, store: VectorStore, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = settings_file(settings, tmp_path)
    staged = small_images(tmp_path / "staging", 3)
    final = tmp_path / "images"
    events = [
        IngestEvent(id=f"late-{i}", image=PathImage(path=str(final / p.name)), version=100 + i)
        for i, p in enumerate(staged)
    ]
    with running_worker(settings):
        publish(settings, events)
        wait_for(lambda: len(dead_letters(settings)) == 3, timeout=120, what="3 dead letters")

        code, out = run_dlq(["inspect"], config, capsys)
        assert code == 0
        assert f"dead-letter topic {settings.kafka.dead_letter_topic}: 3 records" in out
        assert "fetch/not_found  3" in out
        assert f"{settings.kafka.topic}  3" in out  # by source topic

        code, out = run_dlq(["inspect", "--json"], config, capsys)
        rows = json_lines(out)
        assert sorted(r["id"] for r in rows) == ["late-0", "late-1", "late-2"]
        for row in rows:
            assert (row["stage"], row["reason"], row["replay_count"]) == ("fetch", "not_found", 0)
            assert row["event"]["image"]["path"].startswith(str(final))
            assert row["attempts"] == 1
            assert row["first_failed_at"]

        code, out = run_dlq(["inspect", "--id", "late-1"], config, capsys)
        assert code == 0
        assert "fetch / not_found" in out
        assert '"id": "late-1"' in out

        retry = settings.kafka.topics().retry
        ingest_before = end_offsets(settings, settings.kafka.topic)
        retry_before = end_offsets(settings, retry)
        code, out = run_dlq(["replay", "--dry-run"], config, capsys)
        assert code == 0
        assert "would_replay=3 refused=0" in out
        assert out.count(f"to {retry} as replay 1") == 3
        assert end_offsets(settings, retry) == retry_before  # nothing published

        shutil.move(tmp_path / "staging", final)  # the fix: the files appear
        code, out = run_dlq(["replay"], config, capsys)
        assert code == 0, out
        assert f"replayed=3 failed=0 refused=0 duplicates=0 to {retry}" in out
        # To the retry topic, never to the compacted ingest topic (its last word of an id must
        # stay the newest version published).
        assert end_offsets(settings, settings.kafka.topic) == ingest_before
        assert len(records_after(settings, retry, retry_before)) == 3
        wait_for(lambda: store.count() == 3, timeout=300, what="3 replayed images stored")
        wait_for(lambda: committed_everything(settings), timeout=60, what="offsets committed")
    stored = {row["id"]: row for row in store.get(["late-0", "late-1", "late-2"])}
    assert sorted(stored) == ["late-0", "late-1", "late-2"]
    assert stored["late-2"]["event_version"] == 102  # the replay kept the event's version
    # The dead-letter topic is unchanged: still the three first failures, nothing new.
    assert len(dead_letters(settings)) == 3


@pytest.mark.usefixtures("store")  # drops the worker's collection afterwards
def test_the_replay_cap_stops_a_record_that_keeps_failing(
    settings: Settings, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = settings_file(settings, tmp_path)
    never = IngestEvent(id="never", image=PathImage(path=str(tmp_path / "never.png")))
    with running_worker(settings):
        publish(settings, [never])
        wait_for(lambda: len(dead_letters(settings)) == 1, timeout=120, what="a dead letter")
        code, out = run_dlq(["replay", "--max-replays", "2"], config, capsys)
        assert (code, "replayed=1" in out) == (0, True), out
        wait_for(lambda: len(dead_letters(settings)) == 2, timeout=120, what="failed again")
        code, out = run_dlq(["replay", "--max-replays", "2"], config, capsys)
        assert "replayed=1 failed=0 refused=0 duplicates=1" in out, out
        wait_for(lambda: len(dead_letters(settings)) == 3, timeout=120, what="failed a third time")

        retry_before = end_offsets(settings, settings.kafka.topics().retry)
        code, out = run_dlq(["replay", "--max-replays", "2"], config, capsys)
        assert code == 1
        assert "replayed 2 times already (the cap is 2)" in out
        assert "replayed=0 failed=0 refused=1 duplicates=2" in out
        assert end_offsets(settings, settings.kafka.topics().retry) == retry_before
    code, out = run_dlq(["inspect", "--json"], config, capsys)
    assert sorted(r["replay_count"] for r in json_lines(out)) == [0, 1, 2]


@pytest.mark.usefixtures("store")
def test_filters_select_exactly_and_a_replay_keeps_key_value_and_headers(
    settings: Settings, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = settings_file(settings, tmp_path)
    missing = [
        IngestEvent(id=f"a-missing-{i}", image=PathImage(path=str(tmp_path / f"m{i}.png")))
        for i in range(3)
    ]
    outside = [
        IngestEvent(id=f"a-outside-{i}", image=PathImage(path="/etc/hostname")) for i in (0, 1)
    ]
    with running_worker(settings):
        publish(settings, missing + outside, **{"a-malformed": b'{"id": "a-malformed", '})
        wait_for(lambda: len(dead_letters(settings)) == 6, timeout=120, what="first batch")
        between = datetime.now(UTC)
        time.sleep(0.05)
        later = [
            IngestEvent(id=f"b-missing-{i}", image=PathImage(path=str(tmp_path / f"n{i}.png")))
            for i in range(2)
        ]
        publish(settings, later)
        wait_for(lambda: len(dead_letters(settings)) == 8, timeout=120, what="second batch")
        wait_for(lambda: committed_everything(settings), timeout=60, what="offsets committed")
    offsets_before = group_offsets(settings)

    def selected(*flags: str) -> list[str]:
        code, out = run_dlq(["inspect", "--json", *flags], config, capsys)
        assert code == 0
        return sorted(row["id"] for row in json_lines(out))

    everything = json_lines(run_dlq(["inspect", "--json"], config, capsys)[1])
    assert len(everything) == 8
    assert selected("--stage", "decode_event") == ["a-malformed"]
    assert selected("--reason", "path_not_allowed") == ["a-outside-0", "a-outside-1"]
    assert selected("--reason", "not_found", "--id-glob", "b-*") == ["b-missing-0", "b-missing-1"]
    assert selected("--id", "a-missing-1", "--id", "b-missing-0") == ["a-missing-1", "b-missing-0"]
    assert selected("--since", between.isoformat()) == ["b-missing-0", "b-missing-1"]
    assert len(selected("--until", between.isoformat())) == 6
    assert selected("--stage", "fetch", "--reason", "malformed_json") == []
    # A partition and offset range: exactly the records in it.
    first = everything[0]
    in_partition = sorted(
        (r["offset"], r["id"]) for r in everything if r["partition"] == first["partition"]
    )
    low, high = in_partition[0][0], in_partition[-1][0]
    flags = ["--partition", str(first["partition"]), "--from-offset", str(low)]
    assert selected(*flags, "--to-offset", str(high)) == sorted(i for _, i in in_partition)
    assert selected(*flags, "--to-offset", str(low)) == [in_partition[0][1]]
    # One record in full by its offset; an id that is not there is exit status 1.
    code, out = run_dlq(
        ["inspect", "--partition", str(first["partition"]), "--offset", str(high)], config, capsys
    )
    assert (code, out.count("\npartition ") + out.startswith("partition ")) == (0, 1)
    assert f"partition {first['partition']} offset {high}" in out
    assert f"id:               {in_partition[-1][1]}" in out
    assert run_dlq(["inspect", "--id", "not-there"], config, capsys) == (1, "no such record\n")

    # A real replay of one reason publishes exactly those records, as they were sent, to the
    # retry topic, each in the partition it failed in (its id's partition).
    ingest_before = end_offsets(settings, settings.kafka.topic)
    retry = settings.kafka.topics().retry
    retry_before = end_offsets(settings, retry)
    code, out = run_dlq(
        ["replay", "--reason", "malformed_json", "--reason", "path_not_allowed", "--rate", "20"],
        config,
        capsys,
    )
    assert code == 0, out
    assert "replayed=3 failed=0 refused=0" in out
    assert end_offsets(settings, settings.kafka.topic) == ingest_before
    replayed = records_after(settings, retry, retry_before)
    failed_in = {row["id"]: row["source"]["partition"] for row in everything}
    assert {m.key().decode(): m.partition() for m in replayed} == {
        m.key().decode(): failed_in[m.key().decode()] for m in replayed
    }
    by_key = {m.key().decode(): m for m in replayed}
    assert sorted(by_key) == ["a-malformed", "a-outside-0", "a-outside-1"]
    assert by_key["a-malformed"].value() == b'{"id": "a-malformed", '
    assert IngestEvent.model_validate_json(by_key["a-outside-1"].value()) == outside[1]
    for message in replayed:
        headers = dict(message.headers())
        assert headers[HEADER_REPLAY_COUNT] == b"1"
        assert not set(headers) & DEAD_LETTER_HEADERS
    assert dict(by_key["a-malformed"].headers())["origin"] == b"test"
    # The tool moved no offsets of the workers, made no group, and left the DLQ topic as it was.
    assert group_offsets(settings) == offsets_before
    assert reader_groups(settings) == []
    assert len(dead_letters(settings)) == 8


def test_a_missing_dead_letter_topic_is_a_clear_error(
    settings: Settings, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    absent = settings.model_copy(
        update={
            "kafka": settings.kafka.model_copy(update={"dead_letter_topic": "no-such-dlq-topic"})
        }
    )
    assert dlq(["inspect", "--config", str(settings_file(absent, tmp_path))]) == 2
    assert "'no-such-dlq-topic' does not exist" in caplog.text
