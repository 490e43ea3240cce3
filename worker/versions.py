"""The stale-version guard: the newest version of each id, without a Strong read per batch.

A record older than what is stored, or than what this worker is about to store, is never
written. Upserts and deletes are records alike: what is stored of an id is its row or its
tombstone (a delete's version, kept after the row is gone: ``VectorStore.delete``), whichever is
newer, so a delete older than the stored row is skipped, and an upsert older than a delete never
brings the id back, whoever consumes it and whenever (a restart, a rebalance, a replay).

Records of one id share a partition (the producer keys them by id), so while this worker
owns a partition it is the only writer of that partition's ids. It therefore knows most of what
it needs without asking Milvus:

- **its own writes**: a bounded LRU of ``(collection, id) -> StoredVersion`` it wrote (rows, and
  deletes as ``deleted=True``) in the current assignment of the id's partition
  (``worker.version_cache_size`` entries);
- **versions in flight**: ids that passed the guard in a batch not written yet (claims). With
  batches in flight, batch k+1 is screened before batch k is written: an older version in k+1
  must lose to k's newer one, and k's claim says it will.

Ids neither remembered nor in flight are read from Milvus (:meth:`VectorStore.stored_versions`):

- **Strong** until this worker has written to that collection since the id's partition was
  assigned: the previous owner may have written its ids just before the rebalance;
- **Session** afterwards: pymilvus sends, as the read's guarantee timestamp, the timestamp of
  this process's last write to the collection (a delete writes its tombstone, then to the
  collection, and the tombstones are read as of the same write). That write began after the
  assignment, so after every write of the previous owner (which finished before it let go of
  the partition: see ``BatchProcessor.fence``), and the read sees them all, as it sees this
  worker's own writes that the cache no longer holds.

What an id is known by counts only while its partition's assignment lasts (``worker.ownership``):
a partition revoked and given back starts with nothing remembered. Equal versions are not stale
(the later record wins, as within one batch). Thread-safe: batches are screened on one thread
while another records what was written.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from engine.records import Consistency, StoredVersion
from worker.ownership import Owner, Ownership

# Reads the stored versions of ids of one collection at the consistency asked for.
VersionRead = Callable[[list[str], Consistency], dict[str, StoredVersion]]


@dataclass(frozen=True, slots=True)
class Candidate:
    """An event that wants to be written: its id, version and where it was consumed."""

    id: str
    version: int
    owner: Owner


@dataclass(frozen=True, slots=True)
class Known:
    """What the guard knows of an id when a candidate is screened.

    ``newest`` is the newest version stored (row or tombstone), written by this worker or in
    flight (None: none). ``stored`` is the newest stored fact for the unchanged / reuse-vector
    check (a tombstone, ``deleted=True``, offers neither); None when nothing is stored or
    deleted, or when another batch in flight will write the id before this one.
    """

    newest: int | None
    stored: StoredVersion | None

    def stale(self, version: int) -> bool:
        return self.newest is not None and self.newest > version


_Key = tuple[str, str]


class VersionGuard:
    """Screens candidates against own writes, versions in flight and the store (module doc)."""

    def __init__(self, ownership: Ownership, *, cache_size: int) -> None:
        self._ownership = ownership
        self._cache_size = cache_size
        self._lock = threading.Lock()
        self._written: OrderedDict[_Key, tuple[StoredVersion, Owner]] = OrderedDict()
        self._claims: dict[_Key, dict[int, tuple[int, Owner]]] = {}
        # The keys each batch claimed, so that releasing a batch touches only its own claims.
        self._claimed_by: dict[int, list[_Key]] = {}
        # Per collection: when the latest successful write of this worker began (clock time).
        self._write_began: dict[str, float] = {}

    def screen(
        self, batch: int, collection: str, candidates: Sequence[Candidate], read: VersionRead
    ) -> dict[str, Known]:
        """What is known of each candidate's id; claim the ids of those that are not stale.

        ``read`` is called (without the guard's lock) for the ids not remembered, unless there
        are none. Ids are unique among ``candidates`` (the batch keeps the newest of each).

        Raises:
            whatever ``read`` raises (nothing is claimed then).
        """
        with self._lock:
            remembered = {
                c.id: found for c in candidates if (found := self._remembered(collection, c))
            }
            to_read = [c for c in candidates if c.id not in remembered]
            strong = any(self._needs_strong(collection, c.owner) for c in to_read)
        stored = read([c.id for c in to_read], "Strong" if strong else "Session") if to_read else {}
        with self._lock:
            known: dict[str, Known] = {}
            for candidate in candidates:
                facts = [
                    f
                    for f in (
                        remembered.get(candidate.id),
                        self._remembered(collection, candidate),
                        stored.get(candidate.id),
                    )
                    if f is not None
                ]
                newest_stored = max(facts, key=lambda f: f.event_version, default=None)
                in_flight = self._in_flight(collection, candidate, batch)
                versions = [f.event_version for f in facts] + in_flight
                known[candidate.id] = Known(
                    newest=max(versions, default=None),
                    stored=None if in_flight else newest_stored,
                )
                if not known[candidate.id].stale(candidate.version):
                    key = (collection, candidate.id)
                    self._claims.setdefault(key, {})[batch] = (candidate.version, candidate.owner)
                    self._claimed_by.setdefault(batch, []).append(key)
            return known

    def wrote(
        self, collection: str, began: float, written: Sequence[tuple[str, StoredVersion, Owner]]
    ) -> None:
        """Remember a successful write of ``(id, version facts, owner)`` rows that began at
        ``began`` (clock time, taken before the request was sent)."""
        with self._lock:
            self._write_began[collection] = max(began, self._write_began.get(collection, began))
            for record_id, version, owner in written:
                key = (collection, record_id)
                self._written[key] = (version, owner)
                self._written.move_to_end(key)
            while len(self._written) > self._cache_size:
                self._written.popitem(last=False)

    def release(self, batch: int) -> None:
        """The batch left the pipeline (written, failed or abandoned): drop its claims."""
        with self._lock:
            for key in self._claimed_by.pop(batch, ()):
                claims = self._claims.get(key)
                if claims is None:  # listed twice: the batch screened the id again
                    continue
                claims.pop(batch, None)
                if not claims:
                    del self._claims[key]

    def remembered_count(self) -> int:
        with self._lock:
            return len(self._written)

    # Under the lock -------------------------------------------------------------------------

    def _remembered(self, collection: str, candidate: Candidate) -> StoredVersion | None:
        found = self._written.get((collection, candidate.id))
        if found is None:
            return None
        version, owner = found
        # Written in the current assignment of the id's partition; anything else is hearsay.
        # The id's partition is a number: partition p of the ingest topic and of the retry topic
        # go to one member together (engine.kafka.consumer_config), so a retried record sees
        # what this worker wrote from the other topic (its read may predate that write).
        same = owner.partition[1] == candidate.owner.partition[1]
        if not same or not self._ownership.owns(owner):
            return None
        self._written.move_to_end((collection, candidate.id))
        return version

    def _in_flight(self, collection: str, candidate: Candidate, batch: int) -> list[int]:
        claims = self._claims.get((collection, candidate.id), {})
        return [
            version
            for other, (version, owner) in claims.items()
            if other != batch and self._ownership.owns(owner)
        ]

    def _needs_strong(self, collection: str, owner: Owner) -> bool:
        assigned_at = self._ownership.assigned_at(owner)
        began = self._write_began.get(collection)
        return assigned_at is None or began is None or began <= assigned_at
