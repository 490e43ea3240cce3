"""Fault scenarios on the real stack: crashes and outages lose nothing, bad input is isolated.

Each scenario prints ``scenario=<name> produced=<n> stored=<n> dead_lettered=<n> lost=<n>``
(run with ``-s`` to see it) and asserts ``lost=0``.
"""

from __future__ import annotations

import io
import re
import struct
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import orjson
import pytest
from confluent_kafka import KafkaError, Message, Producer
from PIL import Image

from devstack.kafka import KafkaCluster, KafkaNode
from devstack.stack import LocalStack
from engine.kafka import ensure_topics, producer_config
from engine.settings import Settings
from engine.store import VectorStore
from producer import EventPublisher, event_for_reference
from schemas import IngestEvent, InlineImage, PathImage, UrlImage, encode_event
from schemas.dead_letter import HEADER_ATTEMPTS, HEADER_REASON, HEADER_STAGE
from tests.conftest import PORT_OFFSET
from tests.integration.conftest import (
    committed_everything,
    dead_letters,
    report,
    safe_count,
    small_images,
    stored_ids,
    wait_for,
    worker_alive,
    worker_metric,
    worker_processes,
)
from tests.support.http_host import Reply, loopback_host

pytestmark = [pytest.mark.stack, pytest.mark.faults]

# Events per scenario: fifteen batches of 16, so a fault lands mid-stream with batches on
# either side of it.
STREAM = 240
# Two workers sharing a stream: long enough that the second joins while the first is busy.
SHARED_STREAM = 500
# The scenarios' workers retry and pause on a shorter clock than the suite's other tests, so an
# outage of a few seconds spans as many retry/pause/rewind cycles (each well under a second) as
# the longer outages did on the slower clock. What is tested stays: calls retried, partitions
# paused and rewound, nothing dead-lettered.
FAST_RETRY = {"attempts": 3, "initial_backoff_s": 0.05, "max_backoff_s": 0.2, "pause_s": 0.5}


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """The integration settings with :data:`FAST_RETRY`."""
    return settings.model_copy(update={"retry": settings.retry.model_copy(update=FAST_RETRY)})


def publish_folder(settings: Settings, paths: list[Path]) -> list[str]:
    events = [event_for_reference(str(p), event_id=p.name) for p in paths]
    with EventPublisher(settings.kafka) as publisher:
        report_ = publisher.publish_many(events)
    assert report_.delivered == len(events)
    return [e.id for e in events]


def assert_stream_complete(
    scenario: str, ids: list[str], settings: Settings, store: VectorStore
) -> list[Message]:
    """Report the scenario's line; assert every id stored exactly once. Returns the dead letters."""
    stored = stored_ids(store, settings.milvus.collection)
    dead = dead_letters(settings)
    lost = len(set(ids) - set(stored))
    report(scenario, produced=len(ids), stored=len(set(stored)), dead_lettered=len(dead), lost=lost)
    assert lost == 0
    assert len(stored) == len(set(stored)) == len(ids), "an id is stored more than once"
    return dead


def run_outage(
    stack: LocalStack,
    settings: Settings,
    store: VectorStore,
    tmp_path: Path,
    *,
    scenario: str,
    fault: Callable[[Callable[[], None]], None],
    count: int = STREAM,
    must_pause: bool = True,
) -> None:
    """Stream ``count`` events, apply ``fault`` once ingest is under way, check nothing is lost.

    Half the events are published first; ``fault(publish_rest)`` takes a service down and up
    again and calls ``publish_rest`` once on the way, to publish the other half: published while
    Triton or Milvus is down, they meet the outage whatever the worker's speed. With
    ``must_pause``, the worker must have paused its partitions (the outage's handling).
    """
    paths = small_images(tmp_path, count)
    ids = publish_folder(settings, paths[: count // 2])

    def publish_rest() -> None:
        ids.extend(publish_folder(settings, paths[count // 2 :]))

    with worker_processes(stack, settings, [f"{scenario}-worker"]) as (worker,):
        wait_for(lambda: safe_count(store) >= 30, timeout=240, what="ingest under way")
        fault(publish_rest)
        assert len(ids) == count, "the fault never published the rest of the stream"
        wait_for(
            lambda: worker_alive(worker) and safe_count(store) == count,
            timeout=400,
            what=f"all {count} stored",
        )
        pauses = worker_metric(worker, "trident_partition_pauses_total")
    dead = assert_stream_complete(scenario, ids, settings, store)
    assert dead == [], "an outage must never produce dead letters"
    if must_pause:
        assert pauses >= 1, "the worker never paused: the outage missed the stream"


def test_worker_killed_mid_stream_then_restarted(
    stack: LocalStack, settings: Settings, store: VectorStore, tmp_path: Path
) -> None:
    ids = publish_folder(settings, small_images(tmp_path, STREAM))
    with worker_processes(stack, settings, ["victim"]) as (victim,):
        wait_for(lambda: safe_count(store) >= 50, timeout=240, what="ingest under way")
        victim.kill()  # SIGKILL: no chance to commit or leave the group
        killed_at = safe_count(store)
    assert killed_at < STREAM, "the stream finished before the kill; make it longer"
    with worker_processes(stack, settings, ["successor"]):
        wait_for(lambda: safe_count(store) == STREAM, timeout=600, what=f"all {STREAM} stored")
    assert_stream_complete("worker_kill9", ids, settings, store)


@pytest.mark.stops_services
@pytest.mark.parametrize(
    ("service", "down_s", "scenario"),
    [
        ("triton", 6, "triton_outage"),
        ("milvus", 6, "milvus_outage"),
        # Longer than the consumer's session timeout (6 s): the worker loses its partitions
        # and must take them back.
        ("kafka", 10, "kafka_restart"),
    ],
)
def test_service_outage_during_ingest(
    stack: LocalStack,
    settings: Settings,
    store: VectorStore,
    tmp_path: Path,
    *,
    service: str,
    down_s: int,
    scenario: str,
) -> None:
    """Stop a service mid-stream, keep it down, start it again: all stored, no dead letters."""
    server = getattr(stack, service)

    def fault(publish_rest: Callable[[], None]) -> None:
        server.stop()
        down_until = time.monotonic() + down_s
        if service != "kafka":
            publish_rest()
        time.sleep(max(0.0, down_until - time.monotonic()))
        server.start()
        if service == "kafka":  # published once it is back: consuming resumed after a restart
            publish_rest()

    # A worker that had finished the first half when Kafka went down has nothing to pause for.
    run_outage(
        stack,
        settings,
        store,
        tmp_path,
        scenario=scenario,
        fault=fault,
        must_pause=service != "kafka",
    )


@pytest.mark.stops_services
def test_milvus_killed_mid_ingest_keeps_every_acknowledged_upsert(
    stack: LocalStack, settings: Settings, store: VectorStore, tmp_path: Path
) -> None:
    """SIGKILL (no clean shutdown, no flush) Milvus mid-stream, then restart it."""

    def fault(publish_rest: Callable[[], None]) -> None:
        acknowledged = set(stored_ids(store, settings.milvus.collection))
        stack.milvus.kill()
        publish_rest()
        stack.milvus.start()  # returns once the collections are loaded again
        # Read before the worker could write anything again: what Milvus acknowledged survived.
        survived = set(stored_ids(store, settings.milvus.collection))
        missing = acknowledged - survived
        assert not missing, f"{len(missing)} acknowledged upserts lost by the kill"

    run_outage(stack, settings, store, tmp_path, scenario="milvus_kill9", fault=fault)


def test_graceful_stop_with_events_in_flight_loses_nothing(
    stack: LocalStack, settings: Settings, store: VectorStore, tmp_path: Path
) -> None:
    ids = publish_folder(settings, small_images(tmp_path, STREAM))
    with worker_processes(stack, settings, ["graceful"]) as (worker,):
        wait_for(lambda: safe_count(store) >= 50, timeout=240, what="ingest under way")
        worker.stop(timeout=60)  # SIGTERM, then waits for the process to exit
        log = worker.log_file.read_text()
    tail = log[log.rfind("starting:") :]
    assert "received SIGTERM" in tail and "stopped" in tail
    assert "Traceback" not in tail and " ERROR " not in tail, tail[-3000:]
    with worker_processes(stack, settings, ["after-graceful"]):
        wait_for(lambda: safe_count(store) == STREAM, timeout=600, what=f"all {STREAM} stored")
    assert_stream_complete("graceful_stop", ids, settings, store)


def test_two_workers_share_four_partitions_and_store_each_event_once(
    stack: LocalStack, settings: Settings, store: VectorStore, tmp_path: Path
) -> None:
    ids = publish_folder(settings, small_images(tmp_path, SHARED_STREAM))
    with worker_processes(stack, settings, ["scale-a", "scale-b"]) as workers:
        wait_for(
            lambda: safe_count(store) == SHARED_STREAM,
            timeout=600,
            what=f"all {SHARED_STREAM} stored",
        )
        # This run's part of each log (a log file collects every run of a worker of that name).
        logs = [(text := w.log_file.read_text())[text.rfind("starting:") :] for w in workers]
        # Each worker's health server: ready, and its metrics count what it upserted.
        upserted = 0.0
        for log in logs:
            address = re.search(r"health and metrics on (http://\S+)", log)
            assert address, log[-2000:]
            ready = httpx.get(f"{address.group(1)}/readyz", timeout=10)
            assert ready.status_code == 200, ready.text
            assert ready.json()["checks"] == {"kafka": True, "triton": True, "milvus": True}
            assert httpx.get(f"{address.group(1)}/livez", timeout=10).json() == {"alive": True}
            metrics = httpx.get(f"{address.group(1)}/metrics", timeout=10).text
            found = re.search(r"^trident_events_upserted_total (\S+)$", metrics, re.MULTILINE)
            assert found, metrics[:2000]
            upserted += float(found.group(1))
        assert upserted >= SHARED_STREAM
    assert_stream_complete("two_workers", ids, settings, store)
    for log in logs:  # both took part: each was assigned partitions of the topic
        assert f"('{settings.kafka.topic}', " in log.split("assigned", 1)[-1], log[-2000:]


# Permanent failures -------------------------------------------------------------------------


@pytest.fixture
def image_server() -> Iterator[str]:
    """A loopback HTTP server: /ok.png serves an image, anything else 404."""
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (10, 200, 30)).save(buffer, format="PNG")
    body = buffer.getvalue()
    with loopback_host(
        lambda path, _nth: Reply(200, body) if path == "/ok.png" else Reply(404)
    ) as host:
        yield host.url


def _pixel_bomb() -> bytes:
    """A valid PNG header claiming 60000 x 60000 pixels (3.6 gigapixels), with a tiny body."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", 60000, 60000, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def test_permanent_failures_are_dead_lettered_with_stage_and_reason(
    stack: LocalStack, settings: Settings, store: VectorStore, tmp_path: Path, image_server: str
) -> None:
    settings = settings.model_copy(
        update={
            "fetch": settings.fetch.model_copy(
                update={"allowed_hosts": ["127.0.0.1"], "max_bytes": 2_000_000}
            )
        }
    )
    good = small_images(tmp_path / "good", 20)
    jpeg = io.BytesIO()
    Image.new("RGB", (320, 240), (90, 90, 200)).save(jpeg, format="JPEG")
    oversize = tmp_path / "huge.bin"
    oversize.write_bytes(b"\xff" * 2_500_000)
    bad: dict[str, tuple[bytes, str, str]] = {
        "malformed": (b'{"id": "x", "image": ', "decode_event", "malformed_json"),
        "schema": (
            b'{"id": "schema", "image": {"kind": "path"}}',
            "decode_event",
            "schema_invalid",
        ),
        "kind": (
            b'{"id": "kind", "image": {"kind": "s3", "bucket": "b"}}',
            "decode_event",
            "unknown_image_kind",
        ),
    }
    events = {
        "url-404": (
            UrlImage.model_validate({"url": f"{image_server}/missing.png"}),
            "fetch",
            "not_found",
        ),
        "not-image": (
            InlineImage(data=b"this is plain text, not an image"),
            "decode_image",
            "not_an_image",
        ),
        "truncated": (
            InlineImage(data=jpeg.getvalue()[: len(jpeg.getvalue()) // 2]),
            "decode_image",
            "truncated_image",
        ),
        "pixel-bomb": (InlineImage(data=_pixel_bomb()), "decode_image", "too_many_pixels"),
        "oversize": (PathImage(path=str(oversize)), "fetch", "too_many_bytes"),
        "outside-roots": (PathImage(path="/etc/hostname"), "fetch", "path_not_allowed"),
        "private-url": (
            UrlImage.model_validate(
                {"url": image_server.replace("127.0.0.1", "127.0.0.2") + "/ok.png"}
            ),
            "fetch",
            "forbidden_address",
        ),
    }
    good_url = IngestEvent(
        id="good-url", image=UrlImage.model_validate({"url": f"{image_server}/ok.png"})
    )
    with EventPublisher(settings.kafka) as publisher:
        for index, path in enumerate(good):
            publisher.publish(event_for_reference(str(path), event_id=f"good-{index}"))
            if index == 5:
                for key, (payload, _stage, _reason) in bad.items():
                    publisher.publish_raw(key.encode(), payload, headers=[("origin", b"test")])
                for key, (image, _stage, _reason) in events.items():
                    publisher.publish(IngestEvent(id=key, image=image))
        publisher.publish(good_url)
        publisher.flush()
    expected_good = len(good) + 1
    with worker_processes(stack, settings, ["bad-input"]) as (worker,):
        wait_for(lambda: safe_count(store) == expected_good, timeout=300, what="good events stored")
        letters = wait_for(
            lambda: (d := dead_letters(settings)) and len(d) >= len(bad) + len(events) and d,
            timeout=120,
            what="dead letters",
        )
        assert worker.is_running(), "the worker crashed on bad input"
    by_key = {message.key().decode(): message for message in letters}
    assert len(letters) == len(bad) + len(events), sorted(by_key)
    for key, (payload, stage, reason) in bad.items():
        headers = dict(by_key[key].headers())
        assert by_key[key].value() == payload  # the original record, unchanged
        assert headers["origin"] == b"test"  # original headers kept
        assert (headers[HEADER_STAGE].decode(), headers[HEADER_REASON].decode()) == (
            stage,
            reason,
        ), key
    for key, (_image, stage, reason) in events.items():
        headers = dict(by_key[key].headers())
        assert (headers[HEADER_STAGE].decode(), headers[HEADER_REASON].decode()) == (
            stage,
            reason,
        ), key
        assert headers["__connect.errors.topic"].decode() == settings.kafka.topic
        assert by_key[key].value() == encode_event(
            IngestEvent.model_validate_json(by_key[key].value())
        )
    stored = set(stored_ids(store, settings.milvus.collection))
    lost = expected_good - len(stored & ({f"good-{i}" for i in range(len(good))} | {"good-url"}))
    report(
        "bad_input",
        produced=expected_good + len(bad) + len(events),
        stored=len(stored),
        dead_lettered=len(letters),
        lost=lost,
    )
    assert lost == 0


# Records that must not stall the stream ------------------------------------------------------

POISON_GOOD = 240


@pytest.fixture
def unwell_server() -> Iterator[str]:
    """A loopback HTTP server: /500 answers 500 forever, /hang never answers (until shutdown)."""
    with loopback_host(lambda path, _nth: None if path.startswith("/hang") else Reply(500)) as host:
        yield host.url


def _raw_event(event_id: str, image: dict[str, str], **extra: object) -> bytes:
    """An event as the wire carries it, built by hand: nothing checks it before it is sent."""
    return orjson.dumps({"schema_version": 1, "id": event_id, "image": image, **extra})


def test_poison_rows_never_stall_the_stream(
    stack: LocalStack, settings: Settings, store: VectorStore, tmp_path: Path, unwell_server: str
) -> None:
    record_attempts = 4
    settings = settings.model_copy(
        update={
            "fetch": settings.fetch.model_copy(
                update={"allowed_hosts": ["127.0.0.1"], "timeout_s": 1.0}
            ),
            "retry": settings.retry.model_copy(
                update={"attempts": 2, "record_attempts": record_attempts}
            ),
        }
    )
    good_ids = publish_folder(settings, small_images(tmp_path, POISON_GOOD))
    partitions = settings.kafka.topic_partitions  # the settings fixture created the topic
    # Every kind of poison on every partition, published raw, bypassing the producer's checks.
    expected: dict[str, set[tuple[str, str]]] = {}
    raw = Producer(producer_config(settings.kafka))
    for partition in range(partitions):
        poisons = {
            f"long-id-{partition}": (
                # 256 characters, 768 UTF-8 bytes: over the store's 256-byte primary key.
                _raw_event(
                    f"{partition}" + "猫" * 255,
                    {"kind": "path", "path": str(tmp_path / "img_00000.png")},
                ),
                {("upsert", "id_too_long"), ("decode_event", "id_too_long")},
            ),
            f"http-500-{partition}": (
                _raw_event(f"http-500-{partition}", {"kind": "url", "url": f"{unwell_server}/500"}),
                {("fetch", "retries_exhausted")},
            ),
            f"hang-{partition}": (
                _raw_event(f"hang-{partition}", {"kind": "url", "url": f"{unwell_server}/hang"}),
                {("fetch", "retries_exhausted")},
            ),
            f"big-metadata-{partition}": (
                # Over Milvus's 64 KiB JSON field: the store refuses the row.
                _raw_event(
                    f"big-metadata-{partition}",
                    {"kind": "path", "path": str(tmp_path / "img_00000.png")},
                    metadata={"blob": "x" * 70_000},
                ),
                {("upsert", "metadata_too_large"), ("decode_event", "metadata_too_large")},
            ),
        }
        for key, (payload, outcomes) in poisons.items():
            raw.produce(settings.kafka.topic, key=key.encode(), value=payload, partition=partition)
            expected[key] = outcomes
    assert raw.flush(30) == 0
    bound_s = 300  # all good events stored within this, whatever the poison
    with worker_processes(stack, settings, ["poison-worker"]) as (worker,):
        wait_for(
            lambda: worker_alive(worker) and safe_count(store) >= POISON_GOOD,
            timeout=bound_s,
            what=f"all {POISON_GOOD} good events stored",
        )
        letters = wait_for(
            lambda: (d := dead_letters(settings)) and len(d) >= len(expected) and d,
            timeout=120,
            what="every poison record dead-lettered",
        )
        log = worker.log_file.read_text()
    # One record's trouble is never an outage: no partition was ever paused for it.
    assert "partitions for" not in log[log.rfind("starting:") :], "a partition was paused"
    by_key = {message.key().decode(): message for message in letters}
    stored = set(stored_ids(store, settings.milvus.collection))
    lost = len(set(good_ids) - stored) + len(set(expected) - set(by_key))
    report(
        "poison_rows",
        produced=POISON_GOOD + len(expected),
        stored=len(stored),
        dead_lettered=len(letters),
        lost=lost,
    )
    assert lost == 0
    assert stored == set(good_ids), "only the good events are stored"
    assert len(letters) == len(expected), sorted(by_key)
    for key, outcomes in expected.items():
        headers = dict(by_key[key].headers())
        outcome = (headers[HEADER_STAGE].decode(), headers[HEADER_REASON].decode())
        assert outcome in outcomes, (key, outcome)
        if outcome[1] == "retries_exhausted":  # the cap held across re-queues
            assert headers[HEADER_ATTEMPTS] == str(record_attempts).encode(), key


# Kafka itself ------------------------------------------------------------------------------


# Moved by the test stack's port offset like its other ports: fault runs on two stacks at once
# (two worktrees) would otherwise both start their cluster on the same ports.
CLUSTER_NODES = [
    KafkaNode(node, 29748 + 2 * node + PORT_OFFSET, 29749 + 2 * node + PORT_OFFSET)
    for node in (1, 2, 3)
]


def test_kafka_cluster_failover_loses_and_duplicates_nothing(
    stack: LocalStack, settings: Settings, store: VectorStore, tmp_path: Path
) -> None:
    """Three brokers (replication 3, min ISR 2, acks=all); the busiest leader is SIGKILLed
    mid-stream while events are still being published, and returns later."""
    cluster = KafkaCluster(stack.config, CLUSTER_NODES)
    try:
        cluster.start()
        settings = settings.model_copy(
            update={
                "kafka": settings.kafka.model_copy(
                    update={"bootstrap_servers": cluster.bootstrap_servers}
                )
            }
        )
        ensure_topics(settings.kafka)
        images = small_images(tmp_path, 250)
        ids = publish_folder(settings, images[:150])
        with worker_processes(stack, settings, ["failover-worker"]) as (worker,):
            wait_for(lambda: safe_count(store) >= 30, timeout=240, what="ingest under way")
            victim = cluster.brokers[cluster.busiest_leader(settings.kafka.topic)]
            victim.kill()
            ids += publish_folder(settings, images[150:])  # two replicas in sync still take it
            time.sleep(5)
            victim.start()
            wait_for(
                lambda: worker_alive(worker) and safe_count(store) == len(ids),
                timeout=400,
                what=f"all {len(ids)} stored",
            )
        dead = assert_stream_complete("kafka_cluster_failover", ids, settings, store)
        assert dead == [], "a broker failover must never produce dead letters"
    finally:
        cluster.reset()


def test_transactional_gaps_commit_to_the_end_of_each_partition(
    stack: LocalStack, settings: Settings, store: VectorStore, tmp_path: Path, unique: str
) -> None:
    """Events written in transactions, every third one aborted: the committed ones are stored,
    no aborted one, and the group's offsets pass every marker (lag 0)."""
    producer = Producer(
        producer_config(
            settings.kafka, **{"transactional.id": f"tx-{unique}", "message.timeout.ms": 60_000}
        )
    )
    producer.init_transactions(30)
    committed: list[str] = []
    aborted: list[str] = []
    written: set[str] = set()  # ids the brokers acknowledged (then committed or aborted)

    def acknowledged(error: KafkaError | None, message: Message) -> None:
        if error is None:
            written.add(message.key().decode())

    paths = small_images(tmp_path, 300)
    for index in range(12):
        chunk = [event_for_reference(str(p), event_id=p.name) for p in paths[index * 25 :][:25]]
        producer.begin_transaction()
        for event in chunk:
            producer.produce(
                settings.kafka.topic,
                key=event.id.encode(),
                value=encode_event(event),
                on_delivery=acknowledged,
            )
        if index % 3 == 1:
            # Written, then aborted: the partitions then hold these records and an abort marker,
            # the gaps this test is about. Aborting at once would purge the records unsent
            # (nothing written), or, when librdkafka had just asked to add the partitions to the
            # transaction and the coordinator was still finishing the previous commit
            # (CONCURRENT_TRANSACTIONS), send an abort the coordinator refuses: a fatal
            # INVALID_TXN_STATE, this test's failure under load.
            assert producer.flush(30) == 0
            producer.abort_transaction(30)
            aborted += [event.id for event in chunk]
        else:
            producer.commit_transaction(30)
            committed += [event.id for event in chunk]
    assert producer.flush(30) == 0
    assert written == set(committed) | set(aborted), "the aborted events must be written first"
    with worker_processes(stack, settings, ["tx-worker"]) as (worker,):
        wait_for(
            lambda: worker_alive(worker) and safe_count(store) >= len(committed),
            timeout=300,
            what=f"all {len(committed)} committed events stored",
        )
        wait_for(
            lambda: committed_everything(settings),
            timeout=60,
            what="the group's offsets at the end of every partition",
        )
    stored = set(stored_ids(store, settings.milvus.collection))
    assert not stored & set(aborted), "an aborted event was stored"
    dead = assert_stream_complete("transactional_gaps", committed, settings, store)
    assert dead == []
