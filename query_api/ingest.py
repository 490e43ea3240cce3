"""Ingestion through the API: insert requests become ingest events on the Kafka topic.

The API never embeds or writes vectors for an insert: it publishes one event per input, waits
for the brokers' acknowledgement and hands back the ids; the workers do the rest, exactly as for
any other producer. Free of HTTP, like :class:`query_api.service.SearchService`.
"""

from __future__ import annotations

import logging

from pydantic import ValidationError

from engine.errors import (
    BrokerUnavailableError,
    ImageReferenceError,
    InvalidEventError,
    RetriableError,
    TridentError,
)
from engine.kafka import broker_reachable
from engine.settings import KafkaSettings
from engine.store import VectorStore
from producer.publisher import DeliveryReport, EventPublisher, event_for_reference
from schemas import ContractError, IngestEvent
from schemas.api import InsertAccepted, InsertRequest, ServiceState

logger = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 3.0


class IngestGateway:
    """Publishes insert requests as ingest events; reports whether Kafka answers."""

    def __init__(
        self,
        settings: KafkaSettings,
        store: VectorStore,
        *,
        acknowledge_timeout_s: float = 30.0,
    ) -> None:
        self._settings = settings
        self._store = store
        self._timeout_s = acknowledge_timeout_s
        self._publisher = EventPublisher(settings)

    def close(self) -> None:
        self._publisher.close(self._timeout_s)

    def kafka_state(self) -> ServiceState:
        if broker_reachable(self._settings, timeout_s=PROBE_TIMEOUT_S):
            return ServiceState(state="up")
        return ServiceState(
            state="down", detail=f"Kafka {self._settings.bootstrap_servers} did not answer"
        )

    def insert(self, request: InsertRequest) -> InsertAccepted:
        """Publish one event per input and wait until the brokers acknowledged them all.

        Safe to call from several threads at once: each call waits for, and is failed by, the
        deliveries of its own events only.

        Raises:
            UnknownCollectionError: the collection does not exist (it is never created here).
            ImageReferenceError: (``invalid_reference``) an input is not a path or http(s) URL,
                or an id or metadata entry is not valid in an event.
            InvalidEventError: an event is over one of the contract's limits (nothing is sent).
            EventTooLargeError: Kafka refused an event as too large (the others may be written).
            PermanentError, ConfigurationError: Kafka refused an event for another reason (its
                ``reason`` says which; the others may be written).
            BrokerUnavailableError: Kafka did not acknowledge every event in time.
            StoreUnavailableError: Milvus could not be asked whether the collection exists.
        """
        collection = request.collection_name or self._store.default_collection
        self._store.describe_collection(collection)
        events = [self._event(request, index, collection) for index in range(len(request.inputs))]
        try:
            report = self._publisher.publish_and_wait(events, timeout_s=self._timeout_s)
        except ContractError as exc:  # over a limit of the contract: nothing was sent
            raise InvalidEventError(str(exc), reason=exc.reason) from exc
        if report.failed:
            raise _refusal(report, len(events))
        logger.info("published %d events for collection %s", len(events), collection)
        return InsertAccepted(ids=[event.id for event in events], collection=collection)

    @staticmethod
    def _event(request: InsertRequest, index: int, collection: str) -> IngestEvent:
        reference = request.inputs[index]
        try:
            return event_for_reference(
                reference,
                collection=collection,
                metadata=request.metadata[index] if request.metadata else None,
                event_id=request.ids[index] if request.ids else None,
            )
        except ValidationError as exc:
            problems = "; ".join(str(error["msg"]) for error in exc.errors())
            raise ImageReferenceError(
                f"inputs[{index}] ({reference[:200]!r}): {problems}", reason="invalid_reference"
            ) from exc


def _refusal(report: DeliveryReport, published: int) -> TridentError:
    """The error for a call some of whose events Kafka did not take: unavailable if any failed
    for a transient reason (the call may be retried as a whole), else the first refusal's."""
    errors = [delivery.error for delivery in report.failures if delivery.error is not None]
    first = report.failures[0]
    summary = f"Kafka did not take {report.failed} of {published} events; {first.key!r}: "
    if not errors or any(isinstance(error, RetriableError) for error in errors):
        return BrokerUnavailableError(summary + str(first.error))
    return type(errors[0])(summary + str(errors[0]), reason=errors[0].reason)
