"""Which collection an event's rows go into, for this worker's model (``trident-reembed``).

An event names a collection ``C`` (or none: the default). Its rows go into:

1. on a **rebuild worker** (``worker.rebuild``): the rebuild's ``target`` when ``C`` is one of
   its ``sources``; any other event is skipped (``not_rebuilt``): the serving workers write it;
2. otherwise, when ``C`` is an **alias**: the member of ``C``'s family (the collection it points
   to and the versions ``<C>_v<N>``) bound to this worker's model, the one the alias points to
   first, else the newest version. With none, the event is skipped (``other_model``) and a
   warning names the model that serves ``C`` (once a minute per collection): after a switch the
   old model's workers keep the old version current (a rollback loses nothing); after
   ``finish`` they have nothing to write;
3. otherwise ``C`` itself (a collection bound to another model is dead-lettered
   ``collection_model_mismatch`` by the pipeline, as before).

Skipped events are committed and counted (``trident_events_skipped_total``), never
dead-lettered. Family lookups are cached ``worker.routing_cache_s``, never longer: an alias moves.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from engine.records import CollectionInfo
from engine.settings import RebuildTarget
from engine.store import version_number

logger = logging.getLogger(__name__)

SKIP_NOT_REBUILT = "not_rebuilt"
SKIP_OTHER_MODEL = "other_model"
# At most one warning per collection in this long.
WARN_EVERY_S = 60.0


class Catalog(Protocol):
    """What routing reads of the store (``engine.store.VectorStore``)."""

    def resolve_alias(self, name: str) -> str: ...
    def list_collections(self) -> list[str]: ...
    def describe_collection(self, name: str) -> CollectionInfo: ...


@dataclass(frozen=True)
class Route:
    """Where an event goes: ``collection``, or nowhere (``skip`` says why)."""

    collection: str | None
    skip: str = ""


class CollectionRouter:
    """Routes events by the rules of the module docstring; thread-safe.

    ``model_tag``: this worker's model tag. Lookups that fail (Milvus down, an unknown
    collection) raise as the store raised, and are not cached.
    """

    def __init__(
        self,
        catalog: Catalog,
        *,
        model_tag: str,
        rebuild: RebuildTarget | None = None,
        cache_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._catalog = catalog
        self._model_tag = model_tag
        self._rebuild = rebuild
        self._cache_s = cache_s
        self._clock = clock
        self._lock = threading.Lock()
        self._routes: dict[str, tuple[Route, float]] = {}
        self._warned: dict[str, float] = {}

    def route(self, collection: str) -> Route:
        """Where the rows of an event naming ``collection`` go.

        Raises:
            UnknownCollectionError, CollectionConflictError: as the store's lookups.
            StoreUnavailableError: Milvus is unreachable.
        """
        if self._rebuild is not None:
            if collection in self._rebuild.sources:
                return Route(self._rebuild.target)
            return Route(None, SKIP_NOT_REBUILT)
        now = self._clock()
        with self._lock:
            cached = self._routes.get(collection)
        if cached is not None and cached[1] > now:
            return cached[0]
        route = self._look_up(collection)
        with self._lock:
            self._routes[collection] = (route, now + self._cache_s)
        return route

    def _look_up(self, collection: str) -> Route:
        target = self._catalog.resolve_alias(collection)
        if target == collection:
            return Route(collection)  # a collection: rule 3
        versions = [
            name
            for name in self._catalog.list_collections()
            if name != target and version_number(collection, name) is not None
        ]
        versions.sort(key=lambda name: -(version_number(collection, name) or 0))
        members = [target, *versions]
        tags = {name: self._catalog.describe_collection(name).model_tag for name in members}
        ours = [name for name in members if tags[name] == self._model_tag]
        if not ours:
            ours = [name for name in members if not tags[name]]  # made before tags: today's
        if ours:
            return Route(ours[0])
        self._warn(collection, target, tags[target])
        return Route(None, SKIP_OTHER_MODEL)

    def _warn(self, collection: str, target: str, tag: str) -> None:
        now = self._clock()
        with self._lock:
            if now - self._warned.get(collection, -WARN_EVERY_S) < WARN_EVERY_S:
                return
            self._warned[collection] = now
        logger.warning(
            "collection %s (now %s) is served by model tag %r, and no version of it is bound to "
            "this worker's (%r): its events are skipped here; run workers of that model",
            collection,
            target,
            tag,
            self._model_tag,
        )
