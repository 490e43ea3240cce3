"""Typed settings, read once at an entry point and passed down.

:func:`load_settings` (the entry points' loader, and the only reader of ``TRIDENT_*``
variables) merges, later ones winning: defaults, a YAML file, environment variables prefixed
``TRIDENT_`` with ``__`` between nesting levels (``TRIDENT_KAFKA__BOOTSTRAP_SERVERS=host:9092``).
``Settings(...)`` built in code means exactly what it says: the environment is not consulted.
(The earlier API's ``jax_embedding.config`` reads the earlier pipeline's own variables.) An
unknown key in any section is an error naming it. Core classes receive the section they need.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Self, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from engine.errors import ConfigurationError
from engine.indexes import IndexSpec, IndexType, Metric
from engine.models import (
    DEFAULT_MODEL_SPEC,
    MODEL_SPEC_FILE,
    PREPROCESS_BATCH_SIZES,
    UINT8_MODEL_SPEC,
    InputFormat,
    ModelSpec,
    input_is_pixels,
    model_registry,
    model_spec,
    project_model_for,
    repository_model_specs,
)
from schemas import EventLimits
from schemas.errors import validation_problems

_S = TypeVar("_S", bound=BaseModel)


class _Section(BaseModel):
    """A settings section: a misspelt key is an error naming it, never silently ignored."""

    model_config = ConfigDict(extra="forbid")


@dataclass(frozen=True)
class Topics:
    """The three topics of one deployment, by role (:meth:`KafkaSettings.topics`).

    ``ingest`` is the source of truth: compacted, written by producers only, so the last record
    of an id there is the newest one published. ``retry`` takes what the workers re-queue and
    what ``trident-dlq replay`` republishes (older copies that must never become an id's last
    word on the ingest topic); time-retained, co-partitioned with ``ingest``. ``dead_letter``
    keeps what could not be processed.
    """

    ingest: str
    retry: str
    dead_letter: str

    @property
    def consumed(self) -> tuple[str, str]:
        """What the workers' group subscribes to: the ingest topic and the retry topic."""
        return (self.ingest, self.retry)

    @property
    def all(self) -> tuple[str, str, str]:
        return (self.ingest, self.retry, self.dead_letter)


_DAY_MS = 86_400_000


class KafkaSettings(_Section):
    """Where Kafka is, the topics, the group, and how ``ensure_topics`` creates the topics.

    Topic configuration (applied when a topic is created: by the worker's ``ensure_topics``
    with these values, by the Kubernetes topics Job from the same settings; an existing topic is
    never altered, see docs/OPERATIONS.md, "The ingest topic"):

    - the ingest topic is **compacted** (``cleanup.policy=compact``): reading it from the
      beginning yields the newest record of every id, and of a deleted id its tombstone for
      ``delete_retention_ms``, then nothing. It keeps the newest event of every live id forever,
      inline images included: about live ids x event size.
    - the retry topic is time-retained (``retry_retention_ms``), the dead-letter topic too
      (``dead_letter_retention_ms``).
    """

    bootstrap_servers: str = "127.0.0.1:19092"
    topic: str = Field("trident.ingest", description="The ingest topic (compacted).")
    retry_topic: str = Field(
        "",
        description="Where workers re-queue records and trident-dlq replays dead letters, "
        "consumed by the workers' group with the ingest topic; empty: '<topic>.retry'.",
    )
    dead_letter_topic: str = "trident.ingest.dlq"
    group_id: str = "trident-workers"
    session_timeout_ms: int = 6000
    # Must exceed the longest batch (including retries) so a slow batch does not cost the
    # partitions: the worker pauses and rewinds long before this.
    max_poll_interval_ms: int = 300_000
    topic_partitions: int = Field(
        4,
        ge=1,
        description="Partitions when the worker creates the ingest topic; the retry topic gets "
        "as many as the ingest topic has.",
    )
    compaction_lag_ms: int = Field(
        3_600_000,
        ge=0,
        description="min.compaction.lag.ms of the ingest topic: a record stays uncompacted this "
        "long, so a worker (or trident-dlq status) that keeps up sees every version published.",
    )
    delete_retention_ms: int = Field(
        7 * _DAY_MS,
        ge=0,
        description="delete.retention.ms of the ingest topic: how long a tombstone stays "
        "readable once compacted; must exceed the longest read of the topic from its beginning "
        "(a rebuild, a worker lagging or down), or a delete is missed.",
    )
    segment_ms: int = Field(
        _DAY_MS,
        ge=1,
        description="segment.ms of the ingest topic: the open segment is never compacted; it "
        "rolls after this long, so superseded records go within about a day.",
    )
    retry_retention_ms: int = Field(
        7 * _DAY_MS, ge=1, description="retention.ms of the retry topic (transient)."
    )
    dead_letter_retention_ms: int = Field(
        30 * _DAY_MS,
        ge=1,
        description="retention.ms of the dead-letter topic (to inspect, replay).",
    )
    ingest_topic_config: dict[str, str] = Field(
        default_factory=dict,
        description="More configs of the ingest topic when created (e.g. "
        "min.cleanable.dirty.ratio); they win over the ones above.",
    )
    commit_timeout_s: float = Field(
        10.0,
        gt=0,
        description="How long one offset commit waits for the group coordinator; past it the "
        "commit counts as failed (retried, then the worker pauses and rewinds) and the loop "
        "keeps polling through a broker outage.",
    )
    connect_timeout_s: float = Field(
        10.0,
        gt=0,
        description="How long trident-produce and trident-dlq wait for the cluster's first answer "
        "before they report it unreachable.",
    )
    extra: dict[str, str] = Field(default_factory=dict, description="Raw librdkafka settings.")
    event_limits: EventLimits = Field(
        default_factory=EventLimits, description="What one ingest event may hold (bytes)."
    )

    @model_validator(mode="after")
    def _topics_differ(self) -> Self:
        topics = self.topics()
        if len(set(topics.all)) != 3:
            raise ValueError(
                f"kafka.topic ({topics.ingest!r}), the retry topic ({topics.retry!r}) and "
                f"kafka.dead_letter_topic ({topics.dead_letter!r}) must be three topics"
            )
        return self

    def topics(self) -> Topics:
        """The topics by role, the retry topic's default (``<topic>.retry``) filled in: the one
        place that says which topics there are."""
        return Topics(
            ingest=self.topic,
            retry=self.retry_topic or f"{self.topic}.retry",
            dead_letter=self.dead_letter_topic,
        )

    def topic_configs(self) -> dict[str, dict[str, str]]:
        """Each topic's configuration at creation (``ensure_topics``; the Kubernetes Job passes
        the same values from the same settings)."""
        topics = self.topics()
        ingest = {
            "cleanup.policy": "compact",
            "min.compaction.lag.ms": str(self.compaction_lag_ms),
            "delete.retention.ms": str(self.delete_retention_ms),
            "segment.ms": str(self.segment_ms),
            **self.ingest_topic_config,
        }
        return {
            topics.ingest: ingest,
            topics.retry: {
                "cleanup.policy": "delete",
                "retention.ms": str(self.retry_retention_ms),
            },
            topics.dead_letter: {
                "cleanup.policy": "delete",
                "retention.ms": str(self.dead_letter_retention_ms),
            },
        }


class TritonSettings(_Section):
    """Where the embedding model is served, which model, and what it takes.

    ``model_name`` names a model of the registry (:func:`engine.models.model_registry`: the
    built-in models, and the user models whose spec files lie in ``model_repository``); the
    keys below it follow from that model's spec when not given, and a given one that
    contradicts the spec is an error naming both. In a :class:`Settings`, ``model_name`` itself
    follows the preprocessing when not given (see :class:`Settings`).

    A name the registry does not have is an *unregistered* model, described by these keys (the
    earlier configurations' way): it takes ``float32_nchw`` unless ``input_format`` says
    otherwise, and the other keys keep the default model's values unless given.
    """

    url: str = "127.0.0.1:18001"
    protocol: Literal["grpc", "http"] = "grpc"
    model_name: str = UINT8_MODEL_SPEC.name
    model_repository: Path | None = Field(
        None,
        description="A Triton model repository holding models added by trident-models add: "
        "their spec files (<dir>/<name>/" + MODEL_SPEC_FILE + ") join the registry.",
    )
    input_format: InputFormat = UINT8_MODEL_SPEC.input_format
    model_version: str = ""
    input_name: str = UINT8_MODEL_SPEC.input_name
    output_name: str = UINT8_MODEL_SPEC.output_name
    max_batch_size: int = Field(UINT8_MODEL_SPEC.max_batch_size, ge=1)
    model_tag: str = Field(UINT8_MODEL_SPEC.model_version_tag, description="Stored with vectors.")
    request_timeout_s: float = 30.0
    ready_timeout_s: float = 120.0
    # A batch goes out as this many equal requests at once (more if a part would exceed
    # max_batch_size), so that each of the model's instances (ModelSpec.instance_count) runs
    # a part: docs/PERFORMANCE.md, "Triton tuning".
    parallel_requests: int = Field(
        UINT8_MODEL_SPEC.instance_count,
        ge=1,
        le=64,
        description="Requests one batch is split into, sent at once (one per model instance).",
    )
    _registry: dict[str, ModelSpec] = PrivateAttr(default_factory=dict)

    @model_validator(mode="after")
    def _follow_the_named_model(self) -> Self:
        """Read the registry once, then take the named model's values for the keys not given.

        Raises (besides ValueError): ModelSpecError for an unreadable spec file.
        """
        user = repository_model_specs(self.model_repository) if self.model_repository else ()
        self._registry = model_registry(user)
        if "model_name" not in self.model_fields_set and "input_format" in self.model_fields_set:
            # A format without a name: the default model's variant taking it.
            _fill(self, "model_name", project_model_for(self.input_format).name)
        return self.following(self._registry.get(self.model_name))

    def registry(self) -> dict[str, ModelSpec]:
        """Every servable model by name: the built-in ones and those of ``model_repository``."""
        return dict(self._registry)

    def following(self, spec: ModelSpec | None) -> Self:
        """Fill the keys not given from ``spec`` (``None``: an unregistered model), after
        checking that the given ones agree with it (tensor names given are kept: they are what
        is sent). Returns ``self``, filled.

        Raises:
            ValueError: a given key contradicts the spec, naming both.
        """
        given = self.model_fields_set
        if spec is None:
            if "input_format" not in given:
                _fill(self, "input_format", "float32_nchw")  # as every model was before
            return self
        derived = _triton_values(spec)
        # Tensor names given are what is sent (the earlier API's per-model names): they are
        # the model as these settings address it (Settings.model), checked against what Triton
        # serves at start. What the model is (input, tag) must be the spec's.
        for key in ("input_format", "model_tag"):
            if key in given and getattr(self, key) != derived[key]:
                raise ValueError(
                    f"triton.{key} {getattr(self, key)!r} does not fit model {spec.name!r}, "
                    f"whose spec says {derived[key]!r}: drop triton.{key} (it follows "
                    "triton.model_name)"
                )
        if "max_batch_size" in given and self.max_batch_size > spec.max_batch_size:
            raise ValueError(
                f"triton.max_batch_size {self.max_batch_size} exceeds model {spec.name!r}'s "
                f"{spec.max_batch_size}"
            )
        for key, value in derived.items():
            if key not in given:
                _fill(self, key, value)
        return self


def _triton_values(spec: ModelSpec) -> dict[str, Any]:
    """The triton keys a model's spec decides."""
    return {
        "input_format": spec.input_format,
        "input_name": spec.input_name,
        "output_name": spec.output_name,
        "max_batch_size": spec.max_batch_size,
        "model_tag": spec.model_version_tag,
    }


def _fill(section: BaseModel, key: str, value: Any) -> None:
    """Set a key that was not given, leaving it not given (``model_fields_set`` unchanged):
    what a section was told and what it derived stay apart, so a later derivation (a
    :class:`Settings` choosing the model) can still replace it."""
    section.__dict__[key] = value


class MilvusSettings(_Section):
    uri: str = "http://127.0.0.1:19530"
    token: str = ""
    collection: str = Field("images", description="The default collection, created by the worker.")
    regions: bool = Field(
        False,
        description="The default collection is made with region vectors (issue 24): the model "
        "(triton.model_name) needs a region recipe, and Triton must serve its region model. "
        "Chosen at creation: an existing collection keeps what it was made with.",
    )
    dimension: int = Field(
        UINT8_MODEL_SPEC.output_dim,
        ge=1,
        description="Of new collections; in a Settings it follows the model (triton.model_name).",
    )
    metric: Metric = "COSINE"
    index_type: IndexType = "HNSW"
    # Empty means the index type's defaults (see engine/indexes.py).
    index_params: dict[str, int] = Field(default_factory=dict)
    search_params: dict[str, int] = Field(default_factory=dict)
    timeout_s: float = 30.0
    missing_recheck_s: float = Field(
        1.0,
        ge=0,
        le=10,
        description="How long a collection found missing is looked for again before it is "
        "called unknown: a migration renames a collection, then makes its name an alias "
        "(0.1-0.8 s measured on the local stack).",
    )
    alias_cache_s: float = Field(
        2.0,
        ge=0,
        description="How long a collection's description (and where an alias points) is "
        "cached for reads and writes by its name.",
    )

    @model_validator(mode="after")
    def _index_is_valid(self) -> Self:
        self.index_spec()  # a wrong parameter fails here, naming it, not at the first write
        return self

    def index_spec(self) -> IndexSpec:
        """The index new collections get (index type, metric and parameters)."""
        return IndexSpec(
            index_type=self.index_type,
            metric=self.metric,
            params=self.index_params,
            search_params=self.search_params,
        )


class FetchSettings(_Section):
    """How image references are followed. Defaults are safe for untrusted events."""

    allowed_roots: list[Path] = Field(
        default_factory=list, description="Local paths are read only below these folders."
    )
    timeout_s: float = 10.0
    max_bytes: int = 25 * 1024 * 1024
    max_pixels: int = 50_000_000
    concurrency: int = 8
    allow_private_addresses: bool = Field(
        False, description="Allow URLs resolving to loopback/private/link-local/metadata addresses."
    )
    allowed_hosts: list[str] = Field(
        default_factory=list, description="Hosts always allowed, even if their address is private."
    )


class PreprocessSettings(_Section):
    """How decoded images become model input (see engine/resampling.py, engine/preprocess.py).

    ``class_`` (key ``class``) names a :class:`engine.preprocess.BaseJAXPreprocessor`
    subclass as ``"package.module:Class"``, built with ``image_size``, ``use_gpu`` and
    ``options``; empty means the built-in preprocessing (``image_size``, ``resize_short_side``,
    ``mean``, ``std``). Worker and query API use the same one, so queries are embedded exactly
    as stored images were.

    In a :class:`Settings`, ``image_size``, ``resize_short_side``, ``output`` and the
    normalisation follow the model (``triton.model_name``'s spec) when not given; given ones
    must fit it (``mean``/``std`` may differ only for a model taking float32 input, which the
    preprocessing normalises). ``output`` is what the preprocessing hands to the model, the
    model's :data:`~engine.models.InputFormat`. On its own (no model), ``output`` is
    ``float32_nchw`` for a custom class or a ``mean``/``std`` other than the default model's.
    """

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    device: Literal["auto", "cpu", "gpu"] = "auto"
    batch_sizes: tuple[int, ...] = PREPROCESS_BATCH_SIZES
    image_size: int = Field(UINT8_MODEL_SPEC.image_size, ge=1)
    resize_short_side: int = Field(UINT8_MODEL_SPEC.resize_short_side, ge=1)
    mean: tuple[float, float, float] = Field(
        UINT8_MODEL_SPEC.input_mean, description="0-255 scale."
    )
    std: tuple[float, float, float] = Field(UINT8_MODEL_SPEC.input_std, description="0-255 scale.")
    class_: str = Field("", alias="class", pattern=r"^$|^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
    options: dict[str, Any] = Field(
        default_factory=dict, description="Keyword arguments for the custom class."
    )
    output: InputFormat = UINT8_MODEL_SPEC.input_format

    @model_validator(mode="after")
    def _float32_unless_built_in(self) -> Self:
        if "output" not in self.model_fields_set and (
            self.class_ or not self.normalises_like(UINT8_MODEL_SPEC)
        ):
            _fill(self, "output", "float32_nchw")
        return self

    def normalises_like(self, spec: ModelSpec) -> bool:
        """True when ``mean`` and ``std`` are ``spec``'s (close: the earlier config writes them
        as 127 / 255 * 255)."""
        pairs = [
            *zip(self.mean, spec.input_mean, strict=True),
            *zip(self.std, spec.input_std, strict=True),
        ]
        return all(math.isclose(a, b, abs_tol=1e-6) for a, b in pairs)


class BatchSettings(_Section):
    max_size: int = Field(32, ge=1)
    max_wait_ms: int = Field(250, ge=1)


class RetrySettings(_Section):
    attempts: int = Field(5, ge=1, description="Attempts per call before giving up on it.")
    initial_backoff_s: float = 0.5
    max_backoff_s: float = 8.0
    pause_s: float = Field(
        5.0, description="How long partitions stay paused when a dependency is down."
    )
    record_attempts: int = Field(
        10,
        ge=1,
        description="Attempts one record's image fetch may fail transiently, over all its "
        "deliveries, before it is dead-lettered as retries_exhausted.",
    )


class RebuildTarget(_Section):
    """What a rebuild worker writes: the events of the ``sources`` collections (an alias and
    the collection it pointed to) go into ``target``, a version bound to the worker's model;
    every other event is skipped (``trident-reembed``)."""

    sources: list[str] = Field(min_length=1)
    target: str = Field(min_length=1)


class WorkerSettings(_Section):
    health_host: str = "127.0.0.1"
    health_port: int = Field(
        9400, ge=0, le=65535, description="0: any free port, logged at start (several workers)."
    )
    shutdown_grace_s: float = 30.0
    revoke_timeout_s: float = Field(
        30.0,
        gt=0,
        description="The one deadline for giving partitions up in a rebalance (commit, wait for "
        "the upsert in flight); what is left then is redone by the new owner. Below "
        "kafka.max_poll_interval_ms.",
    )
    liveness_timeout_s: float = Field(
        600.0,
        gt=0,
        description="/livez fails when the consumer loop made no progress for this long; keep "
        "it above the longest batch with its retries (an outage pauses, which is progress).",
    )
    pipeline_depth: int = Field(
        3,
        ge=1,
        description="Batches in the pipeline at once: one being prepared (fetch, decode, JAX), one "
        "embedded, one stored; 1 runs the stages one batch after another.",
    )
    version_cache_size: int = Field(
        50_000,
        ge=1,
        description="Versions of ids this worker wrote, remembered (LRU) so that the stale-version "
        "guard needs no Strong read for them; ~0.5 KB each.",
    )
    rebuild: RebuildTarget | None = Field(
        None,
        description="Set by trident-reembed for its rebuild workers: write only the events of "
        "these source collections, into this target (no default collection is created).",
    )
    routing_cache_s: float = Field(
        10.0,
        gt=0,
        description="How long the worker keeps where an alias's events go (which version of it "
        "is bound to its model) before it looks again.",
    )
    progress_interval_s: float = Field(
        5.0,
        gt=0,
        description="How often a rebuild worker reads its group's offsets for the "
        "trident_reembed_* gauges.",
    )


class ReembedSettings(_Section):
    """``trident-reembed``: where it keeps its state and how it judges a rebuild caught up."""

    state_dir: Path = Field(
        Path(".stack/reembed"),
        description="Rebuild state, compare reports, and the local rebuild workers' settings, "
        "logs and pid files.",
    )
    max_lag: int = Field(
        0, ge=0, description="Records of the topics the rebuild may still lack at a switch."
    )
    max_missing: int = Field(
        0,
        ge=0,
        description="Rows by which the new collection's count may differ from the old one's at "
        "a switch.",
    )
    compare_sample: int = Field(
        20, ge=1, description="Queries of the quick compare a switch runs when there is none."
    )
    stop_timeout_s: float = Field(
        30.0, gt=0, description="How long a local rebuild worker gets to stop before SIGKILL."
    )


class ApiSettings(_Section):
    """The query API: where it listens and how it protects itself."""

    host: str = "127.0.0.1"
    port: int = 8080
    max_upload_bytes: int = Field(
        25 * 1024 * 1024, ge=1024, description="Largest request body, uploads included (413)."
    )
    auth: Literal["auto", "on", "off"] = Field(
        "auto", description="API keys required: auto = unless the API listens on loopback only."
    )
    api_keys: list[str] = Field(default_factory=list, description="Accepted X-API-Key values.")
    api_keys_file: Path | None = Field(None, description="More keys, one a line (# comments).")
    rate_limit_per_minute: int = Field(600, ge=0, description="Per client; 0 turns it off.")
    cors_origins: list[str] = Field(
        default_factory=list, description="Origins allowed by CORS; none by default."
    )
    thumbnail_size: int = Field(256, ge=16, le=1024, description="Longest side, in pixels.")
    thumbnail_cache_items: int = Field(512, ge=0)
    status_deadline_s: float = Field(
        5.0,
        gt=0,
        le=60,
        description="How long GET /items/{c}/{id}/status searches the topics before it answers "
        "with what it found (complete: false), besides the Milvus read.",
    )
    status_index_max_ids: int = Field(
        1_000_000,
        ge=1000,
        description="Ids whose newest dead letter the API keeps in memory for statuses (about "
        "300 bytes each); past it the ids dead-lettered longest ago are forgotten.",
    )


class Settings(BaseSettings):
    """All settings of every role; each role uses the sections it needs."""

    model_config = SettingsConfigDict(
        env_prefix="TRIDENT_", env_nested_delimiter="__", extra="forbid"
    )

    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    triton: TritonSettings = Field(default_factory=TritonSettings)
    milvus: MilvusSettings = Field(default_factory=MilvusSettings)
    fetch: FetchSettings = Field(default_factory=FetchSettings)
    preprocess: PreprocessSettings = Field(default_factory=PreprocessSettings)
    batch: BatchSettings = Field(default_factory=BatchSettings)
    retry: RetrySettings = Field(default_factory=RetrySettings)
    worker: WorkerSettings = Field(default_factory=WorkerSettings)
    api: ApiSettings = Field(default_factory=ApiSettings)
    reembed: ReembedSettings = Field(default_factory=ReembedSettings)

    _model: ModelSpec = PrivateAttr(default=UINT8_MODEL_SPEC)

    @property
    def model(self) -> ModelSpec:
        """The spec of the model these settings serve: the registry's for ``triton.model_name``
        (with the tensor names the settings send, where they give others), or, for an
        unregistered name, the one the triton, preprocess and milvus keys describe."""
        return self._model

    @model_validator(mode="after")
    def _derive_the_model(self) -> Self:
        """The one derivation of everything the model decides, from its spec.

        The model is ``triton.model_name``; when not given it follows the preprocessing (the
        default model's variant taking ``preprocess.output``, or ``triton.input_format`` when
        that is given): a custom class or normalisation gets the float32 one. Then the
        triton keys, ``milvus.dimension`` and the preprocessing's sizes, normalisation and
        output not given are the spec's; given ones that contradict it are an error here, at
        startup, naming both.

        Raises (besides ValueError): ModelSpecError for an unreadable user spec file.
        """
        triton, pre, milvus = self.triton.model_copy(), self.preprocess, self.milvus
        if "model_name" not in triton.model_fields_set:
            fmt = triton.input_format if "input_format" in triton.model_fields_set else pre.output
            _fill(triton, "model_name", project_model_for(fmt).name)
        registered = triton.registry().get(triton.model_name)
        triton.following(registered)  # the name may have changed: its keys follow again
        spec = _addressed(registered, triton) if registered else None
        spec = spec or _unregistered_spec(triton, pre, milvus)
        _check_preprocessing(pre, spec)
        _check_dimension(milvus, spec)
        self.triton = triton
        self.preprocess = _filled(pre, _preprocess_values(spec, pre))
        self.milvus = _filled(milvus, {"dimension": spec.output_dim})
        self._model = spec
        return self

    def for_model(self, name: str) -> Settings:
        """These settings serving the model ``name`` instead: the model's keys (the triton
        tensor keys, ``milvus.dimension``, the preprocessing's sizes, normalisation and output)
        derived afresh from its spec, everything else (addresses, timeouts, batching, device,
        a custom preprocessing class) kept. For holding one embedder per model.

        Raises:
            UnknownModelError: ``name`` is not in the registry (built-in and repository models).
            ConfigurationError: the model does not fit the kept keys (e.g. a custom class
                for a model taking pixels).
        """
        spec = model_spec(name, self.triton.registry())
        values = self.model_dump(by_alias=True, exclude_unset=True)
        triton = {k: v for k, v in values.get("triton", {}).items() if k not in _MODEL_KEYS}
        pre = {k: v for k, v in values.get("preprocess", {}).items() if k not in _MODEL_KEYS}
        milvus = {k: v for k, v in values.get("milvus", {}).items() if k != "dimension"}
        values.update(triton={**triton, "model_name": spec.name}, preprocess=pre, milvus=milvus)
        try:
            return Settings(**values)
        except ValidationError as exc:
            raise ConfigurationError(
                f"model {name!r}: {validation_problems(exc, whole='settings')}"
            ) from exc

    @model_validator(mode="after")
    def _revoke_fits_the_poll_interval(self) -> Self:
        # The revoke runs inside the consumer's poll: past max.poll.interval.ms the member is
        # thrown out of the group, and the bounded revoke would be for nothing.
        if self.worker.revoke_timeout_s * 1000 >= self.kafka.max_poll_interval_ms:
            raise ValueError(
                f"worker.revoke_timeout_s ({self.worker.revoke_timeout_s:g}) must be below "
                f"kafka.max_poll_interval_ms ({self.kafka.max_poll_interval_ms} ms)"
            )
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Only what the caller passes: the environment is read by load_settings alone.
        return (init_settings,)


# The keys a model's spec decides, in the triton and preprocess sections.
_MODEL_KEYS = frozenset(
    {
        "model_name",
        "input_format",
        "input_name",
        "output_name",
        "max_batch_size",
        "model_tag",
        "image_size",
        "resize_short_side",
        "mean",
        "std",
        "output",
    }
)


def _filled(section: _S, values: dict[str, Any]) -> _S:
    """A copy of ``section`` with the keys of ``values`` it was not given set to them."""
    copy = section.model_copy()
    for key, value in values.items():
        if key not in section.model_fields_set:
            _fill(copy, key, value)
    return copy


def _preprocess_values(spec: ModelSpec, pre: PreprocessSettings) -> dict[str, Any]:
    values: dict[str, Any] = {
        "output": spec.input_format,
        "image_size": spec.image_size,
        "resize_short_side": spec.resize_short_side,
    }
    if not ({"mean", "std"} & pre.model_fields_set):
        values.update(mean=spec.input_mean, std=spec.input_std)
    return values


def _addressed(spec: ModelSpec, triton: TritonSettings) -> ModelSpec:
    """``spec`` with the tensor names the settings send, when they give others."""
    names = {key: getattr(triton, key) for key in ("input_name", "output_name")}
    if all(getattr(spec, key) == value for key, value in names.items()):
        return spec
    return spec.model_copy(update=names)


def _unregistered_spec(
    triton: TritonSettings, pre: PreprocessSettings, milvus: MilvusSettings
) -> ModelSpec:
    """The spec a model the registry does not have gets from the settings' keys."""
    try:
        return ModelSpec(
            name=triton.model_name,
            family="unregistered",
            input_name=triton.input_name,
            input_format=triton.input_format,
            image_size=pre.image_size,
            resize_short_side=pre.resize_short_side,
            input_mean=pre.mean,
            input_std=pre.std,
            output_name=triton.output_name,
            output_dim=milvus.dimension,
            model_version_tag=triton.model_tag,
            max_batch_size=triton.max_batch_size,
            preferred_batch_sizes=tuple(
                b for b in DEFAULT_MODEL_SPEC.preferred_batch_sizes if b <= triton.max_batch_size
            ),
        )
    except ValidationError as exc:
        raise ValueError(
            f"triton.model_name {triton.model_name!r} is not in the registry, and the settings "
            f"do not describe a usable model: {validation_problems(exc, whole='model')}"
        ) from exc


def _check_preprocessing(pre: PreprocessSettings, spec: ModelSpec) -> None:
    """A preprocessing whose given keys cannot feed the model is an error naming both."""
    given, fmt = pre.model_fields_set, spec.input_format
    leave = "leave triton.model_name unset for the default model's float32 variant"
    if pre.class_ and fmt != "float32_nchw":
        raise ValueError(
            f"triton model {spec.name!r} takes {fmt!r} but preprocess.class {pre.class_!r} "
            f"outputs 'float32_nchw': choose a model taking it (the default one's is "
            f"{DEFAULT_MODEL_SPEC.name!r}) or {leave}"
        )
    if input_is_pixels(fmt) and {"mean", "std"} & given and not pre.normalises_like(spec):
        raise ValueError(
            f"a preprocess.mean/std other than the model's own normalisation (model "
            f"{spec.name!r} takes {fmt!r} pixels and normalises them itself with mean "
            f"{spec.input_mean}, std {spec.input_std}): drop preprocess.mean/std, or choose a "
            f"model taking float32 input, or {leave}"
        )
    if "output" in given and pre.output != fmt:
        raise ValueError(
            f"triton model {spec.name!r} takes {fmt!r} but preprocess.output is "
            f"{pre.output!r}: drop preprocess.output (it follows the model), or {leave}"
        )
    if spec.family == "unregistered":
        return  # the keys describe the model: nothing to contradict
    for key in ("image_size", "resize_short_side"):
        if key in given and getattr(pre, key) != getattr(spec, key):
            if key == "resize_short_side" and pre.class_:
                continue  # a custom class resizes as it likes
            raise ValueError(
                f"preprocess.{key} {getattr(pre, key)} does not fit model {spec.name!r}, whose "
                f"spec says {getattr(spec, key)}: drop preprocess.{key} (it follows the model)"
            )


def _check_dimension(milvus: MilvusSettings, spec: ModelSpec) -> None:
    if "dimension" in milvus.model_fields_set and milvus.dimension != spec.output_dim:
        raise ValueError(
            f"milvus.dimension {milvus.dimension} does not fit model {spec.name!r}, whose "
            f"vectors have {spec.output_dim}: drop milvus.dimension (it follows the model)"
        )


def read_yaml_mapping(path: Path | str, what: str) -> dict[str, Any]:
    """The mapping a YAML file holds (empty for an empty file).

    Raises:
        ConfigurationError: the file cannot be read or parsed, or holds something else than a
            mapping; the message names ``what`` and the path.
    """
    try:
        loaded = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigurationError(f"cannot read {what} {path}: {exc}") from exc
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigurationError(f"{what} {path} must hold a mapping")
    return loaded or {}


def load_settings(path: Path | str | None = None) -> Settings:
    """Read settings from an optional YAML file, then the environment (which wins).

    Raises:
        ConfigurationError: the file is missing, is not a YAML mapping, or a value is invalid.
    """
    values = read_yaml_mapping(path, "settings file") if path is not None else {}
    try:
        environment = EnvSettingsSource(Settings)()
        settings = Settings(**merged_sections(values, environment))
    except ValidationError as exc:
        raise ConfigurationError(
            f"invalid settings: {validation_problems(exc, whole='settings')}"
        ) from exc
    except ValueError as exc:
        raise ConfigurationError(f"invalid settings: {exc}") from exc
    return settings


def merged_sections(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """``override`` on top of ``base``, section by section: a mapping in both is merged key by
    key (so an environment variable replaces one key, not its section), anything else in
    ``override`` replaces the value. Neither argument is modified."""
    merged = dict(base)
    for key, value in override.items():
        current = merged.get(key)
        if isinstance(current, dict) and isinstance(value, dict):
            merged[key] = merged_sections(current, value)
        else:
            merged[key] = value
    return merged
