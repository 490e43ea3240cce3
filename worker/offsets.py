"""Which offsets are safe to commit.

A partition's committed position may only move past records that are *terminal*: stored in
Milvus, skipped as already stored, dead-lettered or re-queued with the dead-letter topic's or the
retry topic's acknowledgement. Records finish out of order, and a partition's offsets are not
contiguous: transaction markers, aborted transactions (read_committed) and compaction leave gaps.
So the tracker works over the offsets actually consumed: the commit position is the last
finished offset + 1 such that every record consumed before it is terminal too. When nothing is
open, the consumer's own position may lie further on, past control records (a transaction's
commit or abort marker ends every transactional partition): :meth:`OffsetTracker.caught_up`
moves the commit there, so an idle partition's lag reaches 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field

TopicPartitionKey = tuple[str, int]


@dataclass
class _PartitionState:
    # Everything consumed below ``commit_at`` is terminal; committing it never skips a record.
    commit_at: int
    # Consumed offsets at or above ``commit_at``, ascending (consumption order), -> finished?
    open: dict[int, bool] = field(default_factory=dict)

    def advance(self) -> None:
        while self.open:
            first = next(iter(self.open))
            if not self.open[first]:
                return
            del self.open[first]
            self.commit_at = first + 1


class OffsetTracker:
    """Tracks consumed and finished offsets per partition; yields safe commit positions."""

    def __init__(self) -> None:
        self._partitions: dict[TopicPartitionKey, _PartitionState] = {}
        self._committed: dict[TopicPartitionKey, int] = {}

    def track(self, topic: str, partition: int, offset: int) -> None:
        """Register a consumed record (unfinished until :meth:`finish`).

        A record at or below one already tracked is a redelivery after a rewind: the consumer
        reads on from there, so it and everything tracked after it are open again.
        """
        key = (topic, partition)
        state = self._partitions.get(key)
        if state is None:
            self._partitions[key] = _PartitionState(commit_at=offset, open={offset: False})
            return
        state.commit_at = min(state.commit_at, offset)
        state.open = {o: done for o, done in state.open.items() if o < offset}
        state.open[offset] = False

    def finish(self, topic: str, partition: int, offset: int) -> None:
        """Mark a consumed record terminal (a record never tracked, or forgotten, is ignored)."""
        state = self._partitions.get((topic, partition))
        if state is None or offset not in state.open:
            return
        state.open[offset] = True
        state.advance()

    def caught_up(self, topic: str, partition: int, consumer_position: int) -> None:
        """The consumer will read on from ``consumer_position``: with no record open, nothing
        below it is left to do (what lies between is control records or compacted away)."""
        key = (topic, partition)
        state = self._partitions.get(key)
        if state is None:
            self._partitions[key] = _PartitionState(commit_at=consumer_position)
        elif not state.open and consumer_position > state.commit_at:
            state.commit_at = consumer_position

    def position(self, topic: str, partition: int) -> int | None:
        """Where a rewind must seek to: the first unfinished consumed record, else the commit
        position (None for a partition never consumed)."""
        state = self._partitions.get((topic, partition))
        if state is None:
            return None
        return next(iter(state.open), state.commit_at)

    def committable(self) -> dict[TopicPartitionKey, int]:
        """Commit positions that moved since the last :meth:`mark_committed`."""
        return {
            key: state.commit_at
            for key, state in self._partitions.items()
            if self._committed.get(key) != state.commit_at
        }

    def mark_committed(self, positions: dict[TopicPartitionKey, int]) -> None:
        self._committed.update(positions)

    def forget(self, partitions: list[TopicPartitionKey]) -> None:
        """Drop the state of partitions this worker no longer owns (revoked or lost)."""
        for key in partitions:
            self._partitions.pop(key, None)
            self._committed.pop(key, None)
