"""Helpers for tests on the real stack: settings per test, in-process workers, waiting."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition
from PIL import Image

from devstack._process import ManagedProcess
from devstack.stack import LocalStack
from engine.errors import RetriableError
from engine.kafka import consumer_config, ensure_topics
from engine.settings import Settings
from engine.store import VectorStore
from worker import Worker, build_worker


@pytest.fixture
def settings(stack: LocalStack, unique: str, tmp_path: Path) -> Settings:
    """Settings on the test stack with this test's own topics, group and collection."""
    result = stack.settings(
        kafka={
            "topic": f"ingest-{unique}",
            "dead_letter_topic": f"ingest-{unique}.dlq",
            "group_id": f"workers-{unique}",
        },
        milvus={"collection": f"test_{unique}"},
        fetch={"allowed_roots": [str(tmp_path)]},
        batch={"max_size": 16, "max_wait_ms": 200},
        retry={"attempts": 3, "initial_backoff_s": 0.2, "max_backoff_s": 1.0, "pause_s": 2.0},
        # One batch size: every worker and pipeline built here compiles 4 shapes at start-up (one
        # per scale bucket), not the default batch sizes' 18 (11 with the (1, 4, 16) used
        # before). Padding smaller batches up to it is tested in the unit tests.
        preprocess={"batch_sizes": (16,)},
        worker={"health_port": 0},
    )
    ensure_topics(result.kafka)
    return result


@pytest.fixture
def store(settings: Settings) -> Iterator[VectorStore]:
    vector_store = VectorStore(settings.milvus)
    vector_store.create_collection(settings.milvus.collection)
    yield vector_store
    try:
        vector_store.drop_collection(settings.milvus.collection)
    finally:
        vector_store.close()


@contextmanager
def running_worker(settings: Settings, worker_id: str = "test-worker") -> Iterator[Worker]:
    """A worker consuming in a background thread of this process; stopped and closed on exit."""
    runtime = build_worker(settings, worker_id=worker_id)
    worker = runtime.worker
    failure: list[BaseException] = []

    def run() -> None:
        try:
            worker.run()
        except BaseException as exc:
            failure.append(exc)
            raise

    thread = threading.Thread(target=run, name=worker_id, daemon=True)
    thread.start()
    try:
        yield worker
    finally:
        worker.stop()
        thread.join(timeout=60)
        runtime.close()
    assert not thread.is_alive(), "worker did not stop within 60 s"
    assert not failure, f"worker crashed: {failure[0]!r}"


def wait_for(
    predicate: Callable[[], Any], *, timeout: float, what: str, interval: float = 0.5
) -> Any:
    """Poll until ``predicate()`` is truthy; fail the test with ``what`` otherwise."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r})")


def committed_everything(settings: Settings) -> bool:
    """True when the group's committed offsets reached the end of every partition."""
    probe = Consumer(consumer_config(settings.kafka, **{"client.id": "test-probe"}))
    try:
        metadata = probe.list_topics(settings.kafka.topic, timeout=10)
        partitions = [
            TopicPartition(settings.kafka.topic, p)
            for p in metadata.topics[settings.kafka.topic].partitions
        ]
        committed = probe.committed(partitions, timeout=10)
        for tp in committed:
            _low, high = probe.get_watermark_offsets(
                TopicPartition(tp.topic, tp.partition), timeout=10
            )
            if high > 0 and tp.offset < high:
                return False
        return True
    finally:
        probe.close()


# Fault scenarios ------------------------------------------------------------------------------


def small_images(folder: Path, count: int, *, seed: int = 1) -> list[Path]:
    """``count`` distinct small PNGs (fast to decode, so a stream of hundreds stays quick)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for index in range(count):
        base = rng.integers(0, 255, size=(6, 8, 3), dtype=np.uint8)
        image = Image.fromarray(base).resize((128, 96), Image.Resampling.BILINEAR)
        path = folder / f"img_{index:05d}.png"
        image.save(path)
        paths.append(path)
    return paths


def stored_ids(store: VectorStore, collection: str, limit: int = 16_384) -> list[str]:
    """Every stored id (strongly consistent), duplicates included if there were any; through
    the store, so that its errors are the project's."""
    rows = store._strong_query(
        collection, f"ids of {collection}", filter='id != ""', output_fields=["id"], limit=limit
    )
    return [str(row["id"]) for row in rows]


def safe_count(store: VectorStore) -> int:
    """The row count, or -1 while Milvus is unavailable (during a fault)."""
    try:
        return store.count()
    except RetriableError:
        return -1


def dead_letters(settings: Settings, *, timeout: float = 20.0) -> list[Any]:
    """Every record in the dead-letter topic (read from the beginning by a throwaway group)."""
    consumer = Consumer(
        consumer_config(
            settings.kafka,
            **{"group.id": f"dlq-reader-{time.monotonic_ns()}", "enable.partition.eof": True},
        )
    )
    topic = settings.kafka.dead_letter_topic
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
        records, at_end = [], set()
        deadline = time.monotonic() + timeout
        while len(at_end) < len(partitions) and time.monotonic() < deadline:
            message = consumer.poll(0.5)
            if message is None:
                continue
            error = message.error()
            if error is not None:
                if error.code() == KafkaError._PARTITION_EOF:
                    at_end.add(message.partition())
                continue
            records.append(message)
        assert len(at_end) == len(partitions), "could not read the dead-letter topic to its end"
        return records
    finally:
        consumer.close()


def worker_alive(process: ManagedProcess) -> bool:
    """True while the worker runs; fails the test at once (with its log) when it died."""
    if not process.is_running():
        pytest.fail(f"worker {process.name} died:\n{process.log_tail(40)}")
    return True


def report(scenario: str, *, produced: int, stored: int, dead_lettered: int, lost: int) -> None:
    """The one line every fault scenario prints (run pytest with -s to see it live)."""
    print(
        f"scenario={scenario} produced={produced} stored={stored} "
        f"dead_lettered={dead_lettered} lost={lost}"
    )


def worker_metric(process: ManagedProcess, name: str) -> float:
    """The value of the unlabelled metric ``name`` on a running worker's /metrics.

    The address comes from this run's part of the worker's log (a log file collects every run
    of a worker of that name).
    """
    log = process.log_file.read_text()
    address = re.search(r"health and metrics on (http://\S+)", log[log.rfind("starting:") :])
    assert address, log[-2000:]
    metrics = httpx.get(f"{address.group(1)}/metrics", timeout=10).text
    found = re.search(rf"^{re.escape(name)} (\S+)$", metrics, re.MULTILINE)
    assert found, metrics[:2000]
    return float(found.group(1))


@contextmanager
def worker_processes(
    stack: LocalStack, settings: Settings, names: list[str]
) -> Iterator[list[Any]]:
    """Worker processes (real ``trident-worker``s) on ``settings``; stopped on exit."""
    settings_file = stack.write_settings(settings, name=f"{settings.kafka.group_id}.yaml")
    # The JAX compilation cache of the run comes with the environment (tests/conftest.py).
    processes = [stack.start_worker(settings_file, name=name) for name in names]
    try:
        yield processes
    finally:
        for process in processes:
            process.stop()
