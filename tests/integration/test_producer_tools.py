"""Publishing on the real stack: ``trident-produce`` manifests (JSONL and CSV, bad lines, dry
run, summary, exit codes) and the publishers' delivery reports, sync and asyncio."""

from __future__ import annotations

import asyncio
import base64
import os
import time
from pathlib import Path

import orjson
import pytest
from confluent_kafka.admin import AdminClient, NewTopic

from engine.errors import EventTooLargeError
from engine.settings import Settings
from producer import AsyncEventPublisher, Delivery, EventPublisher
from producer.cli import main as produce
from schemas import (
    HEADER_COLLECTION,
    HEADER_VERSION,
    EventLimitError,
    EventLimits,
    IngestEvent,
    InlineImage,
    PathImage,
    decode_delete,
    decode_event,
)
from tests.integration.conftest import small_images
from tests.integration.topics import end_offsets, records_after, settings_file

pytestmark = pytest.mark.stack


def small_topic(settings: Settings, name: str, max_message_bytes: int) -> str:
    """A topic whose broker-side message limit is ``max_message_bytes``."""
    admin = AdminClient({"bootstrap.servers": settings.kafka.bootstrap_servers})
    topic = NewTopic(name, 1, config={"max.message.bytes": str(max_message_bytes)})
    admin.create_topics([topic])[name].result(timeout=30)
    return name


def incompressible(size: int) -> str:
    return base64.b64encode(os.urandom(size * 3 // 4)).decode()


def test_manifests_publish_every_good_line_and_report_the_bad_ones(
    settings: Settings, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    images = small_images(tmp_path / "images", 4)
    config = settings_file(settings, tmp_path)
    jsonl = tmp_path / "batch.jsonl"
    jsonl.write_text(
        "\n".join(
            [
                orjson.dumps({"id": "j0", "source": "images/" + images[0].name}).decode(),
                orjson.dumps(
                    {"id": "j1", "source": str(images[1]), "metadata": {"tags": ["a"]}, "k": 2}
                ).decode(),
                '{"id": "j2", "source": ',  # line 3: cut short
                orjson.dumps(
                    {"id": "j3", "source": str(images[2]), "metadata": {"big": "x" * 70_000}}
                ).decode(),
            ]
        )
        + "\n"
    )
    csv = tmp_path / "batch.csv"
    csv.write_text(
        "id,source,camera,collection\n"
        f"c0,images/{images[3].name},nikon,pets\n"
        "c1,,canon,\n"  # line 3: no source
        "c2,https://example.org/c2.jpg,,\n"
    )
    manifests = ["--manifest", str(jsonl), "--manifest", str(csv)]
    before = end_offsets(settings, settings.kafka.topic)

    assert produce(["--config", str(config), "--dry-run", *manifests]) == 1
    out = capsys.readouterr().out
    assert "dry run, nothing published: valid=4 invalid=3" in out
    assert f"{jsonl}:3: not valid JSON" in out
    assert f"{jsonl}:4: metadata is " in out
    assert "metadata_max_bytes=65536" in out
    assert f"{csv}:3: no source" in out
    assert end_offsets(settings, settings.kafka.topic) == before

    assert produce(["--config", str(config), *manifests]) == 1
    out = capsys.readouterr().out
    assert "delivered=4 failed=3" in out
    assert "rate=" in out
    events = {
        e.id: e
        for e in (
            decode_event(m.value()) for m in records_after(settings, settings.kafka.topic, before)
        )
    }
    assert sorted(events) == ["c0", "c2", "j0", "j1"]
    assert events["j0"].image == PathImage(path=str(images[0]))  # relative to the manifest
    assert (events["j1"].metadata["tags"], events["j1"].metadata["k"]) == (["a"], 2)
    assert (events["c0"].metadata["camera"], events["c0"].collection) == ("nikon", "pets")
    assert str(events["c2"].source()) == "https://example.org/c2.jpg"

    good = tmp_path / "good.jsonl"
    good.write_text(orjson.dumps({"source": str(images[0])}).decode() + "\n")
    assert produce(["--config", str(config), "--manifest", str(good)]) == 0
    assert "delivered=1 failed=0" in capsys.readouterr().out


def test_an_event_larger_than_the_broker_accepts_is_a_delivery_error(
    settings: Settings, unique: str, tmp_path: Path
) -> None:
    topic = small_topic(settings, f"small-{unique}", 2048)
    fits = IngestEvent(id="fits", image=PathImage(path="/data/a.png"))
    large = IngestEvent(
        id="large", image=PathImage(path="/data/b.png"), metadata={"blob": incompressible(8000)}
    )
    failed: list[Delivery] = []
    with EventPublisher(settings.kafka, topic=topic) as publisher:
        publisher.publish(fits)
        # Flushed apart: librdkafka fails a whole batch the broker finds too large.
        publisher.flush()
        publisher.publish(large, on_delivery=failed.append)
        report = publisher.flush()
        with pytest.raises(EventLimitError, match="id_max_bytes"):
            publisher.publish(IngestEvent(id="é" * 200, image=PathImage(path="/x")))
    assert (report.delivered, report.failed) == (1, 1)
    assert failed[0].key == "large"
    assert isinstance(failed[0].error, EventTooLargeError)
    assert "MSG_SIZE_TOO_LARGE" in str(failed[0].error)
    assert report.failures == failed
    assert sum(end_offsets(settings, topic).values()) == 1  # the refused id was never sent


def test_the_asyncio_publisher_delivers_in_order_and_reports_errors(
    settings: Settings, unique: str, tmp_path: Path
) -> None:
    topic = small_topic(settings, f"small-{unique}", 2048)
    before = end_offsets(settings, settings.kafka.topic)
    events = [IngestEvent(id=f"async-{i}", image=PathImage(path=f"/d/{i}.png")) for i in range(30)]
    # The local bound (message.max.bytes, 1 MB) is below what these limits allow inline.
    generous = EventLimits(inline_image_max_bytes=2_000_000)
    too_big_inline = IngestEvent(id="inline", image=InlineImage(data=os.urandom(1_200_000)))

    async def scenario() -> tuple[object, ...]:
        async with AsyncEventPublisher(settings.kafka) as publisher:
            report = await publisher.publish_many(events[:20])
            singles = await asyncio.gather(*(publisher.publish(e) for e in events[20:]))
            with pytest.raises(EventLimitError, match="inline_image_max_bytes"):
                await publisher.publish(too_big_inline)
        async with AsyncEventPublisher(settings.kafka, topic=topic, limits=generous) as small:
            broker_refused = await small.publish(
                IngestEvent(
                    id="big", image=PathImage(path="/x"), metadata={"b": incompressible(8000)}
                )
            )
            locally_refused = await small.publish(too_big_inline)
            accepted = await small.publish(IngestEvent(id="ok", image=PathImage(path="/x")))
        return report, singles, broker_refused, locally_refused, accepted

    report, singles, broker_refused, locally_refused, accepted = asyncio.run(scenario())
    assert (report.delivered, report.failed) == (20, 0)  # type: ignore[attr-defined]
    assert all(d.ok and d.offset is not None for d in singles)  # type: ignore[attr-defined]
    for refused in (broker_refused, locally_refused):
        assert isinstance(refused, Delivery)
        assert isinstance(refused.error, EventTooLargeError), refused
    assert isinstance(accepted, Delivery)
    assert (accepted.ok, accepted.partition, accepted.offset) == (True, 0, 0)

    written = records_after(settings, settings.kafka.topic, before)
    assert sorted(m.key().decode() for m in written) == sorted(e.id for e in events)
    where = {d.key: (d.partition, d.offset) for d in singles}  # type: ignore[attr-defined]
    for message in written:
        if message.key().decode() in where:
            assert where[message.key().decode()] == (message.partition(), message.offset())


def test_deletes_arrive_as_tombstones_in_their_ids_partitions(
    settings: Settings, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``trident-produce --delete``: ids from the command line, a list file and a manifest become
    tombstones (key the id, null value, version and collection headers), each in the partition
    its upserts went to, after them; a bad id fails alone (exit status 1)."""
    config = settings_file(settings, tmp_path)
    ids = ["cats/1.png", "dogs/2.png", "猫/3", "list-a", "list-b", "m1", "m2"]
    before = end_offsets(settings, settings.kafka.topic)
    with EventPublisher(settings.kafka) as publisher:
        for event_id in ids:
            publisher.publish(IngestEvent(id=event_id, image=PathImage(path="/x.png"), version=1))
        assert publisher.flush().delivered == len(ids)
    upserted = records_after(settings, settings.kafka.topic, before)
    partition_of = {m.key().decode(): m.partition() for m in upserted}
    listed = tmp_path / "ids.txt"
    listed.write_text("# gone\nlist-a\nlist-b\n")
    manifest = tmp_path / "gone.csv"
    manifest.write_text("id,collection,note\nm1,,x\nm2,pets,y\n")

    middle = end_offsets(settings, settings.kafka.topic)
    started_us = time.time_ns() // 1000
    code = produce(
        [
            "--config",
            str(config),
            "--delete",
            *ids[:3],
            "--from-file",
            str(listed),
            "--manifest",
            str(manifest),
            "--collection",
            "photos",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    assert "delivered=7 failed=0" in out
    tombstones = records_after(settings, settings.kafka.topic, middle)
    assert sorted(m.key().decode() for m in tombstones) == sorted(ids)
    for message in tombstones:
        event_id = message.key().decode()
        assert message.value() is None
        assert message.partition() == partition_of[event_id]  # with its upserts, after them
        headers = dict(message.headers())
        assert headers[HEADER_COLLECTION] == (b"pets" if event_id == "m2" else b"photos")
        version = int(headers[HEADER_VERSION])
        assert started_us <= version <= time.time_ns() // 1000  # as of now: newer than v1
        assert decode_delete(message.key(), message.headers(), timestamp_ms=None).id == event_id

    after = end_offsets(settings, settings.kafka.topic)
    code = produce(["--config", str(config), "--delete", "ok", "é" * 200])
    out = capsys.readouterr().out
    assert code == 1
    assert "delivered=1 failed=1" in out and "id_max_bytes" in out
    assert [m.key() for m in records_after(settings, settings.kafka.topic, after)] == [b"ok"]
