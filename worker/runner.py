"""Assemble a worker from settings, own its adapters, and run it until SIGTERM/SIGINT."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import threading
from collections.abc import Callable
from types import FrameType, TracebackType
from typing import TypeVar

from confluent_kafka import Consumer

from engine.errors import InferenceConfigurationError, UnknownCollectionError
from engine.fetch import ImageFetcher
from engine.health import HEALTH_DEADLINE_S, Prober, milvus_probe, triton_probe
from engine.inference import TritonEmbedder
from engine.kafka import consumer_config, ensure_topics
from engine.preprocess import build_preprocessor
from engine.settings import Settings, TritonSettings
from engine.store import VectorStore
from worker.consumer import Worker
from worker.dead_letter import RecordPublisher
from worker.health import HealthServer, Heartbeat
from worker.metrics import RebuildMetrics, WorkerMetrics
from worker.ownership import Ownership
from worker.pipeline import BatchProcessor
from worker.progress import ProgressReporter, read_offsets
from worker.regions import build_region_embedding, how_to_serve
from worker.retry import call_with_retries
from worker.routing import CollectionRouter

logger = logging.getLogger(__name__)

T = TypeVar("T")


class WorkerRuntime:
    """A worker with every adapter it uses, which this object owns and closes.

    The loop's clients (consumer, producer, Triton, Milvus, fetcher, decoding threads) and the
    health probes' own Triton and Milvus clients: a failing probe never touches the loop's.
    Use as a context manager, or call :meth:`close` after ``worker.run()`` returned.
    """

    def __init__(self, settings: Settings, *, worker_id: str | None = None) -> None:
        self._closers: list[Callable[[], None]] = []
        try:
            self.worker = self._assemble(
                settings, worker_id or f"{socket.gethostname()}-{os.getpid()}"
            )
        except BaseException:
            self.close()
            raise

    def _assemble(self, settings: Settings, worker_id: str) -> Worker:
        self.metrics = WorkerMetrics()
        self.heartbeat = Heartbeat()
        self.metrics.heartbeat_age.set_function(self.heartbeat.age)
        self._liveness_bound = settings.worker.liveness_timeout_s
        stop = threading.Event()
        fetcher = self._owned(ImageFetcher(settings.fetch), "close")
        # Checked at start against the model's spec (wait_until_ready below).
        embedder = self._owned(TritonEmbedder(settings.triton, model=settings.model), "close")
        store = self._owned(VectorStore(settings.milvus), "close")
        self._probe_embedder = self._owned(TritonEmbedder(settings.triton), "close")
        self._probe_store = self._owned(VectorStore(settings.milvus), "close")
        self._prober = self._owned(Prober(), "close")
        sink = self._owned(
            RecordPublisher(
                settings.kafka, worker_id=worker_id, model_version=settings.triton.model_tag
            ),
            "close",
        )
        preprocessor = build_preprocessor(settings.preprocess)
        # Region vectors, for the collections made with them (None: this model has no recipe).
        built = build_region_embedding(settings)
        regions = built[0] if built is not None else None
        if built is not None:
            self._owned(built[1], "close")
        ownership = Ownership()
        processor = self._owned(
            BatchProcessor(
                fetcher=fetcher,
                preprocessor=preprocessor,
                decode_short_side=preprocessor.decode_short_side,
                embedder=embedder,
                store=store,
                ownership=ownership,
                fetch_settings=settings.fetch,
                retry_settings=settings.retry,
                model_version=settings.triton.model_tag,
                default_collection=settings.milvus.collection,
                metrics=self.metrics,
                version_cache_size=settings.worker.version_cache_size,
                should_stop=stop.is_set,
                event_limits=settings.kafka.event_limits,
                # Rows go only into collections of this worker's model (or of none recorded).
                collection_model_tag=lambda name: store.describe_collection(name).model_tag,
                router=CollectionRouter(
                    store,
                    model_tag=settings.triton.model_tag,
                    rebuild=settings.worker.rebuild,
                    cache_s=settings.worker.routing_cache_s,
                ),
                collection_regions=lambda name: store.describe_collection(name).regions,
                regions=regions,
            ),
            "close",
        )
        if settings.worker.rebuild is None:
            # The default collection is created on purpose, here; events naming any other
            # collection are dead-lettered unless it was created beforehand (API, CLI). A
            # rebuild worker writes only into its target, made by trident-reembed.
            call_with_retries(
                lambda: _ensure_default_collection(store, settings),
                settings.retry,
                what=f"creating collection {settings.milvus.collection}",
            )
        else:
            self._report_progress(settings, settings.worker.rebuild.target)
        # Compile every batch shape now, not on the first records.
        preprocessor.warmup()
        # Then the model: a worker that cannot embed must not join the group and take
        # partitions. A model Triton does not serve is a configuration error, at once.
        embedder.wait_until_ready(settings.triton.ready_timeout_s)
        if built is not None and settings.milvus.regions:
            # The default collection has regions: the region model too, before joining.
            # Otherwise it is needed only when a collection with regions comes (embed stage).
            built[0].pixels.warmup()
            _wait_for_region_model(built[1], built[0].model_name, settings.triton)
        # The loop closes its consumer itself when it stops (leaving the group at once);
        # Worker.close covers a worker that never ran.
        consumer = Consumer(consumer_config(settings.kafka, **{"client.id": worker_id}))
        worker = Worker(
            settings,
            processor,
            consumer=consumer,
            sink=sink,
            ownership=ownership,
            metrics=self.metrics,
            stop=stop,
            heartbeat=self.heartbeat,
            worker_id=worker_id,
        )
        return self._owned(worker, "close")

    def _report_progress(self, settings: Settings, target: str) -> None:
        """Keep the ``trident_reembed_*`` gauges of the rebuild into ``target`` current."""
        kafka = settings.kafka
        reporter = ProgressReporter(
            RebuildMetrics(self.metrics.registry),
            collection=target,
            read=lambda: read_offsets(
                kafka, kafka.group_id, kafka.topics().consumed, timeout_s=kafka.connect_timeout_s
            ),
            interval_s=settings.worker.progress_interval_s,
        )
        reporter.start()
        self._owned(reporter, "stop")

    def _owned(self, adapter: T, close: str) -> T:
        self._closers.append(getattr(adapter, close))
        return adapter

    def alive(self) -> bool:
        """The loop's heartbeat is fresher than ``worker.liveness_timeout_s``."""
        return self.heartbeat.fresh(self._liveness_bound)

    def readiness(self) -> dict[str, bool]:
        """Subscribed, Triton model ready, Milvus reachable (the probes' own clients), the two
        probed at once: answers within ``HEALTH_DEADLINE_S`` whatever the services do."""
        probes = {
            "triton": triton_probe(self._probe_embedder),
            "milvus": milvus_probe(self._probe_store),
        }
        results = self._prober.probe_all(probes, HEALTH_DEADLINE_S)
        for name, result in results.items():
            if not result.up:
                logger.debug("readiness: %s down: %s", name, result.detail)
        return {
            "kafka": self.worker.subscribed,
            **{name: result.up for name, result in results.items()},
        }

    def close(self) -> None:
        """Close every adapter, last opened first; never raises."""
        while self._closers:
            close = self._closers.pop()
            try:
                close()
            except Exception as exc:  # closing must go on whatever one adapter does
                logger.warning("closing %s failed: %s", close, exc)

    def __enter__(self) -> WorkerRuntime:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _ensure_default_collection(store: VectorStore, settings: Settings) -> None:
    """Create the default collection for this worker's model, unless its name is an alias: a
    collection rebuilt by ``trident-reembed``, whose versions exist and whose events routing
    sends to the version of this worker's model, or skips (``worker.routing``).

    Raises:
        CollectionConflictError: a plain collection of that name is bound to another model.
        StoreUnavailableError: Milvus is unavailable.
    """
    name = settings.milvus.collection
    with contextlib.suppress(UnknownCollectionError):
        if store.resolve_alias(name) != name:
            return
    store.create_collection(
        name,
        model_tag=settings.triton.model_tag,
        model_name=settings.model.name,
        regions=settings.milvus.regions,
    )


def _wait_for_region_model(embedder: TritonEmbedder, name: str, triton: TritonSettings) -> None:
    """Wait, as for the worker's model, until Triton serves the region model ``name``.

    Raises:
        InferenceConfigurationError: Triton does not serve it; the message says how to.
        InferenceUnavailableError, ModelMismatchError: as ``TritonEmbedder.wait_until_ready``.
    """
    try:
        embedder.wait_until_ready(triton.ready_timeout_s)
    except InferenceConfigurationError as exc:
        raise InferenceConfigurationError(
            f"{exc}. milvus.regions is true: Triton must serve the region model {name!r} too: "
            f"{how_to_serve(name)}"
        ) from exc


def build_worker(settings: Settings, *, worker_id: str | None = None) -> WorkerRuntime:
    """A ready-to-run worker (``runtime.worker``) with its adapters; close the runtime after.

    Waits for Triton's model to be ready, up to ``triton.ready_timeout_s``.

    Raises:
        StoreUnavailableError: Milvus stayed unreachable while creating the default collection.
        CollectionConflictError: the default collection exists with another dimension, or bound
            to another model than the worker's, or without regions when ``milvus.regions`` asks
            for them (``milvus.collection``: name another).
        InferenceUnavailableError: Triton's model was not ready within ``triton.ready_timeout_s``.
        InferenceConfigurationError: Triton does not serve the configured model.
        ConfigurationError: the settings are inconsistent (e.g. ``milvus.regions`` for a model
            without a region recipe).
    """
    return WorkerRuntime(settings, worker_id=worker_id)


def run_worker(settings: Settings, *, worker_id: str | None = None) -> None:
    """Run one worker in this process until SIGTERM or SIGINT; then stop within the grace period.

    Raises:
        BrokerUnavailableError: Kafka could not be reached to create the topics.
    """
    ensure_topics(settings.kafka)
    with build_worker(settings, worker_id=worker_id) as runtime:
        worker = runtime.worker
        health = HealthServer(
            settings.worker.health_host,
            settings.worker.health_port,
            registry=runtime.metrics.registry,
            is_alive=runtime.alive,
            readiness=runtime.readiness,
        )
        health.start()

        def request_stop(signum: int, _frame: FrameType | None) -> None:
            logger.info("received %s: finishing the current batch", signal.Signals(signum).name)
            worker.stop()
            # A second signal, or the grace period running out, ends the process the hard way;
            # uncommitted records are simply consumed again by another worker.
            timer = threading.Timer(settings.worker.shutdown_grace_s, _force_exit)
            timer.daemon = True
            timer.start()

        signal.signal(signal.SIGTERM, request_stop)
        signal.signal(signal.SIGINT, request_stop)
        try:
            worker.run()
        finally:
            health.stop()


def _force_exit() -> None:
    logger.error("shutdown grace period exceeded; exiting without a clean leave")
    os._exit(1)
