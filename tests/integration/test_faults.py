"""Fault scenarios on the real stack: crashes and outages lose nothing, bad input is isolated.

Each scenario prints ``scenario=<name> produced=<n> stored=<n> dead_lettered=<n> lost=<n>``
(run with ``-s`` to see it) and asserts ``lost=0``.
"""

from __future__ import annotations

import io
import re
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from confluent_kafka import Message
from PIL import Image

from devstack.stack import LocalStack
from engine.settings import Settings
from engine.store import VectorStore
from producer import EventPublisher, event_for_reference
from schemas import IngestEvent, InlineImage, PathImage, UrlImage, encode_event
from schemas.dead_letter import HEADER_REASON, HEADER_STAGE
from tests.integration.conftest import (
    dead_letters,
    report,
    safe_count,
    small_images,
    stored_ids,
    wait_for,
    worker_alive,
    worker_processes,
)

pytestmark = [pytest.mark.stack, pytest.mark.faults]

STREAM = 500


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
    fault: Callable[[], None],
) -> None:
    """Stream STREAM events, apply ``fault`` once ingest is under way, check nothing is lost."""
    ids = publish_folder(settings, small_images(tmp_path, STREAM))
    with worker_processes(stack, settings, [f"{scenario}-worker"]) as (worker,):
        wait_for(lambda: safe_count(store) >= 30, timeout=240, what="ingest under way")
        fault()
        wait_for(
            lambda: worker_alive(worker) and safe_count(store) == STREAM,
            timeout=400,
            what=f"all {STREAM} stored",
        )
    dead = assert_stream_complete(scenario, ids, settings, store)
    assert dead == [], "an outage must never produce dead letters"


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


@pytest.mark.parametrize(
    ("service", "down_s", "scenario"),
    [
        ("triton", 20, "triton_outage"),
        ("milvus", 15, "milvus_outage"),
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

    def fault() -> None:
        server.stop()
        time.sleep(down_s)
        server.start()

    run_outage(stack, settings, store, tmp_path, scenario=scenario, fault=fault)


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
    ids = publish_folder(settings, small_images(tmp_path, STREAM))
    with worker_processes(stack, settings, ["scale-a", "scale-b"]) as workers:
        wait_for(lambda: safe_count(store) == STREAM, timeout=600, what=f"all {STREAM} stored")
        logs = [w.log_file.read_text() for w in workers]
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
        assert upserted >= STREAM
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

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/ok.png":
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            else:
                self.send_error(404)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


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
