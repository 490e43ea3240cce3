"""Which offsets are safe to commit.

A partition's committed position may only move past records whose effect is durable (upserted
into Milvus, skipped as already stored, or acknowledged by the dead-letter topic). Records can
finish out of order, so the safe position is the first offset that is *not* yet finished.
"""

from __future__ import annotations

from dataclasses import dataclass, field

TopicPartitionKey = tuple[str, int]


@dataclass
class _PartitionState:
    next_to_commit: int  # the first offset not known to be finished
    finished: set[int] = field(default_factory=set)


class OffsetTracker:
    """Tracks finished offsets per partition and yields the highest contiguous commit point."""

    def __init__(self) -> None:
        self._partitions: dict[TopicPartitionKey, _PartitionState] = {}
        self._committed: dict[TopicPartitionKey, int] = {}

    def track(self, topic: str, partition: int, offset: int) -> None:
        """Register a consumed record (so the partition's start is known)."""
        key = (topic, partition)
        state = self._partitions.get(key)
        if state is None:
            self._partitions[key] = _PartitionState(next_to_commit=offset)
        elif offset < state.next_to_commit:
            # Redelivered after a rewind: the record is unfinished again.
            state.next_to_commit = offset
            state.finished = {o for o in state.finished if o < offset}

    def finish(self, topic: str, partition: int, offset: int) -> None:
        """Mark a record's effect durable."""
        state = self._partitions.get((topic, partition))
        if state is None or offset < state.next_to_commit:
            return
        state.finished.add(offset)
        while state.next_to_commit in state.finished:
            state.finished.remove(state.next_to_commit)
            state.next_to_commit += 1

    def position(self, topic: str, partition: int) -> int | None:
        """The first unfinished offset of the partition (where a rewind must seek to)."""
        state = self._partitions.get((topic, partition))
        return None if state is None else state.next_to_commit

    def committable(self) -> dict[TopicPartitionKey, int]:
        """Commit positions that moved since the last :meth:`mark_committed`."""
        return {
            key: state.next_to_commit
            for key, state in self._partitions.items()
            if self._committed.get(key) != state.next_to_commit
        }

    def mark_committed(self, positions: dict[TopicPartitionKey, int]) -> None:
        self._committed.update(positions)

    def forget(self, partitions: list[TopicPartitionKey]) -> None:
        """Drop the state of partitions this worker no longer owns."""
        for key in partitions:
            self._partitions.pop(key, None)
            self._committed.pop(key, None)
