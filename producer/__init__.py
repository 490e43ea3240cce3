"""Publish image-ingest events to Kafka: a library API and the ``trident-produce`` CLI."""

from producer.publisher import (
    DeliveryReport,
    EventPublisher,
    event_for_reference,
    events_from_folder,
)

__all__ = ["DeliveryReport", "EventPublisher", "event_for_reference", "events_from_folder"]
