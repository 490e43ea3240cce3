"""Commit positions: only ever up to the first unfinished record."""

from __future__ import annotations

from worker.offsets import OffsetTracker


def test_commit_stops_at_the_first_unfinished_offset() -> None:
    tracker = OffsetTracker()
    for offset in range(10, 15):
        tracker.track("t", 0, offset)
    assert tracker.committable() == {("t", 0): 10}
    tracker.finish("t", 0, 11)
    tracker.finish("t", 0, 12)
    assert tracker.position("t", 0) == 10  # 10 is unfinished: nothing may move
    tracker.finish("t", 0, 10)
    assert tracker.committable() == {("t", 0): 13}
    tracker.mark_committed({("t", 0): 13})
    assert tracker.committable() == {}
    tracker.finish("t", 0, 14)
    assert tracker.position("t", 0) == 13


def test_partitions_are_independent_and_can_be_forgotten() -> None:
    tracker = OffsetTracker()
    tracker.track("t", 0, 0)
    tracker.track("t", 1, 5)
    tracker.finish("t", 1, 5)
    assert tracker.committable() == {("t", 0): 0, ("t", 1): 6}
    tracker.forget([("t", 1)])
    assert tracker.position("t", 1) is None
    tracker.finish("t", 1, 6)  # a late finish of a forgotten partition is ignored
    assert ("t", 1) not in tracker.committable()


def test_redelivery_after_a_rewind_reopens_the_record() -> None:
    tracker = OffsetTracker()
    tracker.track("t", 0, 3)
    tracker.finish("t", 0, 3)
    tracker.track("t", 0, 4)
    assert tracker.position("t", 0) == 4
    tracker.track("t", 0, 2)  # seeked back further than the tracked start
    assert tracker.position("t", 0) == 2
