"""Kafka client configuration and topic administration shared by every role.

The settings section is turned into librdkafka configuration here, in one place: every client
of the project (the producer, the worker's consumer, its dead-letter and re-queue producer) gets
its delivery guarantees from these two functions, and its log lines go through a
:class:`ClientLog`. :func:`require_broker` is the commands' first step: one clear line when the
cluster does not answer, instead of librdkafka's reconnect attempts.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient
from confluent_kafka.admin._config import ConfigResource  # re-exported implicitly only
from confluent_kafka.admin._resource import ResourceType
from confluent_kafka.cimpl import NewTopic

from engine.errors import BrokerUnavailableError, ConfigurationError
from engine.settings import KafkaSettings

logger = logging.getLogger(__name__)
# librdkafka's own log lines (connection refused during a broker restart, ...) go through Python
# logging instead of straight to stderr, so entry points decide where they end up.
_client_logger = logging.getLogger("librdkafka")
# What differs between two reports of one failure: durations, counts (and the reporting thread,
# which a log line names and the error event does not).
_VARYING = re.compile(r"\d+(?:\.\d+)?\s*(?:ms|s)\b|\d+ identical")
_THREAD = re.compile(r"^\[thrd:[^\]]*\]: ")
# A connection failure's broker prefix and attempt detail: "host:1/bootstrap: ... (after 0ms in
# state CONNECT)"; the message they go in names the brokers already.
_ATTEMPT_DETAIL = re.compile(r"^\S+/(?:bootstrap|\d+): |\s*\(after \d+ms in state \w+[^)]*\)")
# Kinds a ClientLog remembers before it forgets those whose window is over.
_MAX_KINDS = 1024


class ClientLog:
    """Where one client's librdkafka log lines and error events go: Python logging, each kind
    once per ``window_s``.

    While a broker is down librdkafka reports the same failure at every reconnect attempt,
    several a second: the first report of a kind is logged, the repeats within ``window_s`` are
    only counted, and the first one after the window is logged with that count. librdkafka's
    error lines are logged as warnings: it retries them itself, and whoever waits on the client
    (a delivery, a commit, a deadline) reports the failure that matters. Debug lines (librdkafka's
    ``debug`` setting) pass unchanged. Pass it as ``logger`` and its :meth:`error` as
    ``error_cb``; thread-safe.
    """

    def __init__(
        self,
        target: logging.Logger = _client_logger,
        *,
        window_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._target = target
        self._window_s = window_s
        self._clock = clock
        self._lock = threading.Lock()
        # kind -> (when last logged, repeats since)
        self._seen: dict[str, tuple[float, int]] = {}

    def log(self, level: int, message: str, *args: object) -> None:
        """What librdkafka calls (through confluent-kafka) for each log line."""
        text = message % args if args else message
        if level < logging.INFO:
            self._target.log(level, "%s", text)
            return
        # confluent-kafka passes (facility, client name, line): the line alone says what happened.
        self._emit(min(level, logging.WARNING), text, str(args[-1]) if args else text)

    def error(self, error: KafkaError) -> None:
        """librdkafka's error events (``error_cb``): fatal ones at error level, once each."""
        level = logging.ERROR if error.fatal() else logging.WARNING
        # Same kind as the log line librdkafka writes for most errors: one of the two is logged.
        self._emit(level, f"{error.name()}: {error.str()}", error.str())

    def _emit(self, level: int, text: str, what: str) -> None:
        kind = _VARYING.sub("#", _THREAD.sub("", what))
        now = self._clock()
        with self._lock:
            logged_at, repeats = self._seen.get(kind, (None, 0))
            if logged_at is not None and now - logged_at < self._window_s:
                self._seen[kind] = (logged_at, repeats + 1)
                return
            if len(self._seen) >= _MAX_KINDS:  # lines naming offsets and the like never repeat
                self._seen = {
                    k: seen for k, seen in self._seen.items() if now - seen[0] < self._window_s
                }
            self._seen[kind] = (now, 0)
        if logged_at is not None and repeats:
            self._target.log(
                level, "%s (and %d more like it in %.0fs)", text, repeats, now - logged_at
            )
        else:
            self._target.log(level, "%s", text)


def _client_settings(settings: KafkaSettings) -> dict[str, Any]:
    """What every client gets: the brokers, logging through a :class:`ClientLog`, the extras."""
    log = ClientLog()
    config: dict[str, Any] = {
        "bootstrap.servers": settings.bootstrap_servers,
        "logger": log,
        "error_cb": log.error,
        # A broker closing an idle connection is routine, not worth a line.
        "log.connection.close": False,
    }
    config.update(settings.extra)
    return config


def producer_config(settings: KafkaSettings, **overrides: Any) -> dict[str, Any]:
    """A producer that never loses or duplicates an acknowledged write on broker failover."""
    config: dict[str, Any] = {
        "enable.idempotence": True,
        "acks": "all",
        "linger.ms": 5,
        "compression.type": "lz4",
        # Keep retrying through a broker restart; delivery reports tell us if it gave up.
        "message.timeout.ms": 120_000,
    }
    config.update(_client_settings(settings))
    config.update(overrides)
    return config


def consumer_config(settings: KafkaSettings, **overrides: Any) -> dict[str, Any]:
    """A consumer-group member whose offsets move only when the application commits them."""
    config: dict[str, Any] = {
        "group.id": settings.group_id,
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "auto.offset.reset": "earliest",
        # Records of aborted transactions are never seen (librdkafka's default, made explicit).
        "isolation.level": "read_committed",
        "session.timeout.ms": settings.session_timeout_ms,
        "max.poll.interval.ms": settings.max_poll_interval_ms,
        # Range assignment: partition p of the ingest topic and partition p of the retry topic
        # (as many partitions, every member subscribed to both) go to the same member, so one
        # worker alone writes an id, from its records on either topic, and the version guard
        # (worker.versions) needs no cross-worker ordering. The price: every rebalance is eager
        # (all partitions revoked and assigned again), where cooperative-sticky moved only some
        # but may split partition p of the two topics between two members.
        "partition.assignment.strategy": "range",
    }
    config.update(_client_settings(settings))
    config.update(overrides)
    return config


def ensure_topics(settings: KafkaSettings, *, timeout_s: float = 30.0) -> None:
    """Create the ingest, retry and dead-letter topics that do not exist; check those that do.

    New topics get :meth:`KafkaSettings.topic_configs` (the ingest topic compacted, the others
    time-retained), the broker's default replication, ``topic_partitions`` partitions, except
    the retry topic: as many as the ingest topic has (a retry must be consumed by the member
    that owns its id's ingest partition: see ``consumer_config``). An existing topic is never
    altered: an ingest topic that is not compacted is logged as a warning naming the command
    that compacts it (changing an existing topic's cleanup policy is an operator's decision,
    docs/OPERATIONS.md, "The ingest topic").

    Raises:
        BrokerUnavailableError: the cluster did not answer in time (or did not show a topic
            within ``timeout_s`` of its creation), or refused a creation.
        ConfigurationError: the retry topic and the ingest topic have different partition
            counts (the message says how to fix it).
    """
    admin = AdminClient(_client_settings(settings))
    topics = settings.topics()
    configs = settings.topic_configs()
    partitions = _partition_counts(admin, settings, timeout_s)
    if topics.ingest not in partitions:
        _create(admin, {topics.ingest: settings.topic_partitions}, configs, timeout_s)
    # The ingest topic's real width (someone else may have made it meanwhile), once the
    # cluster's metadata shows it, decides the retry topic's.
    partitions = _partition_counts(admin, settings, timeout_s, waiting_for=[topics.ingest])
    missing = {
        topic: partitions[topics.ingest] if topic == topics.retry else settings.topic_partitions
        for topic in (topics.retry, topics.dead_letter)
        if topic not in partitions
    }
    if missing:
        _create(admin, missing, configs, timeout_s)
    partitions = _partition_counts(admin, settings, timeout_s, waiting_for=topics.all)
    _check_co_partitioned(settings, partitions)
    _warn_unless_compacted(admin, settings, timeout_s)


def _create(
    admin: AdminClient,
    partitions: dict[str, int],
    configs: dict[str, dict[str, str]],
    timeout_s: float,
) -> None:
    """Create each topic with its partition count and configs; one that exists already (made
    by another worker meanwhile) is no error."""
    new = [
        NewTopic(topic, num_partitions=count, replication_factor=-1, config=configs[topic])
        for topic, count in partitions.items()
    ]
    for topic, future in admin.create_topics(new, request_timeout=timeout_s).items():
        try:
            future.result(timeout=timeout_s)
        except KafkaException as exc:
            if "TOPIC_ALREADY_EXISTS" not in str(exc):
                raise BrokerUnavailableError(f"creating topic {topic}: {exc}") from exc
        else:
            logger.info("created topic %s (%s)", topic, _config_text(configs[topic]))


def _partition_counts(
    admin: AdminClient,
    settings: KafkaSettings,
    timeout_s: float,
    *,
    waiting_for: Sequence[str] = (),
) -> dict[str, int]:
    """The partition count of each of the settings' topics that exists, once the metadata shows
    every topic of ``waiting_for`` (just created: the brokers learn of it within moments).

    The whole cluster's metadata, never one topic's: asking for a missing topic by name may make
    a broker with ``auto.create.topics.enable`` create it, with its defaults.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            metadata = admin.list_topics(timeout=max(0.1, deadline - time.monotonic()))
        except KafkaException as exc:
            raise BrokerUnavailableError(f"Kafka {settings.bootstrap_servers}: {exc}") from exc
        counts = {
            name: len(found.partitions)
            for name in settings.topics().all
            if (found := metadata.topics.get(name)) is not None
            and found.error is None
            and found.partitions
        }
        missing = [name for name in waiting_for if name not in counts]
        if not missing:
            return counts
        if time.monotonic() > deadline:
            raise BrokerUnavailableError(
                f"Kafka {settings.bootstrap_servers}: topics {missing} not in the cluster's "
                f"metadata {timeout_s:g}s after they were created"
            )
        time.sleep(0.2)


def _check_co_partitioned(settings: KafkaSettings, partitions: dict[str, int]) -> None:
    topics = settings.topics()
    ingest, retry = partitions.get(topics.ingest), partitions.get(topics.retry)
    if ingest is None or retry is None or ingest == retry:
        return
    smaller, larger = (topics.retry, ingest) if retry < ingest else (topics.ingest, retry)
    raise ConfigurationError(
        f"the retry topic {topics.retry} has {retry} partitions and the ingest topic "
        f"{topics.ingest} has {ingest}: they must have as many (a retried record must reach the "
        f"worker that owns its id's partition). Add partitions: kafka-topics.sh "
        f"--bootstrap-server {settings.bootstrap_servers} --alter --topic {smaller} "
        f'--partitions {larger} (docs/OPERATIONS.md, "Scaling knobs")'
    )


def _warn_unless_compacted(admin: AdminClient, settings: KafkaSettings, timeout_s: float) -> None:
    topic = settings.topics().ingest
    resource = ConfigResource(ResourceType.TOPIC, topic)
    try:
        entries = admin.describe_configs([resource], request_timeout=timeout_s)[resource].result(
            timeout=timeout_s
        )
    except KafkaException as exc:  # e.g. not authorised to describe configs: not ours to fail
        logger.info("could not check the configuration of topic %s: %s", topic, exc)
        return
    policy = entries["cleanup.policy"].value if "cleanup.policy" in entries else None
    if policy == "compact":
        return
    wanted = settings.topic_configs()[topic]
    logger.warning(
        "ingest topic %s has cleanup.policy=%s, not compact: reading it from the beginning does "
        "not give the newest event of every live id, which a rebuild needs. It was not changed; "
        'to compact it (docs/OPERATIONS.md, "The ingest topic"): kafka-configs.sh '
        "--bootstrap-server %s --alter --entity-type topics --entity-name %s --add-config %s",
        topic,
        policy,
        settings.bootstrap_servers,
        topic,
        _config_text(wanted),
    )


def _config_text(config: dict[str, str]) -> str:
    """Topic configs as kafka-configs.sh's --add-config takes them."""
    return ",".join(f"{key}={value}" for key, value in config.items())


def broker_problem(settings: KafkaSettings, *, timeout_s: float = 5.0) -> str | None:
    """Why the cluster did not answer a metadata request within ``timeout_s`` (librdkafka's first
    reason, e.g. ``Connect to ipv4#127.0.0.1:1 failed: Connection refused``), or None when it
    answered; never raises. The probe's own log lines are kept out of the log."""
    causes: list[str] = []
    config = _client_settings(settings)
    config["logger"] = _Discard()
    config["error_cb"] = lambda error: causes.append(error.str())
    admin = AdminClient(config)
    try:
        admin.list_topics(timeout=timeout_s)
    except KafkaException as exc:
        admin.poll(0)  # serves the error events that say why
        problem = causes[0] if causes else exc.args[0].str()
        logger.debug("Kafka %s did not answer: %s", settings.bootstrap_servers, problem)
        return _ATTEMPT_DETAIL.sub("", problem)
    return None


def broker_reachable(settings: KafkaSettings, *, timeout_s: float = 5.0) -> bool:
    """Whether the cluster answers a metadata request within ``timeout_s``; never raises."""
    return broker_problem(settings, timeout_s=timeout_s) is None


def require_broker(settings: KafkaSettings, *, timeout_s: float) -> None:
    """Return once the cluster answered a metadata request; fail in one line otherwise.

    Raises:
        BrokerUnavailableError: no answer within ``timeout_s``; the message names the bootstrap
            servers, librdkafka's reason and what to do.
    """
    problem = broker_problem(settings, timeout_s=timeout_s)
    if problem is not None:
        raise BrokerUnavailableError(
            f"Kafka at {settings.bootstrap_servers} did not answer within {timeout_s:g}s "
            f"({problem}): start it, or point kafka.bootstrap_servers "
            "(TRIDENT_KAFKA__BOOTSTRAP_SERVERS) at a running broker"
        )


class _Discard:
    """A librdkafka logger that drops every line (the probe reports its one reason itself)."""

    def log(self, level: int, message: str, *args: object) -> None:
        pass


def delete_consumer_group(settings: KafkaSettings, group: str, *, timeout_s: float) -> None:
    """Delete a consumer group and its committed offsets (no error when there is none). A group
    that still has members (one killed, not yet timed out of its session) is tried again until
    ``timeout_s`` has passed.

    Raises:
        BrokerUnavailableError: the cluster did not answer in time, refused, or the group still
            had members after ``timeout_s``.
    """
    admin = AdminClient(_client_settings(settings))
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            for future in admin.delete_consumer_groups([group], request_timeout=timeout_s).values():
                future.result(timeout=timeout_s)
            return
        except KafkaException as exc:
            error = exc.args[0] if exc.args else None
            code = error.code() if isinstance(error, KafkaError) else None
            if code == KafkaError.GROUP_ID_NOT_FOUND:
                return
            if code != KafkaError.NON_EMPTY_GROUP or time.monotonic() >= deadline:
                raise BrokerUnavailableError(f"deleting consumer group {group}: {exc}") from exc
        time.sleep(0.5)
