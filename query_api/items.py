"""One item: its stored record, its deletes and where it is (its status), independent of HTTP.

Deletes are published, never written: a tombstone per id on the ingest topic, through the
API's one producer (:meth:`IngestGateway.delete`), keyed by the id so that a worker applies it
in order with the id's upserts. A delete by filter reads the matching ids once (Strong
consistency) and publishes their deletes; an item stored after that read is not deleted.

Statuses come from :class:`producer.status.ItemStatusFinder`, with a
:class:`producer.status.DeadLetterIndex` that follows the dead-letter topic from the start of
the service (see there).
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime

from engine.errors import InvalidQueryError, Reason
from engine.settings import Settings
from engine.store import VectorStore
from producer.status import DeadLetterIndex, ItemStatusFinder
from query_api.filters import combined_filter
from query_api.ingest import IngestGateway
from schemas.api import (
    MAX_DELETE_ITEMS,
    DeleteItemsRequest,
    DeleteItemsResult,
    DeletePublished,
    ItemRecord,
    ItemStatus,
)

logger = logging.getLogger(__name__)


class ItemService:
    """The record, deletes and status of items; its methods may run in several threads."""

    def __init__(
        self,
        store: VectorStore,
        ingest: IngestGateway,
        finder: ItemStatusFinder,
        *,
        index: DeadLetterIndex | None = None,
    ) -> None:
        self._store = store
        self._ingest = ingest
        self._finder = finder
        self._index = index

    @classmethod
    def from_settings(
        cls, settings: Settings, store: VectorStore, ingest: IngestGateway
    ) -> ItemService:
        """The service on the API's store and producer, with a dead-letter index of its own
        (read from :meth:`start` on)."""
        index = DeadLetterIndex(settings.kafka, max_entries=settings.api.status_index_max_ids)
        finder = ItemStatusFinder(
            settings.kafka, store, index=index, deadline_s=settings.api.status_deadline_s
        )
        return cls(store, ingest, finder, index=index)

    def start(self) -> None:
        """Start following the dead-letter topic (statuses wait until it is read far enough)."""
        if self._index is not None:
            self._index.start()

    def close(self) -> None:
        self._finder.close()
        if self._index is not None:
            self._index.close()

    def record(self, collection: str, item_id: str) -> ItemRecord:
        """The stored record of ``item_id`` (at the collection's default consistency: a row
        stored in the last seconds may not be seen yet), in ``collection`` or in the one it
        points at as an alias (``stored_in``).

        Raises:
            UnknownCollectionError: no such collection or alias.
            InvalidQueryError: (``unknown_id``) no such item stored.
            StoreUnavailableError: Milvus is unavailable.
        """
        stored_in = self._store.resolve_alias(collection)
        found = self._store.get_record(item_id, stored_in)
        if found is None:
            raise InvalidQueryError(
                f"no item with id {item_id!r} is stored in collection {collection!r}: "
                f"GET /items/{collection}/<id>/status says whether it is pending, "
                "dead-lettered or deleted",
                reason=Reason.UNKNOWN_ID,
            )
        return ItemRecord(
            id=found.id,
            collection=collection,
            metadata=found.metadata,
            source=found.source,
            version=found.event_version,
            model_tag=found.model_version,
            content_sha256=found.content_sha256,
            stored_at=datetime.fromtimestamp(found.ingested_at_ms / 1000, UTC),
            stored_in=stored_in if stored_in != collection else None,
        )

    def delete(self, collection: str, item_id: str) -> DeletePublished:
        """Publish the delete of ``item_id`` (stored or not: see :meth:`IngestGateway.delete`).

        Raises:
            UnknownCollectionError, InvalidEventError (not a valid id), and the gateway's
            publishing errors.
        """
        return self._ingest.delete([item_id], collection)[0]

    def delete_many(self, request: DeleteItemsRequest) -> DeleteItemsResult:
        """Publish the deletes of the ids named, or of those a filter matches (at most
        ``max_items``); with ``dry_run``, say what would be deleted and publish nothing.

        Raises:
            UnknownCollectionError: no such collection.
            InvalidQueryError: (``invalid_filter``) a filter Milvus or the checks refuse;
                (``too_many_matches``) the filter matches more than ``max_items`` and this is
                no dry run (nothing is published).
            InvalidEventError: an id is not valid (nothing is published).
            StoreUnavailableError, and the gateway's publishing errors.
        """
        collection = request.collection_name or self._store.default_collection
        truncated = False
        if request.ids is not None:
            ids = list(dict.fromkeys(request.ids))  # the first of duplicates, in order
        else:
            expression = combined_filter(request.filter_expr, request.filter)
            # Read where the name points now; the deletes name it as given (as the producers do).
            stored_in = self._store.resolve_alias(collection)
            found = self._store.ids_matching(expression, stored_in, limit=request.max_items + 1)
            truncated = len(found) > request.max_items
            ids = sorted(found[: request.max_items])
            if truncated and not request.dry_run:
                raise InvalidQueryError(
                    f"the filter matches more than max_items ({request.max_items}) items in "
                    f"{collection!r}, so nothing was deleted: narrow the filter, or raise "
                    f"max_items (at most {MAX_DELETE_ITEMS}; a dry_run lists the first ones)",
                    reason=Reason.TOO_MANY_MATCHES,
                )
        published = self._ingest.delete(ids, collection, dry_run=request.dry_run)
        if not request.dry_run:
            logger.info("published %d deletes in %s", len(published), collection)
        return DeleteItemsResult(
            collection=collection,
            dry_run=request.dry_run,
            matched=len(ids),
            truncated=truncated,
            ids=ids,
            published=len(published),
            items=published,
        )

    def status(self, collection: str, item_id: str) -> ItemStatus:
        """Where ``item_id`` is (``producer.status``).

        Raises:
            UnknownCollectionError, BrokerUnavailableError, StoreUnavailableError.
        """
        return self._finder.status(item_id, collection)
