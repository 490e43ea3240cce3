"""Prometheus metrics of a worker process (one registry per worker, served on /metrics)."""

from __future__ import annotations

from enum import StrEnum

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Step(StrEnum):
    """What the worker was doing: the label of timings and retries.

    Not the place a record failed (that is ``engine.errors.Stage``, in dead-letter headers): the
    version lookup, for instance, is a step of its own, whatever stage its errors are charged to.
    """

    DECODE_EVENT = "decode_event"
    FETCH = "fetch"
    VERSION_LOOKUP = "version_lookup"
    VECTOR_LOOKUP = "vector_lookup"
    DECODE_IMAGE = "decode_image"
    PREPROCESS = "preprocess"
    EMBED = "embed"
    # The region vectors of collections made with regions (issue 24).
    PREPROCESS_REGIONS = "preprocess_regions"
    EMBED_REGIONS = "embed_regions"
    UPSERT = "upsert"
    DELETE = "delete"
    DEAD_LETTER = "dead_letter"
    REQUEUE = "requeue"
    COMMIT = "commit"


_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class WorkerMetrics:
    """Every metric the worker exports, registered in its own registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.consumed = Counter("trident_events_consumed_total", "Records consumed.", registry=r)
        self.upserted = Counter(
            "trident_events_upserted_total", "Vectors upserted into Milvus.", registry=r
        )
        self.deletes = Counter(
            "trident_deletes_total",
            "Deletes consumed, by result: applied (tombstone kept, row removed if there was one), "
            "stale (a newer version is stored) or superseded (a later record of the id in the "
            "batch).",
            ["result"],
            registry=r,
        )
        self.skipped = Counter(
            "trident_events_skipped_total",
            "Events needing no write (stale, unchanged, superseded).",
            ["reason"],
            registry=r,
        )
        self.dead_lettered = Counter(
            "trident_events_dead_lettered_total",
            "Records sent to the dead-letter topic.",
            ["stage", "reason"],
            registry=r,
        )
        self.retries = Counter(
            "trident_retries_total",
            "Retried calls to a dependency, by step (label ``stage``) and reason.",
            ["stage", "reason"],
            registry=r,
        )
        self.requeued = Counter(
            "trident_events_requeued_total",
            "Records re-published for a later attempt after a per-record transient failure.",
            ["reason"],
            registry=r,
        )
        self.pauses = Counter(
            "trident_partition_pauses_total",
            "Times the partitions were paused after retries ran out.",
            registry=r,
        )
        self.batch_size = Histogram(
            "trident_batch_size",
            "Records per micro-batch.",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
            registry=r,
        )
        self.batch_fill = Histogram(
            "trident_batch_fill_ratio",
            "Batch size divided by the maximum batch size.",
            buckets=(0.1, 0.25, 0.5, 0.75, 0.9, 1.0),
            registry=r,
        )
        # The label keeps its name ``stage`` (dashboards query it); its values are Steps.
        self.step_seconds = Histogram(
            "trident_stage_seconds",
            "Time spent per step and batch.",
            ["stage"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge("trident_in_flight_items", "Records being processed.", registry=r)
        self.batches_in_flight = Gauge(
            "trident_batches_in_flight",
            "Batches in the pipeline: being prepared, embedded or stored (worker.pipeline_depth).",
            registry=r,
        )
        self.pipeline_input_wait = Counter(
            "trident_pipeline_input_wait_seconds_total",
            "Seconds a pipeline stage sat idle while its next batch was still upstream (for embed: "
            "the model waiting for fetch, decode and preprocessing).",
            ["stage"],
            registry=r,
        )
        self.pipeline_output_wait = Counter(
            "trident_pipeline_output_wait_seconds_total",
            "Seconds a pipeline stage held a finished batch because the next stage was still busy "
            "with earlier ones (for prepare: the model is the bottleneck, as it should be).",
            ["stage"],
            registry=r,
        )
        self.lag = Gauge(
            "trident_consumer_lag",
            "High watermark minus committed position.",
            ["topic", "partition"],
            registry=r,
        )
        self.assigned = Gauge("trident_assigned_partitions", "Partitions assigned.", registry=r)
        self.version_reads = Counter(
            "trident_version_reads_total",
            "Stored-version reads of the stale-version guard, by consistency (Strong only "
            "until the worker wrote after an assignment).",
            ["consistency"],
            registry=r,
        )
        self.versions_remembered = Gauge(
            "trident_versions_remembered",
            "Versions of ids this worker wrote that the stale-version guard remembers.",
            registry=r,
        )
        self.heartbeat_age = Gauge(
            "trident_loop_heartbeat_age_seconds",
            "Seconds since the consumer loop last reported progress.",
            registry=r,
        )


class RebuildMetrics:
    """The ``trident_reembed_*`` gauges a rebuild worker exports (``worker.progress``),
    labelled by the collection being rebuilt (the new version, e.g. ``images_v2``)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.done = Gauge(
            "trident_reembed_done",
            "Records of the topics the rebuild's group has passed (committed).",
            ["collection"],
            registry=r,
        )
        self.total = Gauge(
            "trident_reembed_total", "Records of the topics to read.", ["collection"], registry=r
        )
        self.lag = Gauge(
            "trident_reembed_lag",
            "Records the rebuild has still to read.",
            ["collection"],
            registry=r,
        )
        self.rate = Gauge(
            "trident_reembed_rate",
            "Records per second over the last minute.",
            ["collection"],
            registry=r,
        )
        self.eta = Gauge(
            "trident_reembed_eta_seconds",
            "Seconds until caught up at that rate (+Inf: not moving).",
            ["collection"],
            registry=r,
        )

    def set(self, collection: str, done: int, total: int, rate: float, eta_s: float) -> None:
        self.done.labels(collection).set(done)
        self.total.labels(collection).set(total)
        self.lag.labels(collection).set(total - done)
        self.rate.labels(collection).set(rate)
        self.eta.labels(collection).set(eta_s)
