"""The consumer-group worker: one loop that owns Kafka, feeding a pipeline of batch stages.

Delivery is at-least-once with idempotent effects: Milvus writes are upserts keyed by the event
id, and a partition's offset is committed only past records whose effect is durable. A crash or
restart therefore repeats work but never loses it.

The Kafka consumer, the producer for dead letters and re-queued records, and the batch processor
are injected behind the small Protocols below (the stages run in ``worker.stages``), so the
loop is tested with fakes (``tests/unit/test_consumer.py``) as well as on the real stack.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Literal, Protocol

from confluent_kafka import KafkaError, KafkaException, Message, TopicPartition

from engine.errors import BatchAbandonedError, BrokerUnavailableError, RetriableError
from engine.settings import Settings
from worker.dead_letter import DeadLetter, Requeue
from worker.health import Heartbeat
from worker.metrics import Step, WorkerMetrics
from worker.offsets import OffsetTracker
from worker.ownership import Owner, Ownership
from worker.pipeline import Batch, Item, Outcome
from worker.retry import call_with_retries
from worker.stages import Flight, StagedPipeline

logger = logging.getLogger(__name__)

RebalanceCallback = Callable[[Any, list[TopicPartition]], None]

# Outcomes after which a record's offset may be committed (published ones once acknowledged).
_TERMINAL = frozenset(
    {Outcome.STORED, Outcome.DELETED, Outcome.SKIPPED, Outcome.DEAD, Outcome.REQUEUE}
)


class ConsumerClient(Protocol):
    """The part of ``confluent_kafka.Consumer`` the loop uses."""

    def subscribe(
        self,
        topics: list[str],
        on_assign: RebalanceCallback | None = None,
        on_revoke: RebalanceCallback | None = None,
        on_lost: RebalanceCallback | None = None,
    ) -> None: ...
    def consume(self, num_messages: int = 1, timeout: float = -1) -> list[Message]: ...
    def commit(
        self, *, offsets: list[TopicPartition], asynchronous: Literal[False]
    ) -> list[TopicPartition]: ...
    def assignment(self) -> list[TopicPartition]: ...
    def position(self, partitions: list[TopicPartition]) -> list[TopicPartition]: ...
    def pause(self, partitions: list[TopicPartition]) -> None: ...
    def resume(self, partitions: list[TopicPartition]) -> None: ...
    def seek(self, partition: TopicPartition) -> None: ...
    def get_watermark_offsets(
        self, partition: TopicPartition, timeout: float = -1, cached: bool = False
    ) -> tuple[int, int]: ...
    def close(self) -> None: ...


class RecordSink(Protocol):
    """Where records that leave the stream go; each call returns once acknowledged.

    Raises:
        BrokerUnavailableError: not acknowledged; nothing of the call may be committed.
    """

    def publish(self, letters: list[DeadLetter]) -> None: ...
    def requeue(self, requeues: list[Requeue]) -> None: ...


class Processor(Protocol):
    """The stages of ``worker.pipeline.BatchProcessor`` (see there for what each raises)."""

    def batch(self, records: Sequence[tuple[Message, Owner]]) -> Batch: ...
    def prepare(self, batch: Batch) -> None: ...
    def embed(self, batch: Batch) -> None: ...
    def store(self, batch: Batch) -> None: ...
    def release(self, batch: Batch) -> None: ...
    def fence(self) -> None: ...


class Worker:
    """A consumer-group member that embeds and stores ingest events.

    A batch goes through these steps, in this order:

    1. **fetch** a micro-batch: up to ``batch.max_size`` records, or what arrived within
       ``batch.max_wait_ms`` of the first one (the loop thread);
    2. **prepare** it: decode the events, screen their versions (stale ones are skipped before
       any download), fetch and decode each image on its own (a bad one fails alone),
       preprocess the images as one JAX batch, and the regions of those whose collection has
       region vectors as another (the prepare thread);
    3. **embed** it with Triton: the model, then the region model on the regions (the embed
       thread);
    4. **upsert** the vectors and metadata into Milvus, each item's regions before its row,
       rows Milvus refuses isolated (the store thread);
    5. **dead-letter** the records that can never succeed and **re-queue** those whose image
       host failed transiently, waiting for the acknowledgements (the loop thread);
    6. **commit** each partition up to its last terminal record (the loop thread).

    What overlaps: up to ``worker.pipeline_depth`` batches are in steps 2-4 at once, each step
    on its own thread, so batch k+1 is fetched and prepared while batch k is embedded, and k is
    upserted while k+1 is embedded; the loop fetches the next batch as soon as there is room,
    and settles (5, 6) each batch that comes back, in whatever order. Every Kafka call stays on
    the loop thread.

    When a dependency (Triton, Milvus, Kafka) stays unavailable through the retries, the worker
    abandons every batch in flight (nothing of them is committed or dead-lettered), pauses its
    partitions, rewinds them to the first unfinished record and resumes after
    ``retry.pause_s``: an outage delays records, it never dead-letters or drops them. One
    record's own transient failure never pauses anything (see ``worker.pipeline``). On a stop
    request the loop takes no new batch, settles those in flight for up to half of
    ``worker.shutdown_grace_s``, abandons the rest and commits what is safe. Giving partitions
    up in a rebalance (commit, then wait for the upsert in flight) has one deadline,
    ``worker.revoke_timeout_s``: what is not done by then is left to the new owner.
    """

    def __init__(
        self,
        settings: Settings,
        processor: Processor,
        *,
        consumer: ConsumerClient,
        sink: RecordSink,
        ownership: Ownership,
        metrics: WorkerMetrics,
        stop: threading.Event,
        heartbeat: Heartbeat,
        worker_id: str,
    ) -> None:
        self._settings = settings
        self._processor = processor
        self._pipeline = StagedPipeline(
            processor, depth=settings.worker.pipeline_depth, metrics=metrics
        )
        self._consumer = consumer
        self._sink = sink
        self._ownership = ownership
        self.metrics = metrics
        self._stop = stop
        self.heartbeat = heartbeat
        self.worker_id = worker_id
        self._offsets = OffsetTracker()
        self._paused_until: float | None = None
        self._lag_updated = 0.0
        self._fresh_assignment = False
        self.assigned: set[tuple[str, int]] = set()
        self.subscribed = False
        self._closed = False

    # Lifecycle ----------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask the loop to settle its batches in flight, commit what is safe, and leave."""
        self._stop.set()

    def run(self) -> None:
        """Consume until :meth:`stop` is called; always leaves the group (closes the consumer).

        Raises:
            KafkaException: a fatal consumer error (e.g. fenced by the group coordinator).
            ConfigurationError: Triton refused the requests for its model or for the region
                model (see the processor).
        """
        # The ingest topic and the retry topic, co-partitioned (engine.kafka.consumer_config):
        # an id's records from either reach the one member that owns partition p of both.
        topics = list(self._settings.kafka.topics().consumed)
        self._consumer.subscribe(
            topics,
            on_assign=self._on_assign,
            on_revoke=self._on_revoke,
            on_lost=self._on_lost,
        )
        self.subscribed = True
        self._pipeline.start()
        logger.info("worker %s consuming %s", self.worker_id, " and ".join(topics))
        try:
            while not self._stop.is_set():
                self._turn()
            self._drain()
        finally:
            self._pipeline.cancel_all()
            self._shutdown()

    def _turn(self) -> None:
        self.heartbeat.beat()
        self._resume_if_due()
        self._update_lag()
        busy = self._pipeline.busy
        self._settle(self._pipeline.finished(timeout=0))
        if not self._pipeline.has_room():
            # Full: wait for a batch to come back rather than hold more records.
            self._settle(self._pipeline.finished(timeout=0.1))
            return
        records = self._poll_batch(idle_s=0.1 if busy else 0.5)
        if records:
            self._submit(records)
        elif self._paused_until is None and not self._pipeline.busy:
            self._commit_idle()

    def _drain(self) -> None:
        """After a stop request: settle the batches in flight, for half the grace period."""
        deadline = time.monotonic() + self._settings.worker.shutdown_grace_s / 2
        while self._pipeline.busy and time.monotonic() < deadline:
            self.heartbeat.beat()
            self._settle(self._pipeline.finished(timeout=0.1))
        abandoned = self._pipeline.cancel_all()
        if abandoned:
            logger.info("stopping with %d batches unfinished; their records are redone", abandoned)

    def _shutdown(self) -> None:
        logger.info("worker %s stopping", self.worker_id)
        try:
            self._commit()
        except RetriableError as exc:
            logger.warning("final commit failed; the records will be consumed again: %s", exc)
        self.close()
        logger.info("worker %s stopped", self.worker_id)

    def close(self) -> None:
        """End the pipeline's threads and close the consumer (once): it commits nothing
        (auto-commit is off) and leaves the group at once, so the partitions move on without
        waiting for the session timeout."""
        if not self._closed:
            self._closed = True
            self._consumer.close()
            self._pipeline.close()

    # 1. fetch -----------------------------------------------------------------------------

    def _poll_batch(self, idle_s: float) -> list[tuple[Message, Owner]]:
        """Records until the batch is full or ``max_wait_ms`` passed since its first record,
        each stamped with the assignment it was consumed in.

        Returns an empty list after ``idle_s`` without a record, so the loop can settle
        batches, resume partitions and notice a stop request.
        """
        batch: list[tuple[Message, Owner]] = []
        max_size = self._settings.batch.max_size
        deadline: float | None = None
        while not self._stop.is_set():
            timeout = idle_s if deadline is None else deadline - time.monotonic()
            if timeout <= 0:
                break
            for message in self._consumer.consume(
                num_messages=max_size - len(batch), timeout=timeout
            ):
                error = message.error()
                owner = self._ownership.current(_partition(message))
                if error is not None:
                    self._on_consume_error(error)
                elif self._paused_until is None and owner is not None:
                    # While paused, records fetched before the pause are dropped: the rewind
                    # already moved each partition back to its first unfinished record.
                    batch.append((message, owner))
            # Records of partitions given up meanwhile belong to their new owner now.
            batch = [(m, owner) for m, owner in batch if self._ownership.owns(owner)]
            if not batch or len(batch) >= max_size:
                break
            if deadline is None:
                deadline = time.monotonic() + self._settings.batch.max_wait_ms / 1000
        return batch

    def _on_consume_error(self, error: KafkaError) -> None:
        if error.fatal():
            raise KafkaException(error)
        # Broker restarts and transport errors are retried by librdkafka itself.
        logger.warning("consumer: %s", error)

    # 2-7. process, dead-letter and re-queue, commit -----------------------------------------

    def _submit(self, records: list[tuple[Message, Owner]]) -> None:
        for message, _owner in records:
            self._offsets.track(*_position(message))
        self.metrics.consumed.inc(len(records))
        self.metrics.batch_size.observe(len(records))
        self.metrics.batch_fill.observe(len(records) / self._settings.batch.max_size)
        self._pipeline.submit(self._processor.batch(records))

    def _settle(self, flights: list[Flight]) -> None:
        """Dead-letter, re-queue, mark terminal and commit what came back, batch by batch."""
        for flight in flights:
            if flight.cancelled:
                continue  # abandoned: its records are still open, redone after the rewind
            if isinstance(flight.error, RetriableError | BatchAbandonedError):
                self._abandon(f"batch of {len(flight.batch.items)} abandoned: {flight.error}")
            elif flight.error is not None:
                raise flight.error
            else:
                self._settle_one(flight.batch)

    def _settle_one(self, batch: Batch) -> None:
        # Outcomes count only for partitions still owned in the assignment they came from.
        items = [item for item in batch.items if self._ownership.owns(item.owner)]
        try:
            self._publish(items)
        except RetriableError as exc:
            self._abandon(f"dead letters or re-queued records not acknowledged: {exc}")
            return
        for item in items:
            # Unfinished records (a stop came mid-way) stay open: the commit stops before them.
            if item.outcome in _TERMINAL:
                self._offsets.finish(*_position(item.message))
            if item.outcome is Outcome.SKIPPED:
                self.metrics.skipped.labels(item.skip_reason).inc()
        try:
            self._commit()
        except RetriableError as exc:
            self._abandon(f"commit failed: {exc}")

    def _abandon(self, why: str) -> None:
        """A dependency is down: abandon everything in flight; unless stopping, pause and
        rewind (when stopping, the records are simply left uncommitted)."""
        cancelled = self._pipeline.cancel_all()
        if self._stop.is_set():
            logger.info("%s (stopping; %d batches in flight abandoned)", why, cancelled)
            return
        logger.warning("%s; %d more batches in flight abandoned", why, cancelled)
        self._pause_and_rewind()

    def _publish(self, items: list[Item]) -> None:
        """Dead letters, then re-queued records, each acknowledged before anything commits."""
        letters = [
            item.dead_letter
            for item in items
            if item.outcome is Outcome.DEAD and item.dead_letter is not None
        ]
        if letters:
            self._with_retries(lambda: self._sink.publish(letters), Step.DEAD_LETTER)
            for letter in letters:
                self.metrics.dead_lettered.labels(letter.stage.value, letter.reason).inc()
                logger.info(
                    "dead-lettered %s[%d]@%d: %s/%s after %d attempt(s): %s",
                    letter.message.topic(),
                    letter.message.partition(),
                    letter.message.offset(),
                    letter.stage.value,
                    letter.reason,
                    letter.attempts,
                    letter.error,
                )
        requeued = [item for item in items if item.outcome is Outcome.REQUEUE]
        if requeued:
            requeues = [Requeue(item.message, item.attempts) for item in requeued]
            self._with_retries(lambda: self._sink.requeue(requeues), Step.REQUEUE)
            for item in requeued:
                self.metrics.requeued.labels(item.requeue_reason).inc()
            logger.info("re-queued %d records for a later attempt", len(requeued))

    def _commit_idle(self) -> None:
        """With nothing in hand, commit idle partitions at the consumer's position (past the
        control records that end transactional partitions)."""
        try:
            self._commit(caught_up=True)
        except RetriableError as exc:
            logger.warning("idle commit failed: %s", exc)

    def _commit(self, *, caught_up: bool = False) -> None:
        if caught_up:
            self._note_positions()
        positions, offsets = self._committable()
        if not positions:
            return

        timeout_s = self._settings.kafka.commit_timeout_s
        self._with_retries(lambda: commit_within(self._consumer, offsets, timeout_s), Step.COMMIT)
        self._offsets.mark_committed(positions)
        logger.debug("committed %s", positions)

    def _committable(self) -> tuple[dict[tuple[str, int], int], list[TopicPartition]]:
        """The positions to commit for owned partitions, and the same as TopicPartitions."""
        positions = self._offsets.committable()
        positions = {key: offset for key, offset in positions.items() if key in self.assigned}
        offsets = [
            TopicPartition(topic, partition, offset)
            for (topic, partition), offset in positions.items()
        ]
        return positions, offsets

    def _commit_by(self, deadline: float) -> None:
        """Commit what is safe, retrying as ``retry`` says, but never past ``deadline``.

        Raises:
            BrokerUnavailableError: not committed by then (the offsets stay uncommitted).
        """
        positions, offsets = self._committable()
        if not positions:
            return
        retry = self._settings.retry
        backoff = retry.initial_backoff_s
        for attempt in range(1, retry.attempts + 1):
            remaining = deadline - time.monotonic()
            try:
                with self.metrics.step_seconds.labels(Step.COMMIT).time():
                    done = _within(
                        lambda: self._consumer.commit(offsets=offsets, asynchronous=False),
                        remaining,
                        name="revoke-commit",
                    )
            except KafkaException as exc:
                error = BrokerUnavailableError(f"commit failed: {exc}")
                if attempt == retry.attempts or deadline - time.monotonic() <= backoff:
                    raise error from exc
                logger.warning("commit on revoke failed (attempt %d), retrying: %s", attempt, exc)
                self.metrics.retries.labels(Step.COMMIT, error.reason).inc()
                time.sleep(backoff)
                backoff = min(backoff * 2, retry.max_backoff_s)
                continue
            if not done:
                raise BrokerUnavailableError(f"commit of {positions} not answered in time")
            self._offsets.mark_committed(positions)
            logger.debug("committed %s", positions)
            return

    def _note_positions(self) -> None:
        assignment = self._consumer.assignment()
        try:
            positions = self._consumer.position(assignment) if assignment else []
        except KafkaException as exc:  # a local query; nothing to commit beyond then
            logger.debug("consumer positions unavailable: %s", exc)
            return
        for tp in positions:
            if tp.offset >= 0 and (tp.topic, tp.partition) in self.assigned:
                self._offsets.caught_up(tp.topic, tp.partition, tp.offset)

    def _with_retries(self, fn: Callable[[], None], step: Step) -> None:
        with self.metrics.step_seconds.labels(step).time():
            call_with_retries(
                fn,
                self._settings.retry,
                what=step.value.replace("_", " "),
                should_stop=self._stop.is_set,
                on_retry=lambda exc: self.metrics.retries.labels(step, exc.reason).inc(),
            )

    def _update_lag(self, every_s: float = 5.0) -> None:
        """Export high watermark minus committed position per assigned partition."""
        now = time.monotonic()
        if now - self._lag_updated < every_s:
            return
        self._lag_updated = now
        for topic, partition in list(self.assigned):
            position = self._offsets.position(topic, partition)
            try:
                # cached=True reads what the fetcher already knows: no broker round trip.
                _low, high = self._consumer.get_watermark_offsets(
                    TopicPartition(topic, partition), cached=True
                )
            except KafkaException:
                continue
            if position is not None and high >= 0:
                self.metrics.lag.labels(topic, str(partition)).set(max(0, high - position))

    # Backpressure --------------------------------------------------------------------------

    def _pause_and_rewind(self) -> None:
        """Stop fetching, seek every partition back to its first unfinished record, wait.

        Call only with nothing in flight that may still count (:meth:`_abandon` cancels it).
        """
        assignment = self._consumer.assignment()
        if not assignment:
            return
        self._consumer.pause(assignment)
        for tp in assignment:
            position = self._offsets.position(tp.topic, tp.partition)
            if position is not None:
                try:
                    self._consumer.seek(TopicPartition(tp.topic, tp.partition, position))
                except KafkaException as exc:
                    logger.warning(
                        "seek %s[%d] to %d failed: %s", tp.topic, tp.partition, position, exc
                    )
        self._paused_until = time.monotonic() + self._settings.retry.pause_s
        self.metrics.pauses.inc()
        logger.warning(
            "paused %d partitions for %.1fs", len(assignment), self._settings.retry.pause_s
        )

    def _resume_if_due(self) -> None:
        if self._paused_until is None:
            if self._fresh_assignment:
                # librdkafka keeps a partition's paused flag across a lost/re-assigned cycle:
                # partitions given back after a pause must be resumed explicitly.
                self._fresh_assignment = False
                assignment = self._consumer.assignment()
                if assignment:
                    self._consumer.resume(assignment)
            return
        if time.monotonic() < self._paused_until:
            return
        assignment = self._consumer.assignment()
        if assignment:
            self._consumer.resume(assignment)
        self._paused_until = None
        logger.info("resumed %d partitions", len(assignment))

    # Rebalance callbacks (run inside consume()) ---------------------------------------------

    def _on_assign(self, _consumer: Any, partitions: list[TopicPartition]) -> None:
        keys = [(tp.topic, tp.partition) for tp in partitions]
        self._ownership.assign(keys)
        self.assigned.update(keys)
        self._fresh_assignment = True
        self.metrics.assigned.set(len(self.assigned))
        if self._paused_until is not None:
            # Newly assigned partitions join the pause too: the outage concerns them as well.
            self._consumer.pause(partitions)
        logger.info("assigned %s", sorted(keys))

    def _on_revoke(self, _consumer: Any, partitions: list[TopicPartition]) -> None:
        # One deadline for everything the revoke waits on (Quix's revoke flush timeout): this
        # runs inside the consumer's poll, and the whole group waits for it.
        deadline = time.monotonic() + self._settings.worker.revoke_timeout_s
        abandoned = []
        # Everything finished so far is committed before the partitions move on.
        try:
            self._commit_by(deadline)
        except RetriableError as exc:
            abandoned.append(f"the commit ({exc})")
        if not self._let_go(partitions, deadline):
            abandoned.append("waiting for the upsert in flight")
        keys = sorted((tp.topic, tp.partition) for tp in partitions)
        if abandoned:
            # Safe: the new owner consumes again from the last commit, and the version guard
            # makes writing those records twice harmless.
            logger.warning(
                "revoke of %s gave up on %s after worker.revoke_timeout_s=%gs; the new owner "
                "redoes the uncommitted records",
                keys,
                " and ".join(abandoned),
                self._settings.worker.revoke_timeout_s,
            )
        logger.info("revoked %s", keys)

    def _on_lost(self, _consumer: Any, partitions: list[TopicPartition]) -> None:
        # Lost partitions may already belong to another member: committing would be wrong.
        deadline = time.monotonic() + self._settings.worker.revoke_timeout_s
        fenced = self._let_go(partitions, deadline)
        logger.warning(
            "lost %s%s",
            sorted((tp.topic, tp.partition) for tp in partitions),
            "" if fenced else "; gave up waiting for the upsert in flight",
        )

    def _let_go(self, partitions: list[TopicPartition], deadline: float) -> bool:
        """Give the partitions up: nothing consumed from them counts any more, and no write of
        theirs is in progress when this returns (so none lands after the new owner's), unless
        the write in progress outlasts ``deadline``: False then."""
        keys = [(tp.topic, tp.partition) for tp in partitions]
        self._ownership.release(keys)
        fenced = _within(self._processor.fence, deadline - time.monotonic(), name="revoke-fence")
        self._offsets.forget(keys)
        self.assigned.difference_update(keys)
        self.metrics.assigned.set(len(self.assigned))
        for topic, partition in keys:
            # The new owner reports this partition's lag now; a stale series here would make
            # the group's summed lag wrong.
            with contextlib.suppress(KeyError):  # KeyError: never reported by this member
                self.metrics.lag.remove(topic, str(partition))
        return fenced


def commit_within(
    consumer: ConsumerClient, offsets: list[TopicPartition], timeout_s: float
) -> None:
    """One synchronous commit of ``offsets`` that waits for the group coordinator at most
    ``timeout_s``.

    librdkafka's synchronous commit has no timeout of its own: while the broker is down it can
    wait for a coordinator indefinitely, and the loop, stuck in it, would stop polling (no
    rejoin after the outage, no stop on SIGTERM). Bounded, an unanswered commit is an outage
    like any other: retried, then the partitions pause and rewind while the loop keeps polling.

    Raises:
        BrokerUnavailableError: the commit was refused, or not answered within ``timeout_s``
            (then it is left to finish on its own: a late commit only stores positions this
            worker had finished).
    """
    try:
        done = _within(
            lambda: consumer.commit(offsets=offsets, asynchronous=False), timeout_s, name="commit"
        )
    except KafkaException as exc:
        raise BrokerUnavailableError(f"commit failed: {exc}") from exc
    if not done:
        raise BrokerUnavailableError(
            f"commit not answered within kafka.commit_timeout_s={timeout_s:g}s"
        )


def _within(fn: Callable[[], object], timeout_s: float, *, name: str) -> bool:
    """Run ``fn`` on a helper thread and wait for it at most ``timeout_s``.

    True when it returned in time; False when it is still running: it is left to finish on its
    own and its outcome is dropped (a late commit sets the group's offsets to positions this
    worker had finished: at worst records are consumed again; a late upsert may land after the
    new owner's writes, the one risk a revoke past its deadline takes: docs/OPERATIONS.md,
    "Rebalances").

    Raises:
        Exception: whatever ``fn`` raised, when it ended in time.
    """
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            fn()
        except BaseException as exc:  # handed to the waiting thread
            outcome.append(exc)
        else:
            outcome.append(None)

    helper = threading.Thread(target=run, name=name, daemon=True)
    helper.start()
    helper.join(max(0.0, timeout_s))
    if not outcome:
        return False
    if outcome[0] is not None:
        raise outcome[0]
    return True


def _partition(message: Message) -> tuple[str, int]:
    return message.topic() or "", message.partition() or 0


def _position(message: Message) -> tuple[str, int, int]:
    return message.topic() or "", message.partition() or 0, message.offset() or 0
