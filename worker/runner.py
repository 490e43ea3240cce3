"""Assemble a worker from settings and run it until SIGTERM/SIGINT."""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable
from types import FrameType

from engine.errors import RetriableError
from engine.fetch import ImageFetcher
from engine.inference import TritonEmbedder
from engine.kafka import ensure_topics
from engine.preprocess_jax import build_preprocessor
from engine.settings import Settings
from engine.store import VectorStore
from worker.consumer import Worker
from worker.health import HealthServer
from worker.metrics import WorkerMetrics
from worker.pipeline import BatchProcessor
from worker.retry import call_with_retries

logger = logging.getLogger(__name__)


def build_worker(
    settings: Settings, *, worker_id: str | None = None
) -> tuple[Worker, Callable[[], dict[str, bool]]]:
    """A ready-to-run worker and its readiness check (Triton model ready, Milvus reachable).

    Raises:
        ConfigurationError: the settings are inconsistent.
    """
    fetcher = ImageFetcher(settings.fetch)
    preprocessor = build_preprocessor(settings.preprocess)
    embedder = TritonEmbedder(settings.triton)
    store = VectorStore(settings.milvus)

    def make_processor(metrics: WorkerMetrics, should_stop: Callable[[], bool]) -> BatchProcessor:
        return BatchProcessor(
            fetcher=fetcher,
            preprocessor=preprocessor,
            embedder=embedder,
            store=store,
            fetch_settings=settings.fetch,
            retry_settings=settings.retry,
            model_version=settings.triton.model_tag,
            default_collection=settings.milvus.collection,
            metrics=metrics,
            should_stop=should_stop,
        )

    worker = Worker(settings, make_processor, worker_id=worker_id)

    def readiness() -> dict[str, bool]:
        try:
            store.list_collections()
            milvus_ok = True
        except RetriableError:
            milvus_ok = False
        return {"kafka": worker.subscribed, "triton": embedder.is_ready(), "milvus": milvus_ok}

    # The default collection is created on purpose, here; events naming any other collection
    # are dead-lettered unless it was created beforehand (API, CLI).
    call_with_retries(
        lambda: store.create_collection(
            settings.milvus.collection, model_tag=settings.triton.model_tag
        ),
        settings.retry,
        what=f"creating collection {settings.milvus.collection}",
    )
    # Compile every batch shape now, not on the first records.
    preprocessor.warmup()
    return worker, readiness


def run_worker(settings: Settings, *, worker_id: str | None = None) -> None:
    """Run one worker in this process until SIGTERM or SIGINT; then stop within the grace period.

    Raises:
        BrokerUnavailableError: Kafka could not be reached to create the topics.
    """
    ensure_topics(settings.kafka)
    worker, readiness = build_worker(settings, worker_id=worker_id)
    loop_thread = threading.current_thread()
    health = HealthServer(
        settings.worker.health_host,
        settings.worker.health_port,
        registry=worker.metrics.registry,
        is_alive=loop_thread.is_alive,
        readiness=readiness,
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
