"""Kafka's errors for one message, translated: every one carries a ``Reason`` member (its
librdkafka family), never librdkafka's own error name."""

from __future__ import annotations

import pytest
from confluent_kafka import KafkaError

from engine.errors import (
    BrokerUnavailableError,
    ConfigurationError,
    EventTooLargeError,
    PermanentError,
    Reason,
    TridentError,
)
from producer.publisher import delivery_error

# Every error code librdkafka (and the broker protocol, through it) defines.
CODES = sorted(
    {
        getattr(KafkaError, name)
        for name in dir(KafkaError)
        if name.lstrip("_").isupper() and isinstance(getattr(KafkaError, name), int)
    }
)


def test_every_kafka_error_becomes_a_reason_member() -> None:
    assert len(CODES) > 100
    outside = {
        KafkaError(code).name(): reason
        for code in CODES
        if (reason := delivery_error(KafkaError(code), 100).reason) not in set(Reason)
    }
    assert outside == {}


@pytest.mark.parametrize(
    ("code", "cls", "reason"),
    [
        (KafkaError.MSG_SIZE_TOO_LARGE, EventTooLargeError, Reason.MESSAGE_TOO_LARGE),
        (KafkaError.RECORD_LIST_TOO_LARGE, EventTooLargeError, Reason.MESSAGE_TOO_LARGE),
        (KafkaError.UNKNOWN_TOPIC_OR_PART, ConfigurationError, Reason.KAFKA_UNKNOWN_TOPIC),
        (KafkaError._UNKNOWN_TOPIC, ConfigurationError, Reason.KAFKA_UNKNOWN_TOPIC),
        (KafkaError.TOPIC_AUTHORIZATION_FAILED, ConfigurationError, Reason.KAFKA_NOT_AUTHORIZED),
        (KafkaError.PRODUCER_FENCED, ConfigurationError, Reason.KAFKA_FATAL),
        (KafkaError.INVALID_RECORD, PermanentError, Reason.KAFKA_INVALID_RECORD),
        (KafkaError.INVALID_TIMESTAMP, PermanentError, Reason.KAFKA_INVALID_RECORD),
        (KafkaError._MSG_TIMED_OUT, BrokerUnavailableError, Reason.KAFKA_UNAVAILABLE),
        (KafkaError.NOT_ENOUGH_REPLICAS, BrokerUnavailableError, Reason.KAFKA_UNAVAILABLE),
        (KafkaError.BROKER_NOT_AVAILABLE, BrokerUnavailableError, Reason.KAFKA_UNAVAILABLE),
        (KafkaError._PURGE_QUEUE, BrokerUnavailableError, Reason.KAFKA_UNAVAILABLE),
        (KafkaError.UNSUPPORTED_VERSION, PermanentError, Reason.KAFKA_REFUSED),
    ],
)
def test_error_families(code: int, cls: type[TridentError], reason: Reason) -> None:
    error = delivery_error(KafkaError(code), 100, topic="ingest")
    assert type(error) is cls
    assert error.reason == reason


def test_a_fatal_error_of_any_code_needs_a_new_producer() -> None:
    error = delivery_error(KafkaError(KafkaError.INVALID_TXN_STATE, "fenced", fatal=True))
    assert (type(error), error.reason) == (ConfigurationError, Reason.KAFKA_FATAL)


def test_messages_say_what_to_do() -> None:
    unknown = delivery_error(KafkaError(KafkaError._UNKNOWN_TOPIC), topic="nope")
    assert "'nope'" in str(unknown) and "create it" in str(unknown)
    too_large = delivery_error(KafkaError(KafkaError.MSG_SIZE_TOO_LARGE), 2_000_000)
    assert "(2000000 bytes)" in str(too_large) and "path or URL reference" in str(too_large)
