"""Item status lookups (``GET /items/{collection}/{id}/status``) with a large dead-letter topic.

On the stack at the given addresses, with a topic, group and collection of its own:

1. **fill**: ``--records`` dead letters (default 100,000) produced straight to a fresh
   dead-letter topic, as the worker writes them (the original event as the value, keyed by the
   id, the ``schemas.dead_letter`` headers), ids ``--ids`` distinct (several dead letters per
   id, as replays that fail again make);
2. **catch-up**: a :class:`~producer.status.DeadLetterIndex` (what the query API starts) reads
   the topic from the beginning; the time until it has read it all, its records per second, and
   the memory its entries hold (their objects' sizes, bytes per id);
3. **lookups**: ``--lookups`` :meth:`ItemStatusFinder.status` calls with that index, on ids
   with a dead letter (and, for every fourth, a stored row too) and ids with none; p50/p99 of
   the whole lookup and of its Milvus read (Strong consistency) alone;
4. **one-off lookups** (``trident-dlq status``): without an index, each lookup reads the topic
   for its id alone; p50 of a few;
5. **pending scan**: ``--backlog`` records on the ingest topic that no worker has processed;
   a lookup scans that uncommitted tail for its id (the worst case: the id is not there).

From the repository root (the test stack's addresses shown)::

    .venv/bin/python benchmarks/bench_status.py --kafka 127.0.0.1:29092 \\
        --milvus http://127.0.0.1:29530 --milvus-token-file .stack-test/milvus/secret
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from apps import add_stack_arguments, bench_settings, milvus_token
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient

import benchlib
from engine.kafka import ensure_topics, producer_config
from engine.records import VectorRecord
from engine.settings import Settings
from engine.store import VectorStore
from producer.status import DeadLetterIndex, ItemStatusFinder, _ends
from schemas import IngestEvent, PathImage, encode_event
from schemas.dead_letter import (
    HEADER_ATTEMPTS,
    HEADER_EXCEPTION_CLASS,
    HEADER_EXCEPTION_MESSAGE,
    HEADER_FIRST_FAILED,
    HEADER_MODEL,
    HEADER_OFFSET,
    HEADER_PARTITION,
    HEADER_REASON,
    HEADER_STAGE,
    HEADER_TOPIC,
    HEADER_WORKER,
)

DIM = 1280


def item_id(n: int) -> str:
    return f"photos/2026/{n:08d}.jpg"


def dead_letter(n: int, ids: int, topic: str) -> tuple[bytes, bytes, list[tuple[str, bytes]]]:
    """The ``n``-th dead letter: its id's event, as the worker re-publishes it, and why."""
    identity = item_id(n % ids)
    event = IngestEvent(
        id=identity,
        image=PathImage(path=f"/data/{identity}"),
        metadata={"filename": identity.rsplit("/", 1)[-1], "content_type": "image/jpeg"},
        version=1_700_000_000_000_000 + n,
    )
    headers = [
        (HEADER_TOPIC, topic.encode()),
        (HEADER_PARTITION, b"0"),
        (HEADER_OFFSET, str(n).encode()),
        (HEADER_EXCEPTION_CLASS, b"engine.errors.ImageReferenceError"),
        (
            HEADER_EXCEPTION_MESSAGE,
            f"cannot fetch '/data/{identity}': [Errno 2] No such file or directory".encode(),
        ),
        (HEADER_STAGE, b"fetch"),
        (HEADER_REASON, b"not_found"),
        (HEADER_ATTEMPTS, b"1"),
        (HEADER_FIRST_FAILED, b"2026-12-07T12:00:00+00:00"),
        (HEADER_WORKER, b"worker-1"),
        (HEADER_MODEL, b"efficientnet_lite0@1"),
    ]
    return identity.encode(), encode_event(event), headers


def produce(settings: Settings, topic: str, records: Any, count: int) -> float:
    """Produce ``count`` records from the iterator; records per second."""
    producer = Producer(producer_config(settings.kafka, **{"linger.ms": 20}))
    began = time.perf_counter()
    for key, value, headers in records:
        while True:
            try:
                producer.produce(topic, key=key, value=value, headers=headers)
                break
            except BufferError:
                producer.poll(0.1)
        producer.poll(0)
    if producer.flush(120):
        raise SystemExit(f"records to {topic} not acknowledged in 120 s")
    return count / (time.perf_counter() - began)


def entry_bytes(index: DeadLetterIndex) -> int:
    """What the index's entries hold: the dict, its keys, entries and their integers."""
    entries = index._entries
    total = sys.getsizeof(entries)
    for key, entry in entries.items():
        total += sys.getsizeof(key) + sys.getsizeof(entry)
        total += sum(sys.getsizeof(value) for value in entry if not -5 <= value <= 256)
    return total


class KafkaOnly:
    """The store, but for a status's Milvus read, which answers nothing: times the rest."""

    def __init__(self, store: VectorStore) -> None:
        self.default_collection = store.default_collection
        self.describe_collection = store.describe_collection

    def stored_versions(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return {}


def timed(calls: int, call: Any) -> list[float]:
    seconds = []
    for n in range(calls):
        began = time.perf_counter()
        call(n)
        seconds.append(time.perf_counter() - began)
    return seconds


def ms(values: list[float], q: float) -> float:
    return round(benchlib.percentile(values, q) * 1000, 1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    add_stack_arguments(parser, api_port=0)
    parser.add_argument("--records", type=int, default=100_000, help="dead letters to fill")
    parser.add_argument("--ids", type=int, default=50_000, help="distinct ids among them")
    parser.add_argument("--lookups", type=int, default=200)
    parser.add_argument("--one-off", type=int, default=5, help="lookups without an index")
    parser.add_argument("--backlog", type=int, default=100_000, help="unprocessed ingest records")
    parser.add_argument("--quick", action="store_true", help="10,000 records, 50 lookups")
    parser.add_argument("--results", type=Path, default=benchlib.DEFAULT_RESULTS)
    args = parser.parse_args()
    benchlib.exit_on_sigterm()
    if args.quick:
        args.records, args.ids, args.lookups, args.one_off, args.backlog = (
            10_000,
            5_000,
            50,
            3,
            10_000,
        )
    ids = min(args.ids, args.records)
    with tempfile.TemporaryDirectory(prefix="bench-status-") as tmp:
        settings = bench_settings(
            kafka=args.kafka,
            triton_grpc=args.triton_grpc,
            milvus=args.milvus,
            milvus_token=milvus_token(args.milvus_token_file),
            image_root=Path(tmp),
        )
    kafka = settings.kafka
    ensure_topics(kafka)
    store = VectorStore(settings.milvus)
    store.create_collection(settings.milvus.collection)
    figures: dict[str, Any] = {"records": args.records, "ids": ids}
    index: DeadLetterIndex | None = None
    finder: ItemStatusFinder | None = None
    try:
        with benchlib.LoadSampler() as load:
            rate = produce(
                settings,
                kafka.dead_letter_topic,
                (dead_letter(n, ids, kafka.topic) for n in range(args.records)),
                args.records,
            )
            print(f"fill: {args.records} dead letters ({ids} ids) at {rate:,.0f} records/s")
            # A quarter of the ids dead-lettered are stored too (an older or newer version).
            stored = [
                VectorRecord(
                    id=item_id(n),
                    vector=np.full(DIM, 1 / DIM**0.5, dtype=np.float32),
                    event_version=1_700_000_000_000_000 + n + (args.records if n % 8 else 0),
                )
                for n in range(0, ids, 4)
            ]
            for start in range(0, len(stored), 1_000):
                store.upsert(stored[start : start + 1_000])

            index = DeadLetterIndex(kafka)
            began = time.perf_counter()
            index.start()
            probe = ItemStatusFinder(kafka, store)  # its consumer, for the topic's ends
            ends = _ends(probe._consumer, kafka.dead_letter_topic)
            probe.close()
            if not index.wait_until(ends, time.monotonic() + 600):
                raise SystemExit("the index did not catch up in 600 s")
            catch_up = time.perf_counter() - began
            size = entry_bytes(index)
            figures |= {
                "catch_up_s": round(catch_up, 2),
                "catch_up_records_per_s": round(args.records / catch_up),
                "index_ids": index.size,
                "index_bytes": size,
                "index_bytes_per_id": round(size / max(1, index.size)),
            }
            print(
                f"catch-up: {catch_up:.2f} s ({args.records / catch_up:,.0f} records/s); "
                f"{index.size} ids in {size / 2**20:.1f} MiB ({size / index.size:.0f} B/id)"
            )

            finder = ItemStatusFinder(kafka, store, index=index)
            rng = random.Random(7)
            wanted = [
                item_id(rng.randrange(ids)) if n % 2 else f"never/{n}" for n in range(args.lookups)
            ]
            states: dict[str, int] = {}

            def look(n: int) -> None:
                assert finder is not None
                answer = finder.status(wanted[n])
                assert answer.complete, answer
                states[answer.state] = states.get(answer.state, 0) + 1

            lookups = timed(args.lookups, look)
            milvus = timed(
                args.lookups,
                lambda n: store.stored_versions([wanted[n]], consistency="Strong"),
            )
            kafka_only = ItemStatusFinder(kafka, KafkaOnly(store), index=index)  # type: ignore[arg-type]
            try:
                topics = timed(args.lookups, lambda n: kafka_only.status(wanted[n]))
            finally:
                kafka_only.close()
            figures |= {
                "lookup_p50_ms": ms(lookups, 50),
                "lookup_p99_ms": ms(lookups, 99),
                "milvus_strong_p50_ms": ms(milvus, 50),
                "milvus_strong_p99_ms": ms(milvus, 99),
                "kafka_and_index_p50_ms": ms(topics, 50),
                "kafka_and_index_p99_ms": ms(topics, 99),
                "states": states,
            }
            print(
                f"lookups ({args.lookups}, states {states}): p50 {ms(lookups, 50)} ms, "
                f"p99 {ms(lookups, 99)} ms; the Strong Milvus read alone: p50 {ms(milvus, 50)} "
                f"ms, p99 {ms(milvus, 99)} ms; all but it (topics, index, read-back): "
                f"p50 {ms(topics, 50)} ms, p99 {ms(topics, 99)} ms"
            )

            one_off = ItemStatusFinder(kafka, KafkaOnly(store), deadline_s=120)  # type: ignore[arg-type]
            try:
                singles = timed(args.one_off, lambda n: one_off.status(wanted[2 * n + 1]))
            finally:
                one_off.close()
            figures |= {"one_off_p50_ms": ms(singles, 50), "one_off_max_ms": ms(singles, 100)}
            print(
                f"one-off lookups without an index ({args.one_off}), all but the Milvus read: "
                f"p50 {ms(singles, 50)} ms, max {ms(singles, 100)} ms"
            )

            rate = produce(
                settings,
                kafka.topic,
                (
                    (*dead_letter(n, args.backlog, kafka.topic)[:2], None)
                    for n in range(args.backlog)
                ),
                args.backlog,
            )
            scanner = ItemStatusFinder(kafka, KafkaOnly(store), index=index, deadline_s=120)  # type: ignore[arg-type]
            try:
                scans = timed(3, lambda n: scanner.status(f"absent/{n}"))
            finally:
                scanner.close()
            figures |= {"backlog": args.backlog, "pending_scan_p50_ms": ms(scans, 50)}
            print(
                f"pending scan of a {args.backlog}-record unprocessed backlog, all but the "
                "Milvus read: "
                f"p50 {ms(scans, 50)} ms ({args.backlog / benchlib.percentile(scans, 50):,.0f} "
                "records/s)"
            )
        benchlib.record(
            "status",
            figures,
            headline={"status_lookup_p99_ms": figures["lookup_p99_ms"]},
            sampler=load,
            quick=args.quick,
            path=args.results,
        )
        print(f"load: {load.describe()}")
    finally:
        if finder is not None:
            finder.close()
        if index is not None:
            index.close()
        store.drop_collection(settings.milvus.collection)
        store.close()
        admin = AdminClient({"bootstrap.servers": kafka.bootstrap_servers})
        for future in admin.delete_topics([kafka.topic, kafka.dead_letter_topic]).values():
            future.result()
    return 0


if __name__ == "__main__":
    sys.exit(main())
