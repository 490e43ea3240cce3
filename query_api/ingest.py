"""Ingestion through the API: insert requests become ingest events on the Kafka topic, deletes
become tombstones on it.

The API never embeds or writes vectors for an insert, nor removes rows for a delete: it publishes
one record per input or id (keyed by the id, so a delete is ordered with the id's upserts),
waits for the brokers' acknowledgement and hands back where each record went; the workers do
the rest, exactly as for any other producer. Free of HTTP, like
:class:`query_api.service.SearchService`.

An insert is all-or-nothing: every input is checked first (a valid reference, passing the
workers' fetch fence: :func:`engine.fetch.check_reference`), and if any is refused the request
fails listing each refused input by index and reason, and nothing is published.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from pydantic import ValidationError

from engine.errors import (
    BrokerUnavailableError,
    ImageReferenceError,
    InvalidEventError,
    InvalidQueryError,
    Reason,
    RetriableError,
    TridentError,
)
from engine.fetch import check_reference
from engine.kafka import broker_reachable
from engine.settings import FetchSettings, KafkaSettings
from engine.store import VectorStore
from producer.publisher import Delivery, DeliveryReport, EventPublisher, event_for_reference
from schemas import ContractError, DeleteEvent, IngestEvent, reference_from_string
from schemas.api import DeletePublished, InsertAccepted, InsertRequest, Published, ServiceState
from schemas.events import now_micros

logger = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 3.0
# Refused inputs named one by one in an error's detail; the rest are counted.
LISTED_REFUSALS = 20
# What the client can do about a reference the fence refused.
_FENCE_HINTS: dict[str, str] = {
    Reason.PATH_NOT_ALLOWED: "give a path under the API's fetch.allowed_roots, or an http(s) URL",
    Reason.FORBIDDEN_ADDRESS: "give a URL of a public host (fetch.allowed_hosts trusts a host)",
}


class IngestGateway:
    """Publishes insert requests as ingest events and deletes as tombstones; reports whether
    Kafka answers.

    ``fetch``: the fence every input must pass before anything is published (default: the
    safe defaults, under which no path is allowed). ``dimension``: the model's vector size; an
    insert into a collection of another size is refused (None: not checked).
    """

    def __init__(
        self,
        settings: KafkaSettings,
        store: VectorStore,
        *,
        acknowledge_timeout_s: float = 30.0,
        fetch: FetchSettings | None = None,
        dimension: int | None = None,
    ) -> None:
        self._settings = settings
        self._store = store
        self._timeout_s = acknowledge_timeout_s
        self._fetch = fetch if fetch is not None else FetchSettings()
        self._dimension = dimension
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
        """Check every input, publish one event per input and wait until the brokers
        acknowledged them all; say where each went.

        Safe to call from several threads at once: each call waits for, and is failed by, the
        deliveries of its own events only.

        Raises:
            UnknownCollectionError: the collection does not exist (it is never created here).
            InvalidQueryError: (``wrong_dimension``) the collection holds vectors of another
                size than the model's.
            ImageReferenceError: inputs that are not a path or http(s) URL, or whose id or
                metadata is not valid in an event (``invalid_reference``), or that the fetch
                fence refuses (``path_not_allowed``, ``forbidden_address``,
                ``unsupported_scheme``, ``invalid_url``): the reason is the first refused
                input's, the message lists each; nothing is sent.
            InvalidEventError: an event is over one of the contract's limits (nothing is sent).
            EventTooLargeError: Kafka refused an event as too large (the others may be written).
            PermanentError, ConfigurationError: Kafka refused an event for another reason (its
                ``reason`` says which; the others may be written).
            BrokerUnavailableError: Kafka did not acknowledge every event in time.
            StoreUnavailableError: Milvus could not be asked about the collection.
        """
        collection = request.collection_name or self._store.default_collection
        self._check_collection(collection)
        events: list[IngestEvent] = []
        refused: list[ImageReferenceError] = []
        for index in range(len(request.inputs)):
            try:
                events.append(self._checked_event(request, index, collection))
            except ImageReferenceError as exc:
                refused.append(exc)
        if refused:
            raise _all_refused(refused, len(request.inputs))
        deliveries = self._publish(events)
        logger.info("published %d events for collection %s", len(events), collection)
        return InsertAccepted(
            ids=[event.id for event in events],
            collection=collection,
            items=[_published(e, d) for e, d in zip(events, deliveries, strict=True)],
        )

    def delete(
        self, ids: Sequence[str], collection: str | None = None, *, dry_run: bool = False
    ) -> list[DeletePublished]:
        """Publish one delete (a tombstone, ``schemas.deletes``) per id, all of one version
        (now), and wait until the brokers acknowledged them all; say where each went. An id
        that is not stored is no error: its delete is published all the same (the id may be
        on its way), and keeps any older upsert of it out. ``dry_run``: check the collection
        and the ids, publish nothing (and answer no deliveries).

        Raises:
            UnknownCollectionError: the collection does not exist.
            InvalidEventError: an id is not valid in an event (empty, a control character,
                over 256 UTF-8 bytes); nothing is sent.
            PermanentError, ConfigurationError, BrokerUnavailableError, StoreUnavailableError:
                as :meth:`insert`.
        """
        name = collection or self._store.default_collection
        self._store.describe_collection(self._store.resolve_alias(name))
        version = now_micros()  # one version for the whole call
        deletes: list[DeleteEvent] = []
        for item_id in ids:
            try:
                event = DeleteEvent(id=item_id, collection=name, version=version)
                self._settings.event_limits.check_id(event.id)
            except (ValidationError, ContractError) as exc:
                raise InvalidEventError(
                    f"id {item_id[:80]!r} cannot be deleted, it is not a valid id: "
                    f"{_problems(exc)}; ids are 1 to 256 UTF-8 bytes without control characters",
                    reason=Reason.SCHEMA_INVALID,
                ) from exc
            deletes.append(event)
        if dry_run:
            return []
        deliveries = self._publish(deletes)
        logger.info("published %d deletes for collection %s", len(deletes), name)
        return [
            DeletePublished(
                id=event.id,
                collection=name,
                version=event.version,
                partition=delivery.partition or 0,
                offset=delivery.offset or 0,
            )
            for event, delivery in zip(deletes, deliveries, strict=True)
        ]

    def _publish(self, records: Sequence[IngestEvent | DeleteEvent]) -> list[Delivery]:
        try:
            deliveries = self._publisher.publish_each(records, timeout_s=self._timeout_s)
        except ContractError as exc:  # over a limit of the contract: nothing was sent
            raise InvalidEventError(str(exc), reason=exc.reason) from exc
        report = DeliveryReport()
        for delivery in deliveries:
            report.add(delivery)
        if report.failed:
            raise _refusal(report, len(records))
        return deliveries

    def _check_collection(self, collection: str) -> None:
        # An alias is checked by the collection it points at; the events name it as given.
        info = self._store.describe_collection(self._store.resolve_alias(collection))
        if self._dimension is not None and info.dimension != self._dimension:
            raise InvalidQueryError(
                f"collection {collection!r} holds {info.dimension}-d vectors but the model makes "
                f"{self._dimension}-d ones: insert into a collection of dimension "
                f"{self._dimension} (POST /collections/create without dim makes one)",
                reason=Reason.WRONG_DIMENSION,
            )

    def _checked_event(self, request: InsertRequest, index: int, collection: str) -> IngestEvent:
        reference = request.inputs[index]
        try:
            event = event_for_reference(
                reference,
                collection=collection,
                metadata=request.metadata[index] if request.metadata else None,
                event_id=request.ids[index] if request.ids else None,
            )
        except ValidationError as exc:
            raise ImageReferenceError(
                f"inputs[{index}] ({reference[:200]!r}): {_problems(exc)}",
                reason=Reason.INVALID_REFERENCE,
            ) from exc
        try:
            # The reference as sent: the event's path is resolved already (an ftp:// URL
            # written as a path would read as a path outside the roots).
            check_reference(reference_from_string(reference), self._fetch)
        except ImageReferenceError as exc:
            hint = _FENCE_HINTS.get(exc.reason)
            raise ImageReferenceError(
                f"inputs[{index}]: {exc}" + (f": {hint}" if hint else ""), reason=exc.reason
            ) from exc
        return event


def _problems(exc: ValidationError | ContractError) -> str:
    if isinstance(exc, ValidationError):
        return "; ".join(str(error["msg"]) for error in exc.errors())
    return str(exc)


def _published(event: IngestEvent, delivery: Delivery) -> Published:
    # A delivery without an error always has its partition and offset.
    return Published(id=event.id, partition=delivery.partition or 0, offset=delivery.offset or 0)


def _all_refused(refused: list[ImageReferenceError], inputs: int) -> ImageReferenceError:
    """One error for every refused input of a call: the first one's reason, each one listed."""
    listed = "; ".join(str(exc) for exc in refused[:LISTED_REFUSALS])
    more = len(refused) - LISTED_REFUSALS
    return ImageReferenceError(
        f"{len(refused)} of {inputs} inputs refused, so nothing was published (fix or leave "
        f"them out, then send the request again): {listed}"
        + (f"; and {more} more" if more > 0 else ""),
        reason=refused[0].reason,
    )


def _refusal(report: DeliveryReport, published: int) -> TridentError:
    """The error for a call some of whose events Kafka did not take: unavailable if any failed
    for a transient reason (the call may be retried as a whole), else the first refusal's."""
    errors = [delivery.error for delivery in report.failures if delivery.error is not None]
    first = report.failures[0]
    summary = f"Kafka did not take {report.failed} of {published} events; {first.key!r}: "
    if not errors or any(isinstance(error, RetriableError) for error in errors):
        return BrokerUnavailableError(summary + str(first.error))
    return type(errors[0])(summary + str(errors[0]), reason=errors[0].reason)
