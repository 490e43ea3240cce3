"""Which partitions this worker owns now, each assignment told apart from the earlier ones.

Every assignment of a partition opens a new *epoch*. A record is stamped with its partition's
epoch when it is consumed (an :class:`Owner`); whatever is derived from it later (a stored
version remembered, a version in flight, an outcome to commit) counts only while
:meth:`Ownership.owns` still says yes. So work done for a partition that was revoked, lost, or
revoked and given back meanwhile, is never mistaken for work of the current assignment, and no
list of derived state has to be swept when a partition moves.

The consumer loop changes the assignment (inside the rebalance callbacks); the pipeline's stage
threads only read it: every method is thread-safe.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

PartitionKey = tuple[str, int]


@dataclass(frozen=True, slots=True)
class Owner:
    """The partition a record came from and the epoch of the assignment it was consumed in."""

    partition: PartitionKey
    epoch: int


class Ownership:
    """The partitions assigned to this worker, with the epoch and time of each assignment."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._epochs: dict[PartitionKey, tuple[int, float]] = {}
        self._next_epoch = 1

    def assign(self, partitions: Iterable[PartitionKey]) -> None:
        """Partitions assigned now: each gets a new epoch (even if it was owned before)."""
        with self._lock:
            now = self._clock()
            for key in partitions:
                self._epochs[key] = (self._next_epoch, now)
                self._next_epoch += 1

    def release(self, partitions: Iterable[PartitionKey]) -> None:
        """Partitions revoked or lost: nothing stamped with their epochs counts any more."""
        with self._lock:
            for key in partitions:
                self._epochs.pop(key, None)

    def current(self, partition: PartitionKey) -> Owner | None:
        """The stamp for a record consumed now (None: the partition is not owned)."""
        with self._lock:
            found = self._epochs.get(partition)
        return None if found is None else Owner(partition, found[0])

    def owns(self, owner: Owner) -> bool:
        """The partition is still owned in the same assignment as when ``owner`` was stamped."""
        with self._lock:
            found = self._epochs.get(owner.partition)
        return found is not None and found[0] == owner.epoch

    def assigned_at(self, owner: Owner) -> float | None:
        """When the assignment of ``owner`` began (clock time), or None if it is over."""
        with self._lock:
            found = self._epochs.get(owner.partition)
        return found[1] if found is not None and found[0] == owner.epoch else None
