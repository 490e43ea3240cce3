"""Publish image-ingest events to Kafka and replay dead letters.

Library: :class:`EventPublisher` (synchronous) and :class:`AsyncEventPublisher` (asyncio), both
validating events against the contract's limits and reporting each :class:`Delivery`; event
builders for paths, URLs and folders; dead-letter reading and replay in
``producer.dead_letters``. Commands: ``trident-produce`` (``producer.cli``) and ``trident-dlq``
(``producer.dlq_cli``).
"""

from engine.errors import EventTooLargeError
from producer.publisher import (
    AsyncEventPublisher,
    Delivery,
    DeliveryReport,
    EventPublisher,
    event_for_reference,
    events_from_folder,
)

__all__ = [
    "AsyncEventPublisher",
    "Delivery",
    "DeliveryReport",
    "EventPublisher",
    "EventTooLargeError",
    "event_for_reference",
    "events_from_folder",
]
