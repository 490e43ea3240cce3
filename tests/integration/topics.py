"""Reading topics back in tests on the real stack (by assignment: no group, no commits)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import yaml
from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

from engine.kafka import consumer_config
from engine.settings import Settings


def settings_file(settings: Settings, folder: Path) -> Path:
    """``settings`` as a YAML file, for the commands' ``--config``."""
    path = folder / "trident.yaml"
    path.write_text(yaml.safe_dump(settings.model_dump(mode="json")))
    return path


# What a broker answers for a few seconds after a topic was created, while its partitions'
# leaders settle: the same question asked again a moment later gets the offsets.
_SETTLING = frozenset(
    {
        KafkaError.NOT_LEADER_FOR_PARTITION,
        KafkaError.LEADER_NOT_AVAILABLE,
        KafkaError.UNKNOWN_TOPIC_OR_PART,
    }
)


def end_offsets(settings: Settings, topic: str, *, settle_s: float = 20.0) -> dict[int, int]:
    """The end offset of each partition of ``topic``; waits (up to ``settle_s``) for a topic
    created a moment ago to have a leader for every partition."""
    probe = Consumer(consumer_config(settings.kafka, **{"group.id": "test-offsets-probe"}))
    deadline = time.monotonic() + settle_s
    try:
        while True:
            try:
                partitions = probe.list_topics(topic, timeout=10).topics[topic].partitions
                return {
                    p: probe.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
                    for p in partitions
                }
            except KafkaException as exc:
                if exc.args[0].code() not in _SETTLING or time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
    finally:
        probe.close()


def records_after(settings: Settings, topic: str, starts: dict[int, int]) -> list[Any]:
    """The records written to ``topic`` after the offsets ``starts`` (read by assignment)."""
    ends = end_offsets(settings, topic)
    wanted = {p: (starts.get(p, 0), end) for p, end in ends.items() if end > starts.get(p, 0)}
    consumer = Consumer(consumer_config(settings.kafka, **{"group.id": "test-topic-reader"}))
    try:
        consumer.assign([TopicPartition(topic, p, start) for p, (start, _) in wanted.items()])
        found: list[Any] = []
        deadline = time.monotonic() + 30
        while sum(end - start for start, end in wanted.values()) > len(found):
            assert time.monotonic() < deadline, f"could not read {topic} to its end"
            message = consumer.poll(0.5)
            if message is not None and message.error() is None:
                found.append(message)
            elif message is not None:
                assert message.error().code() == KafkaError._PARTITION_EOF, message.error()
        return found
    finally:
        consumer.close()
