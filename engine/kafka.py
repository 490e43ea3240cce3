"""Kafka client configuration and topic administration shared by every role.

The settings section is turned into librdkafka configuration here, in one place: every client
of the project (the producer, the worker's consumer, its dead-letter and re-queue producer) gets
its delivery guarantees from these two functions.
"""

from __future__ import annotations

import logging
from typing import Any

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic

from engine.errors import BrokerUnavailableError
from engine.settings import KafkaSettings

logger = logging.getLogger(__name__)
# librdkafka's own log lines (connection refused during a broker restart, ...) go through Python
# logging instead of straight to stderr, so entry points decide where they end up.
_client_logger = logging.getLogger("librdkafka")


def producer_config(settings: KafkaSettings, **overrides: Any) -> dict[str, Any]:
    """A producer that never loses or duplicates an acknowledged write on broker failover."""
    config: dict[str, Any] = {
        "bootstrap.servers": settings.bootstrap_servers,
        "enable.idempotence": True,
        "acks": "all",
        "linger.ms": 5,
        "compression.type": "lz4",
        # Keep retrying through a broker restart; delivery reports tell us if it gave up.
        "message.timeout.ms": 120_000,
        "logger": _client_logger,
    }
    config.update(settings.extra)
    config.update(overrides)
    return config


def consumer_config(settings: KafkaSettings, **overrides: Any) -> dict[str, Any]:
    """A consumer-group member whose offsets move only when the application commits them."""
    config: dict[str, Any] = {
        "bootstrap.servers": settings.bootstrap_servers,
        "group.id": settings.group_id,
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "auto.offset.reset": "earliest",
        # Records of aborted transactions are never seen (librdkafka's default, made explicit).
        "isolation.level": "read_committed",
        "session.timeout.ms": settings.session_timeout_ms,
        "max.poll.interval.ms": settings.max_poll_interval_ms,
        # Cooperative rebalancing: adding a worker moves only the partitions it takes over.
        "partition.assignment.strategy": "cooperative-sticky",
        "logger": _client_logger,
    }
    config.update(settings.extra)
    config.update(overrides)
    return config


def ensure_topics(settings: KafkaSettings, *, timeout_s: float = 30.0) -> None:
    """Create the ingest and dead-letter topics if they do not exist.

    Raises:
        BrokerUnavailableError: the cluster did not answer in time.
    """
    admin = AdminClient({"bootstrap.servers": settings.bootstrap_servers, **settings.extra})
    try:
        existing = set(admin.list_topics(timeout=timeout_s).topics)
    except KafkaException as exc:
        raise BrokerUnavailableError(f"Kafka {settings.bootstrap_servers}: {exc}") from exc
    wanted = [
        NewTopic(topic, num_partitions=settings.topic_partitions, replication_factor=-1)
        for topic in (settings.topic, settings.dead_letter_topic)
        if topic not in existing
    ]
    if not wanted:
        return
    for topic, future in admin.create_topics(wanted, request_timeout=timeout_s).items():
        try:
            future.result(timeout=timeout_s)
            logger.info("created topic %s", topic)
        except KafkaException as exc:
            if "TOPIC_ALREADY_EXISTS" not in str(exc):
                raise BrokerUnavailableError(f"creating topic {topic}: {exc}") from exc


def broker_reachable(settings: KafkaSettings, *, timeout_s: float = 5.0) -> bool:
    """Whether the cluster answers a metadata request within ``timeout_s``; never raises."""
    config: dict[str, Any] = {"bootstrap.servers": settings.bootstrap_servers, **settings.extra}
    config["logger"] = _client_logger
    admin = AdminClient(config)
    try:
        admin.list_topics(timeout=timeout_s)
    except KafkaException as exc:
        logger.debug("Kafka %s did not answer: %s", settings.bootstrap_servers, exc)
        return False
    return True
