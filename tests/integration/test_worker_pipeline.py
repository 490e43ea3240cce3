"""The stale-version guard and the pipelined worker on the real stack.

Stale events are URL images on a loopback server that counts its requests: a stale event that
is downloaded shows, even when the guard still keeps it from being written.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from confluent_kafka import Producer

from engine.kafka import producer_config
from engine.records import VectorRecord
from engine.settings import Settings
from engine.store import VectorStore
from schemas import IngestEvent, PathImage, UrlImage, encode_event
from tests.integration.conftest import (
    committed_everything,
    running_worker,
    small_images,
    wait_for,
)
from tests.support.http_host import LoopbackHost, Reply, loopback_host

pytestmark = pytest.mark.stack


@pytest.fixture
def counting_server() -> Iterator[LoopbackHost]:
    """A loopback HTTP host that answers 404 to everything and counts the requests."""
    with loopback_host(lambda _path, _nth: Reply(404)) as host:
        yield host


def _publish(settings: Settings, events: list[IngestEvent], partition: int | None = None) -> None:
    """Publish keyed by id (as the producer does), or all to one partition, in this order."""
    producer = Producer(producer_config(settings.kafka))
    for event in events:
        extra = {} if partition is None else {"partition": partition}
        producer.produce(
            settings.kafka.topic, key=event.id.encode(), value=encode_event(event), **extra
        )
    assert producer.flush(30) == 0


def _stale(server: LoopbackHost, event_id: str, version: int) -> IngestEvent:
    url = UrlImage.model_validate({"url": f"{server.url}/{event_id}-v{version}.png"})
    return IngestEvent(id=event_id, image=url, version=version)


def _allowing_loopback(settings: Settings) -> Settings:
    """Loopback image hosts allowed; one preprocessing shape (one JAX compile per worker)."""
    fetch = settings.fetch.model_copy(update={"allowed_hosts": ["127.0.0.1"]})
    preprocess = settings.preprocess.model_copy(update={"batch_sizes": (settings.batch.max_size,)})
    return settings.model_copy(update={"fetch": fetch, "preprocess": preprocess})


def test_session_reads_see_this_process_s_own_writes_at_once(
    settings: Settings, store: VectorStore
) -> None:
    """What the guard's Session reads rely on, through ``VectorStore.upsert`` as it is: a
    write is visible to this process's next Session read, with no delay."""
    vector = np.ones(settings.milvus.dimension, dtype=np.float32)
    for round_ in range(3):
        ids = [f"r{round_}-{n}" for n in range(32)]
        store.upsert([VectorRecord(id=i, vector=vector, event_version=round_) for i in ids])
        seen = store.stored_versions(ids, consistency="Session")
        assert sorted(seen) == sorted(ids), f"round {round_}: {len(seen)} of 32 visible"
        assert {v.event_version for v in seen.values()} == {round_}


def test_stale_versions_are_skipped_before_any_download_in_flight_or_stored(
    settings: Settings, store: VectorStore, tmp_path: Path, counting_server: LoopbackHost
) -> None:
    settings = _allowing_loopback(settings)
    images = small_images(tmp_path / "images", settings.batch.max_size + 1)
    newer = IngestEvent(id="photo", image=PathImage(path=str(images[0])), version=5)
    fillers = [
        IngestEvent(id=f"filler-{n}", image=PathImage(path=str(path)))
        for n, path in enumerate(images[1 : settings.batch.max_size])
    ]
    with running_worker(settings) as worker:
        # One partition, in this order: the newer version opens a full batch, the older one
        # opens the next, which is screened while the first one may still be in flight.
        _publish(settings, [newer, *fillers, _stale(counting_server, "photo", 3)], partition=0)
        wait_for(lambda: committed_everything(settings), timeout=180, what="first events done")
        # A late replay of an older version, once the newer one is stored.
        _publish(settings, [_stale(counting_server, "photo", 4)])
        wait_for(lambda: committed_everything(settings), timeout=120, what="the replay done")
        stale = worker.metrics.skipped.labels("stale_version")._value.get()
    assert counting_server.total == 0, "a stale event was downloaded"
    assert stale == 2
    assert store.get(["photo"])[0]["event_version"] == 5
    assert store.count() == len(fillers) + 1


def test_a_new_owner_after_a_rebalance_never_writes_older_versions(
    settings: Settings, store: VectorStore, tmp_path: Path, counting_server: LoopbackHost
) -> None:
    """Worker A stores version 5 of ids on every partition; worker B joins the group and takes
    some partitions over; then older versions of every id arrive. B has never written: it must
    read Strong, see A's rows, and neither download nor write any older version."""
    settings = _allowing_loopback(settings)
    images = small_images(tmp_path / "images", 12)
    ids = [f"id-{n}" for n in range(len(images))]
    with running_worker(settings, worker_id="owner-a") as a:
        _publish(
            settings,
            [
                IngestEvent(id=i, image=PathImage(path=str(p)), version=5)
                for i, p in zip(ids, images, strict=True)
            ],
        )
        wait_for(lambda: committed_everything(settings), timeout=180, what="version 5 stored")
        with running_worker(settings, worker_id="owner-b") as b:
            wait_for(lambda: b.assigned and a.assigned, timeout=60, what="both workers assigned")
            moved = set(b.assigned)
            _publish(settings, [_stale(counting_server, i, 3) for i in ids])
            wait_for(lambda: committed_everything(settings), timeout=120, what="replays done")
            time.sleep(0.5)  # the metrics of the last batch are counted after its commit
            b_reads = b.metrics.version_reads.labels("Strong")._value.get()
            skipped = sum(w.metrics.skipped.labels("stale_version")._value.get() for w in (a, b))
    assert moved, "the rebalance gave worker B no partition"
    assert b_reads >= 1, "worker B never read Strong after it was assigned"
    assert counting_server.total == 0, "an older version was downloaded"
    assert skipped == len(ids)
    assert {row["event_version"] for row in store.get(ids)} == {5}
