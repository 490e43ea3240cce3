"""Ingestion through the API: insert requests become ingest events on the Kafka topic.

The API never embeds or writes vectors for an insert: it publishes one event per input, waits
for the brokers' acknowledgement and hands back the ids; the workers do the rest, exactly as for
any other producer. Free of HTTP, like :class:`query_api.service.SearchService`.
"""

from __future__ import annotations

import logging

from pydantic import ValidationError

from engine.errors import BrokerUnavailableError, ImageReferenceError, InvalidEventError
from engine.kafka import broker_reachable
from engine.settings import KafkaSettings
from engine.store import VectorStore
from producer.publisher import EventPublisher, event_for_reference
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

        Raises:
            UnknownCollectionError: the collection does not exist (it is never created here).
            ImageReferenceError: (``invalid_reference``) an input is not a path or http(s) URL,
                or an id or metadata entry is not valid in an event.
            InvalidEventError: an event is over one of the contract's limits (nothing of it is
                sent; events before it may be).
            BrokerUnavailableError: Kafka did not acknowledge every event in time.
            StoreUnavailableError: Milvus could not be asked whether the collection exists.
        """
        collection = request.collection_name or self._store.default_collection
        self._store.describe_collection(collection)
        events = [self._event(request, index, collection) for index in range(len(request.inputs))]
        before = self._publisher.flush(self._timeout_s).failed
        for event in events:
            try:
                self._publisher.publish(event)
            except ContractError as exc:  # over a limit of the contract: nothing was sent
                raise InvalidEventError(f"{event.id!r}: {exc}", reason=exc.reason) from exc
        failed = self._publisher.flush(self._timeout_s).failed - before
        if failed:
            # The reasons are logged by the publisher's delivery reports.
            raise BrokerUnavailableError(
                f"Kafka did not acknowledge {failed} of {len(events)} events"
            )
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
