"""The consumer-group worker: one loop, one micro-batch at a time.

Delivery is at-least-once with idempotent effects: Milvus writes are upserts keyed by the event
id, and a partition's offset is committed only up to the first record whose effect is not yet
durable. A crash or restart therefore repeats work but never loses it.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

from engine.errors import BrokerUnavailableError, RetriableError, Stage
from engine.kafka import consumer_config
from engine.settings import Settings
from worker.dead_letter import DeadLetterPublisher
from worker.metrics import WorkerMetrics
from worker.offsets import OffsetTracker
from worker.pipeline import BatchProcessor, BatchResult, Outcome
from worker.retry import call_with_retries

logger = logging.getLogger(__name__)


class Worker:
    """A consumer-group member that embeds and stores ingest events.

    Each turn of :meth:`run` does, in this order:

    1. **fetch** a micro-batch: up to ``batch.max_size`` records, or what arrived within
       ``batch.max_wait_ms`` of the first one;
    2. **decode** the events, then fetch and decode each image on its own (a bad one fails
       alone);
    3. **preprocess** the decoded images as one JAX batch;
    4. **embed** it with Triton;
    5. **upsert** the vectors and metadata into Milvus;
    6. **dead-letter** the records that can never succeed, waiting for the acknowledgement;
    7. **commit** each partition up to its first unfinished record.

    When a dependency stays unavailable through the retries, the worker pauses its partitions,
    rewinds them to the first uncommitted offset and resumes after ``retry.pause_s``: an
    outage delays records, it never dead-letters or drops them.
    """

    def __init__(
        self,
        settings: Settings,
        processor_factory: Callable[[WorkerMetrics, Callable[[], bool]], BatchProcessor],
        *,
        metrics: WorkerMetrics | None = None,
        worker_id: str | None = None,
    ) -> None:
        self._settings = settings
        self.metrics = metrics or WorkerMetrics()
        self.worker_id = worker_id or f"{socket.gethostname()}-{os.getpid()}"
        self._stop = threading.Event()
        self._processor = processor_factory(self.metrics, self._stop.is_set)
        self._offsets = OffsetTracker()
        self._consumer = Consumer(
            consumer_config(settings.kafka, **{"client.id": self.worker_id}),
        )
        self._dead_letters = DeadLetterPublisher(
            settings.kafka, worker_id=self.worker_id, model_version=settings.triton.model_tag
        )
        self._paused_until: float | None = None
        self._lag_updated = 0.0
        self._fresh_assignment = False
        self._revoked: set[tuple[str, int]] = set()
        self.assigned: set[tuple[str, int]] = set()
        self.subscribed = False

    # Lifecycle ----------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask the loop to finish its batch, commit what is safe, and leave the group."""
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def run(self) -> None:
        """Consume until :meth:`stop` is called; always leaves the group cleanly."""
        self._consumer.subscribe(
            [self._settings.kafka.topic],
            on_assign=self._on_assign,
            on_revoke=self._on_revoke,
            on_lost=self._on_lost,
        )
        self.subscribed = True
        logger.info("worker %s consuming %s", self.worker_id, self._settings.kafka.topic)
        try:
            while not self._stop.is_set():
                self._resume_if_due()
                self._update_lag()
                messages = self._poll_batch()
                if messages:
                    self._handle(messages)
        finally:
            self._shutdown()

    def _shutdown(self) -> None:
        logger.info("worker %s stopping", self.worker_id)
        try:
            self._commit()
        except RetriableError as exc:
            logger.warning("final commit failed; the records will be consumed again: %s", exc)
        self._dead_letters.close()
        # close() commits nothing (auto-commit is off) and leaves the group at once, so the
        # partitions move to another worker without waiting for the session timeout.
        self._consumer.close()
        logger.info("worker %s stopped", self.worker_id)

    # 1. fetch -----------------------------------------------------------------------------

    def _poll_batch(self) -> list[Message]:
        """Records until the batch is full or ``max_wait_ms`` passed since its first record.

        Returns an empty list after an idle half second, so the loop can resume partitions
        and notice a stop request.
        """
        batch: list[Message] = []
        max_size = self._settings.batch.max_size
        deadline: float | None = None
        while not self._stop.is_set():
            timeout = 0.5 if deadline is None else deadline - time.monotonic()
            if timeout <= 0:
                break
            for message in self._consumer.consume(
                num_messages=max_size - len(batch), timeout=timeout
            ):
                error = message.error()
                if error is not None:
                    self._on_consume_error(error)
                elif self._paused_until is None:
                    # While paused, records fetched before the pause are dropped: the rewind
                    # already moved each partition back to its first unfinished record.
                    batch.append(message)
            if self._revoked:
                # Records of partitions we just gave up belong to their new owner now.
                batch = [m for m in batch if (m.topic(), m.partition()) not in self._revoked]
                self._revoked.clear()
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

    # 2-7. process, dead-letter, commit ------------------------------------------------------

    def _handle(self, messages: list[Message]) -> None:
        for message in messages:
            self._offsets.track(
                message.topic() or "", message.partition() or 0, message.offset() or 0
            )
        self.metrics.consumed.inc(len(messages))
        self.metrics.batch_size.observe(len(messages))
        self.metrics.batch_fill.observe(len(messages) / self._settings.batch.max_size)
        self.metrics.in_flight.set(len(messages))
        try:
            result = self._processor.process(messages)
            self._dead_letter(result)
        except RetriableError as exc:
            logger.warning("batch of %d abandoned: %s", len(messages), exc)
            self._pause_and_rewind()
            return
        finally:
            self.metrics.in_flight.set(0)
        for item in result.items:
            if item.outcome is not Outcome.UNFINISHED:
                self._offsets.finish(
                    item.message.topic() or "",
                    item.message.partition() or 0,
                    item.message.offset() or 0,
                )
            if item.outcome is Outcome.SKIPPED:
                self.metrics.skipped.labels(item.skip_reason).inc()
        try:
            self._commit()
        except RetriableError as exc:
            logger.warning("commit failed: %s", exc)
            self._pause_and_rewind()
            return
        if result.with_outcome(Outcome.UNFINISHED):
            self._pause_and_rewind()

    def _dead_letter(self, result: BatchResult) -> None:
        letters = [
            item.dead_letter for item in result.with_outcome(Outcome.DEAD) if item.dead_letter
        ]
        if not letters:
            return
        with self.metrics.stage_seconds.labels(Stage.DEAD_LETTER.value).time():
            call_with_retries(
                lambda: self._dead_letters.publish(letters),
                self._settings.retry,
                what="dead-letter publish",
                should_stop=self._stop.is_set,
            )
        for letter in letters:
            self.metrics.dead_lettered.labels(letter.stage.value, letter.reason).inc()
            logger.info(
                "dead-lettered %s[%d]@%d: %s/%s: %s",
                letter.message.topic(),
                letter.message.partition(),
                letter.message.offset(),
                letter.stage.value,
                letter.reason,
                letter.error,
            )

    def _commit(self) -> None:
        positions = self._offsets.committable()
        positions = {key: offset for key, offset in positions.items() if key in self.assigned}
        if not positions:
            return
        offsets = [
            TopicPartition(topic, partition, offset)
            for (topic, partition), offset in positions.items()
        ]

        def commit() -> None:
            try:
                self._consumer.commit(offsets=offsets, asynchronous=False)
            except KafkaException as exc:
                raise BrokerUnavailableError(f"commit failed: {exc}") from exc

        call_with_retries(
            commit, self._settings.retry, what="offset commit", should_stop=self._stop.is_set
        )
        self._offsets.mark_committed(positions)
        logger.debug("committed %s", positions)

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
        """Stop fetching, seek every partition back to its first unfinished record, wait."""
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

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self.assigned.update((tp.topic, tp.partition) for tp in partitions)
        self._fresh_assignment = True
        self.metrics.assigned.set(len(self.assigned))
        if self._paused_until is not None:
            # Newly assigned partitions join the pause too: the outage concerns them as well.
            consumer.pause(partitions)
        logger.info("assigned %s", sorted((tp.topic, tp.partition) for tp in partitions))

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Everything finished so far is committed before the partitions move on.
        try:
            self._commit()
        except RetriableError as exc:
            logger.warning("commit on revoke failed; the new owner repeats some work: %s", exc)
        self._drop(partitions)
        logger.info("revoked %s", sorted((tp.topic, tp.partition) for tp in partitions))

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Lost partitions may already belong to another member: committing would be wrong.
        self._drop(partitions)
        logger.warning("lost %s", sorted((tp.topic, tp.partition) for tp in partitions))

    def _drop(self, partitions: list[TopicPartition]) -> None:
        keys = [(tp.topic, tp.partition) for tp in partitions]
        self._offsets.forget(keys)
        self._revoked.update(keys)
        self.assigned.difference_update(keys)
        self.metrics.assigned.set(len(self.assigned))
