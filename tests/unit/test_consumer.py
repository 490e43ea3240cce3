"""The consumer loop with a fake Kafka consumer and sink: commit order, rewinds, rebalances, the
per-record retry budget, all without a broker."""

from __future__ import annotations

import io
import itertools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException, TopicPartition
from PIL import Image
from pydantic import ValidationError

from engine.errors import (
    BrokerUnavailableError,
    FetchUnavailableError,
    Reason,
    Stage,
    StoreUnavailableError,
    TridentError,
)
from engine.kafka import consumer_config
from engine.settings import Settings
from schemas import IngestEvent, InlineImage, UrlImage, encode_event
from schemas.dead_letter import HEADER_RETRY_ATTEMPTS
from schemas.events import ImageRef
from tests.unit.test_pipeline import FakeEmbedder, FakePreprocessor, FakeStore
from worker.consumer import Worker, commit_within
from worker.dead_letter import DeadLetter, RecordPublisher, Requeue
from worker.health import Heartbeat
from worker.metrics import WorkerMetrics
from worker.ownership import Owner, Ownership
from worker.pipeline import Batch, BatchProcessor, Item, Outcome

TOPIC = "ingest"


class Record:
    """A consumed record, with the accessors of ``confluent_kafka.Message``."""

    def __init__(
        self,
        partition: int,
        offset: int,
        payload: bytes,
        headers: list[tuple[str, bytes]] | None = None,
    ) -> None:
        self._partition, self._offset, self._payload = partition, offset, payload
        self._headers = headers or []

    def topic(self) -> str:
        return TOPIC

    def partition(self) -> int:
        return self._partition

    def offset(self) -> int:
        return self._offset

    def value(self) -> bytes:
        return self._payload

    def key(self) -> bytes | None:
        return None

    def headers(self) -> list[tuple[str, bytes]]:
        return self._headers

    def error(self) -> None:
        return None


class FakeConsumer:
    """Partitions as lists of records (offsets may have gaps); pause, seek, commit, rebalance.

    ``script`` maps the n-th ``consume`` call to a rebalance to run inside it, as librdkafka does.
    """

    def __init__(self, log: list[str], partitions: dict[int, list[Record]]) -> None:
        self.log = log
        self.partitions = partitions
        self.positions = {p: 0 for p in partitions}  # index into the partition's list
        self.paused: set[int] = set()
        self.assigned: set[int] = set()
        self.committed: dict[int, int] = {}
        self.calls = 0
        self.pauses = 0
        self.script: dict[int, tuple[str, list[int]]] = {}
        self.on_idle: Callable[[], None] = lambda: None
        self._callbacks: dict[str, Any] = {}
        self.closed = False

    # What the worker calls.
    def subscribe(self, topics: list[str], **callbacks: Any) -> None:
        self._callbacks = callbacks
        self.script.setdefault(1, ("on_assign", sorted(self.partitions)))  # as the group joins

    def consume(self, num_messages: int = 1, timeout: float = -1) -> list[Record]:
        self.calls += 1
        if self.calls in self.script:  # rebalances run inside consume(), as in librdkafka
            self.rebalance(*self.script.pop(self.calls))
        out: list[Record] = []
        for partition in sorted(self.assigned - self.paused):
            records = self.partitions[partition]
            while self.positions[partition] < len(records) and len(out) < num_messages:
                out.append(records[self.positions[partition]])
                self.positions[partition] += 1
        if not out and timeout >= 0.5:  # the loop's idle poll, not the wait for a fuller batch
            self.on_idle()
        return out

    def commit(self, *, offsets: list[TopicPartition], asynchronous: bool) -> list[TopicPartition]:
        for tp in offsets:
            assert tp.partition in self.assigned, "committed a partition it does not own"
            self.committed[tp.partition] = tp.offset
        self.log.append(f"commit {sorted((tp.partition, tp.offset) for tp in offsets)}")
        return offsets

    def assignment(self) -> list[TopicPartition]:
        return [TopicPartition(TOPIC, p) for p in sorted(self.assigned)]

    def pause(self, partitions: list[TopicPartition]) -> None:
        self.pauses += 1
        self.paused.update(tp.partition for tp in partitions)

    def resume(self, partitions: list[TopicPartition]) -> None:
        self.paused.difference_update(tp.partition for tp in partitions)

    def seek(self, partition: TopicPartition) -> None:
        records = self.partitions[partition.partition]
        self.positions[partition.partition] = next(
            (i for i, r in enumerate(records) if r.offset() >= partition.offset), len(records)
        )
        self.log.append(f"seek {partition.partition}@{partition.offset}")

    def get_watermark_offsets(
        self, partition: TopicPartition, timeout: float = -1, cached: bool = False
    ) -> tuple[int, int]:
        return 0, self._end(partition.partition)

    def position(self, partitions: list[TopicPartition]) -> list[TopicPartition]:
        out = []
        for tp in partitions:
            records, index = self.partitions[tp.partition], self.positions[tp.partition]
            at = records[index].offset() if index < len(records) else self._end(tp.partition)
            out.append(TopicPartition(TOPIC, tp.partition, at))
        return out

    def _end(self, partition: int) -> int:
        # Every partition ends with a transaction marker: one offset past the last record.
        records = self.partitions[partition]
        return records[-1].offset() + 2 if records else 0

    def close(self) -> None:
        self.closed = True

    # What the tests do.
    def rebalance(self, kind: str, partitions: list[int]) -> None:
        tps = [TopicPartition(TOPIC, p) for p in partitions]
        if kind == "on_assign":
            self.assigned.update(partitions)
            for p in partitions:  # a new owner starts at the committed position
                self.seek(TopicPartition(TOPIC, p, self.committed.get(p, 0)))
            self._callbacks[kind](self, tps)
        elif kind == "on_revoke":  # still owned during the callback: it may commit them
            self._callbacks[kind](self, tps)
            self.assigned.difference_update(partitions)
        else:  # lost: already gone
            self.assigned.difference_update(partitions)
            self._callbacks[kind](self, tps)

    def append(self, partition: int, payload: bytes, headers: list[tuple[str, bytes]]) -> None:
        records = self.partitions[partition]
        offset = records[-1].offset() + 2 if records else 0  # +2: a transaction marker between
        records.append(Record(partition, offset, payload, headers))


class FakeSink:
    def __init__(self, log: list[str], consumer: FakeConsumer, failures: int = 0) -> None:
        self.log = log
        self.consumer = consumer
        self.failures = failures
        self.letters: list[DeadLetter] = []

    def publish(self, letters: list[DeadLetter]) -> None:
        if self.failures:
            self.failures -= 1
            raise BrokerUnavailableError("dlq not acknowledged")
        self.letters += letters
        self.log.append(f"dead-letter {[letter.message.offset() for letter in letters]}")

    def requeue(self, requeues: list[Requeue]) -> None:
        for requeue in requeues:
            message = requeue.message
            headers = [(k, v) for k, v in message.headers() or [] if k != HEADER_RETRY_ATTEMPTS]
            headers.append((HEADER_RETRY_ATTEMPTS, str(requeue.attempts).encode()))
            self.consumer.append(message.partition(), message.value(), headers)
        self.log.append(f"requeue {[r.message.offset() for r in requeues]}")


class ScriptedProcessor:
    """Stores everything, except: raise ``outages`` times first; dead-letter ``bad`` payloads."""

    def __init__(self, outages: int = 0) -> None:
        self.outages = outages
        self.seen: list[tuple[int, int]] = []
        self.fences = 0
        self._numbers = itertools.count(1)

    def batch(self, records: Sequence[tuple[Any, Owner]]) -> Batch:
        return Batch(next(self._numbers), [Item(m, owner) for m, owner in records])

    def prepare(self, batch: Batch) -> None:
        self.seen += [(i.message.partition(), i.message.offset()) for i in batch.items]
        if self.outages:
            self.outages -= 1
            raise StoreUnavailableError("milvus down")
        for item in batch.items:
            if item.message.value() == b"bad":
                item.fail(TridentError("bad", reason=Reason.MALFORMED_JSON), Stage.DECODE_EVENT)

    def embed(self, batch: Batch) -> None:
        pass

    def store(self, batch: Batch) -> None:
        for item in batch.items:
            if item.pending:
                item.outcome = Outcome.STORED

    def release(self, batch: Batch) -> None:
        pass

    def fence(self) -> None:
        self.fences += 1


SETTINGS = Settings(
    kafka={"topic": TOPIC},
    batch={"max_size": 4, "max_wait_ms": 1},
    retry={
        "attempts": 2,
        "initial_backoff_s": 0.0,
        "max_backoff_s": 0.0,
        "pause_s": 0.01,
        "record_attempts": 5,
    },
)


def make_worker(
    partitions: dict[int, list[Record]],
    processor: Any,
    *,
    sink_failures: int = 0,
    idle_rounds: int = 3,
    ownership: Ownership | None = None,
    settings: Settings = SETTINGS,
) -> tuple[Worker, FakeConsumer, FakeSink, list[str]]:
    log: list[str] = []
    consumer = FakeConsumer(log, partitions)
    sink = FakeSink(log, consumer, failures=sink_failures)
    worker = Worker(
        settings,
        processor,
        consumer=consumer,  # type: ignore[arg-type]
        sink=sink,
        ownership=ownership or Ownership(),
        metrics=WorkerMetrics(),
        stop=threading.Event(),
        heartbeat=Heartbeat(),
        worker_id="test",
    )
    idle = [0]

    def on_idle() -> None:
        # Stop once every partition was read to its end and nothing is paused.
        drained = all(consumer.positions[p] == len(partitions[p]) for p in consumer.assigned)
        idle[0] = idle[0] + 1 if drained and not consumer.paused else 0
        if idle[0] >= idle_rounds:
            worker.stop()

    consumer.on_idle = on_idle
    return worker, consumer, sink, log


def records(partition: int, offsets: list[int], payload: bytes = b"ok") -> list[Record]:
    return [Record(partition, offset, payload) for offset in offsets]


def test_commits_reach_the_end_of_each_partition_over_gaps_and_markers() -> None:
    partitions = {0: records(0, [0, 1, 3, 4, 7]), 1: records(1, [10, 12])}
    worker, consumer, _sink, log = make_worker(partitions, ScriptedProcessor())
    worker.run()
    commits = [line for line in log if line.startswith("commit")]
    # The first batch: last finished + 1 (partition 1, open in the next batch, may stay put).
    assert commits[0] in ("commit [(0, 5)]", "commit [(0, 5), (1, 10)]")
    # Idle, the consumer's position lies past the trailing marker: lag 0.
    assert consumer.committed == {0: 9, 1: 14}
    assert consumer.closed


def test_dead_letters_are_acknowledged_before_the_offsets_are_committed() -> None:
    partitions = {0: [Record(0, 0, b"ok"), Record(0, 1, b"bad"), Record(0, 2, b"ok")]}
    worker, consumer, sink, log = make_worker(partitions, ScriptedProcessor(), sink_failures=1)
    worker.run()
    assert [letter.message.offset() for letter in sink.letters] == [1]
    first_commit = next(i for i, line in enumerate(log) if line.startswith("commit"))
    assert log.index("dead-letter [1]") < first_commit
    assert consumer.committed == {0: 4}  # the end, past the trailing marker


def test_a_dead_letter_topic_that_never_acknowledges_commits_nothing() -> None:
    partitions = {0: [Record(0, 0, b"bad"), Record(0, 1, b"ok")]}
    worker, consumer, _sink, log = make_worker(
        partitions, ScriptedProcessor(), sink_failures=10**6, idle_rounds=1
    )
    consumer.on_idle = worker.stop  # stop after the first abandoned batch
    worker.run()
    assert consumer.committed.get(0, 0) == 0  # never past the unacknowledged dead letter
    assert "seek 0@0" in log  # rewound to the first unfinished record
    assert consumer.pauses >= 1


def test_an_outage_pauses_rewinds_and_redelivers_everything() -> None:
    partitions = {0: records(0, [5, 6, 9]), 1: records(1, [0, 1])}
    processor = ScriptedProcessor(outages=2)
    worker, consumer, _sink, log = make_worker(partitions, processor)
    worker.run()
    # Two failed batches: two pauses, or one if the second failed batch was already in flight
    # behind the first (abandoned with it).
    assert consumer.pauses in (1, 2)
    assert "seek 0@5" in log and "seek 1@0" in log
    assert consumer.committed == {0: 11, 1: 3}
    assert processor.seen.count((0, 5)) >= 2  # abandoned, then stored


def test_records_of_a_revoked_partition_are_dropped_and_never_committed_again() -> None:
    partitions = {0: records(0, [0]), 1: records(1, [0, 1])}
    processor = ScriptedProcessor()
    worker, consumer, _sink, log = make_worker(partitions, processor)
    # The first consume() returns 3 records, short of a full batch; partition 1 is revoked
    # inside the next one, while the batch is still being gathered.
    consumer.script[2] = ("on_revoke", [1])
    worker.run()
    assert processor.seen == [(0, 0)]
    assert consumer.committed == {0: 2}
    assert not any("(1," in line for line in log if line.startswith("commit"))


def test_a_revoked_partition_no_longer_reports_lag() -> None:
    partitions = {0: records(0, [0]), 1: records(1, [0, 1])}
    worker, consumer, _sink, _log = make_worker(partitions, ScriptedProcessor())
    for partition in (0, 1):
        worker.metrics.lag.labels(TOPIC, str(partition)).set(7)  # as a lag update would
    consumer.script[2] = ("on_revoke", [1])
    worker.run()

    def lag(partition: int) -> float | None:
        return worker.metrics.registry.get_sample_value(
            "trident_consumer_lag", {"topic": TOPIC, "partition": str(partition)}
        )

    assert lag(1) is None
    assert lag(0) is not None


def test_partitions_lost_during_a_pause_are_resumed_when_given_back() -> None:
    partitions = {0: records(0, [0, 1])}
    processor = ScriptedProcessor(outages=1)
    worker, consumer, _sink, _log = make_worker(partitions, processor, idle_rounds=6)
    # Lost while paused (the session expired), then assigned again (librdkafka keeps the
    # paused flag of the partition across the two).
    consumer.script[3] = ("on_lost", [0])
    consumer.script[4] = ("on_assign", [0])
    worker.run()
    assert consumer.committed == {0: 3}
    assert 0 not in consumer.paused


class FailingFetcher:
    """Inline images pass; every URL fails transiently, as a host answering 500 forever does."""

    def __init__(self) -> None:
        self.url_attempts = 0

    def fetch_many(self, refs: Sequence[ImageRef]) -> list[bytes | TridentError]:
        out: list[bytes | TridentError] = []
        for ref in refs:
            if isinstance(ref, InlineImage):
                out.append(ref.data)
            else:
                self.url_attempts += 1
                out.append(FetchUnavailableError("HTTP 500", reason=Reason.HTTP_SERVER_ERROR))
        return out


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 12), (40, 90, 200)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_a_record_failing_transiently_forever_is_capped_and_stalls_nothing() -> None:
    good = encode_event(IngestEvent(id="good", image=InlineImage(data=_png())))
    broken = encode_event(
        IngestEvent(id="broken", image=UrlImage.model_validate({"url": "http://h.test/x.png"}))
    )
    partitions = {
        0: [Record(0, 0, broken), Record(0, 1, good)],
        1: [Record(1, 0, good.replace(b'"good"', b'"other"'))],
    }
    fetcher = FailingFetcher()
    store = FakeStore()
    metrics = WorkerMetrics()
    ownership = Ownership()
    processor = BatchProcessor(
        fetcher=fetcher,
        preprocessor=FakePreprocessor(),
        embedder=FakeEmbedder(),
        store=store,
        ownership=ownership,
        fetch_settings=SETTINGS.fetch,
        retry_settings=SETTINGS.retry,
        model_version="m",
        default_collection="images",
        metrics=metrics,
    )
    worker, consumer, sink, log = make_worker(partitions, processor, ownership=ownership)
    worker.run()
    assert consumer.pauses == 0  # never an outage: nothing paused
    assert set(store.rows) == {"good", "other"}
    # 5 attempts in passes of 2: re-queued twice (with a header), then dead-lettered.
    assert fetcher.url_attempts == SETTINGS.retry.record_attempts
    assert sum(line.startswith("requeue") for line in log) == 2
    (letter,) = sink.letters
    assert (letter.stage.value, letter.reason, letter.attempts) == ("fetch", "retries_exhausted", 5)
    # Everything consumed is terminal, the re-queued copies included: committed to the end.
    last = partitions[0][-1].offset()
    assert consumer.committed == {0: last + 2, 1: 2}


def test_heartbeat_goes_stale_when_the_loop_stops_beating() -> None:
    now = [100.0]
    heartbeat = Heartbeat(clock=lambda: now[0])
    assert heartbeat.fresh(5.0)
    now[0] += 6.0
    assert not heartbeat.fresh(5.0)
    heartbeat.beat()
    assert heartbeat.fresh(5.0)


# The pipelined loop: overlap, out-of-order endings, rebalances and stops with batches in flight.


class GatedProcessor(ScriptedProcessor):
    """Embedding batch 1 waits (up to 5 s) until ``gate`` is set; the stages log what they do."""

    def __init__(self, log: list[str], outages: int = 0) -> None:
        super().__init__(outages)
        self.log = log
        self.gate = threading.Event()

    def prepare(self, batch: Batch) -> None:
        self.log.append(f"prepare {batch.number}")
        if batch.number == 2:
            self.gate.set()  # the next batch is being prepared while batch 1 embeds
        super().prepare(batch)

    def embed(self, batch: Batch) -> None:
        if batch.number == 1:
            self.log.append(f"overlapped {self.gate.wait(5)}")
        self.log.append(f"embedded {batch.number}")


def test_the_next_batch_is_prepared_while_the_previous_one_embeds() -> None:
    partitions = {0: records(0, list(range(8)))}  # two full batches of 4
    log: list[str] = []
    processor = GatedProcessor(log)
    worker, consumer, _sink, _log = make_worker(partitions, processor)
    worker.run()
    assert "overlapped True" in log
    assert log.index("prepare 2") < log.index("embedded 1")
    assert consumer.committed == {0: 9}


class LaterBatchOutage(GatedProcessor):
    """Batch 2 fails at once (an outage) while batch 1 is still embedding."""

    def prepare(self, batch: Batch) -> None:
        if batch.number == 2:
            self.gate.set()
            raise StoreUnavailableError("milvus down")
        super().prepare(batch)


def test_an_outage_in_a_later_batch_abandons_the_earlier_one_still_in_flight() -> None:
    partitions = {0: records(0, list(range(8)))}
    log: list[str] = []
    processor = LaterBatchOutage(log)
    worker, consumer, _sink, wlog = make_worker(partitions, processor)
    commits_before_pause: list[str] = []

    def first_pause(partitions_: list[TopicPartition]) -> None:
        commits_before_pause.extend(line for line in wlog if line.startswith("commit"))
        consumer.pause = original_pause  # type: ignore[method-assign]
        original_pause(partitions_)

    original_pause = consumer.pause
    consumer.pause = first_pause  # type: ignore[method-assign]
    worker.run()
    # Batch 2 came back first, failed: batch 1 was abandoned with it, nothing committed, and
    # the partition was rewound to the first record of batch 1.
    assert commits_before_pause == []
    assert "seek 0@0" in wlog
    assert consumer.committed == {0: 9}  # all stored after the pause


class RevokingProcessor(GatedProcessor):
    """Embedding batch 1 waits until partition 1 was revoked (the revoke fences the writes)."""

    def embed(self, batch: Batch) -> None:
        if batch.number == 1:
            self.log.append(f"revoked {self.gate.wait(5)}")

    def fence(self) -> None:
        super().fence()
        self.gate.set()


def test_a_revoke_with_batches_in_flight_commits_nothing_of_the_revoked_partition() -> None:
    partitions = {0: records(0, [0, 1]), 1: records(1, [0, 1])}
    log: list[str] = []
    processor = RevokingProcessor(log)
    worker, consumer, _sink, wlog = make_worker(partitions, processor)
    consumer.script[3] = ("on_revoke", [1])  # while the first batch (all four) embeds
    worker.run()
    assert "revoked True" in log
    assert processor.fences >= 1  # writes in progress were waited for before letting go
    # Partition 1's records were in flight: the revoke committed no further than the first.
    assert consumer.committed == {0: 3, 1: 0}
    assert all("(1, 0)" in line or "(1," not in line for line in wlog if "commit" in line)


class StuckEmbedder(ScriptedProcessor):
    """Embedding batch 2 never ends by itself (only when it is cancelled); it asks for a stop."""

    def __init__(self) -> None:
        super().__init__()
        self.on_stuck: Callable[[], None] = lambda: None

    def embed(self, batch: Batch) -> None:
        if batch.number == 2:
            self.on_stuck()
            batch.cancelled.wait(10)


def test_a_stop_settles_what_finishes_within_the_grace_period_and_abandons_the_rest() -> None:
    partitions = {0: records(0, list(range(8)))}
    processor = StuckEmbedder()
    grace = SETTINGS.model_copy(
        update={"worker": SETTINGS.worker.model_copy(update={"shutdown_grace_s": 0.5})}
    )
    worker, consumer, _sink, _log = make_worker(partitions, processor, settings=grace)
    processor.on_stuck = worker.stop
    started = time.monotonic()
    worker.run()
    assert time.monotonic() - started < 5  # not the 10 s the stuck batch would take
    assert consumer.committed == {0: 4}  # batch 1 settled; nothing of batch 2
    assert consumer.closed


# The revoke's one deadline (worker.revoke_timeout_s).


class HangingRevokes(FakeConsumer):
    """Commits fail (``refuse``) until the revoke, whose commit hangs until ``unblock``."""

    def __init__(self, log: list[str], partitions: dict[int, list[Record]]) -> None:
        super().__init__(log, partitions)
        self.refuse = True
        self.revoking = False
        self.unblock = threading.Event()
        self.revoke_seconds: list[float] = []

    def commit(self, *, offsets: list[TopicPartition], asynchronous: bool) -> list[TopicPartition]:
        if self.revoking:
            self.unblock.wait(10)
        elif self.refuse:
            raise KafkaException(KafkaError(KafkaError._TIMED_OUT))
        return super().commit(offsets=offsets, asynchronous=asynchronous)

    def rebalance(self, kind: str, partitions: list[int]) -> None:
        started = time.monotonic()
        self.revoking = kind == "on_revoke"
        try:
            super().rebalance(kind, partitions)
        finally:
            self.revoking = False
        if kind == "on_revoke":
            self.revoke_seconds.append(time.monotonic() - started)


class HangingFence(ScriptedProcessor):
    """The write in flight when the partitions go never ends (until ``unblock``)."""

    def __init__(self, unblock: threading.Event) -> None:
        super().__init__()
        self.unblock = unblock

    def fence(self) -> None:
        super().fence()
        self.unblock.wait(10)


def test_a_hung_commit_and_upsert_end_the_revoke_at_its_one_deadline(
    caplog: pytest.LogCaptureFixture,
) -> None:
    deadline_s = 0.5
    settings = SETTINGS.model_copy(
        update={"worker": SETTINGS.worker.model_copy(update={"revoke_timeout_s": deadline_s})}
    )
    partitions = {0: records(0, [0, 1, 2])}
    log: list[str] = []
    consumer = HangingRevokes(log, partitions)
    processor = HangingFence(consumer.unblock)
    worker = Worker(
        settings,
        processor,
        consumer=consumer,  # type: ignore[arg-type]
        sink=FakeSink(log, consumer),
        ownership=Ownership(),
        metrics=WorkerMetrics(),
        stop=threading.Event(),
        heartbeat=Heartbeat(),
        worker_id="test",
    )
    refusals = [0]
    refuse = consumer.commit

    def commit(*, offsets: list[TopicPartition], asynchronous: bool) -> list[TopicPartition]:
        try:
            return refuse(offsets=offsets, asynchronous=asynchronous)
        except KafkaException:
            refusals[0] += 1
            if refusals[0] == settings.retry.attempts:
                # The batch's commit gave up: its records are finished but uncommitted when
                # the partition is revoked inside the next consume().
                consumer.refuse = False
                consumer.script[consumer.calls + 1] = ("on_revoke", [0])
                consumer.on_idle = worker.stop
            raise

    consumer.commit = commit  # type: ignore[method-assign]
    try:
        with caplog.at_level(logging.WARNING, logger="worker.consumer"):
            worker.run()
    finally:
        consumer.unblock.set()
    (seconds,) = consumer.revoke_seconds
    # Both waits shared the one deadline: the commit used it up, the fence got what was left.
    assert deadline_s <= seconds < deadline_s + 0.5, seconds
    gave_up = [r.getMessage() for r in caplog.records if "gave up" in r.getMessage()]
    assert len(gave_up) == 1, caplog.text
    assert "the commit" in gave_up[0] and "the upsert in flight" in gave_up[0]
    assert worker.assigned == set()  # let go all the same
    assert consumer.committed == {}  # nothing committed: the new owner redoes the records


# The topics: ingest and retry, co-partitioned ---------------------------------------------


def test_the_worker_subscribes_to_the_ingest_and_retry_topics_assigned_by_range() -> None:
    subscribed: list[list[str]] = []
    worker, consumer, _sink, _log = make_worker({0: records(0, [0])}, ScriptedProcessor())
    original = consumer.subscribe

    def subscribe(topics: list[str], **callbacks: Any) -> None:
        subscribed.append(topics)
        original(topics, **callbacks)

    consumer.subscribe = subscribe  # type: ignore[method-assign]
    worker.run()
    assert subscribed == [["ingest", "ingest.retry"]]
    # Range assignment gives partition p of both topics (equal counts) to one member: an id's
    # records from either topic have one writer. Cooperative-sticky would not.
    assert consumer_config(SETTINGS.kafka)["partition.assignment.strategy"] == "range"
    named = Settings(kafka={"topic": "in", "retry_topic": "again", "dead_letter_topic": "dlq"})
    assert named.kafka.topics().consumed == ("in", "again")
    with pytest.raises(ValidationError, match="must be three topics"):
        Settings(kafka={"topic": "in", "retry_topic": "in"})


class RecordingProducer:
    """What ``RecordPublisher`` calls on its librdkafka producer; every record acknowledged."""

    def __init__(self) -> None:
        self.produced: list[tuple[str, int, bytes | None, list[tuple[str, Any]]]] = []

    def produce(self, topic: str, **kwargs: Any) -> None:
        self.produced.append((topic, kwargs["partition"], kwargs["value"], kwargs["headers"]))

    def flush(self, timeout: float = -1) -> int:
        return 0


def test_requeued_records_go_to_the_retry_topic_in_the_partition_of_their_number() -> None:
    publisher = RecordPublisher(SETTINGS.kafka, worker_id="w", model_version="m")
    recording = RecordingProducer()
    publisher._producer = recording  # type: ignore[assignment]
    try:
        from_ingest = Record(3, 7, b"v1", headers=[("origin", b"cam")])
        again = Record(1, 2, b"v0", headers=[("origin", b"cam"), (HEADER_RETRY_ATTEMPTS, b"2")])
        publisher.requeue([Requeue(from_ingest, attempts=2), Requeue(again, attempts=4)])
        letter = DeadLetter(Record(2, 5, b"bad"), Stage.FETCH, "not_found", ValueError("gone"))
        publisher.publish([letter])
    finally:
        publisher.close(0)
    assert recording.produced[:2] == [
        ("ingest.retry", 3, b"v1", [("origin", b"cam"), (HEADER_RETRY_ATTEMPTS, b"2")]),
        ("ingest.retry", 1, b"v0", [("origin", b"cam"), (HEADER_RETRY_ATTEMPTS, b"4")]),
    ]
    topic, partition, value, _headers = recording.produced[2]
    # Dead letters: the partitioner's choice (-1), never the ingest or retry topic.
    assert (topic, partition, value) == (SETTINGS.kafka.dead_letter_topic, -1, b"bad")


def test_a_commit_the_coordinator_never_answers_ends_at_its_timeout() -> None:
    # librdkafka's synchronous commit has no deadline: during a broker outage it waited for a
    # coordinator for good, and the loop stuck in it never polled again (the kafka_restart
    # fault scenario's stalled worker).
    release = threading.Event()

    class Unanswered:
        def commit(
            self, *, offsets: list[TopicPartition], asynchronous: bool
        ) -> list[TopicPartition]:
            release.wait(30)
            return offsets

    started = time.monotonic()
    try:
        with pytest.raises(BrokerUnavailableError, match=r"commit_timeout_s=0\.3s"):
            commit_within(Unanswered(), [TopicPartition(TOPIC, 0, 5)], 0.3)  # type: ignore[arg-type]
        assert time.monotonic() - started < 2.0
    finally:
        release.set()
