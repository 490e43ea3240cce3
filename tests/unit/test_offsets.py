"""Commit positions: last finished + 1 over the offsets consumed, never past an open record."""

from __future__ import annotations

from worker.offsets import OffsetTracker


def _tracked(*offsets: int) -> OffsetTracker:
    tracker = OffsetTracker()
    for offset in offsets:
        tracker.track("t", 0, offset)
    return tracker


def test_commit_stops_at_the_first_unfinished_offset() -> None:
    tracker = _tracked(10, 11, 12, 13, 14)
    assert tracker.committable() == {("t", 0): 10}
    tracker.finish("t", 0, 11)
    tracker.finish("t", 0, 12)
    assert tracker.position("t", 0) == 10  # 10 is unfinished: nothing may move
    assert tracker.committable() == {("t", 0): 10}
    tracker.finish("t", 0, 10)
    assert tracker.committable() == {("t", 0): 13}
    tracker.mark_committed({("t", 0): 13})
    assert tracker.committable() == {}
    tracker.finish("t", 0, 14)
    assert tracker.position("t", 0) == 13


def test_gaps_between_consumed_offsets_do_not_block_the_commit() -> None:
    # 12 is a transaction marker (or a compacted record): never consumed, never finished.
    tracker = _tracked(10, 11, 13, 14)
    for offset in (10, 11, 13, 14):
        tracker.finish("t", 0, offset)
    assert tracker.committable() == {("t", 0): 15}
    assert tracker.position("t", 0) == 15


def test_a_gap_before_an_open_record_commits_up_to_the_last_finished() -> None:
    tracker = _tracked(10, 11, 20, 21)
    tracker.finish("t", 0, 10)
    tracker.finish("t", 0, 11)
    tracker.finish("t", 0, 21)
    assert tracker.committable() == {("t", 0): 12}  # last finished + 1; 20 is still open
    assert tracker.position("t", 0) == 20  # a rewind re-reads the open record, not the gap
    tracker.finish("t", 0, 20)
    assert tracker.committable() == {("t", 0): 22}


def test_out_of_order_finishing_over_gaps() -> None:
    tracker = _tracked(3, 7, 8, 30)
    tracker.finish("t", 0, 30)
    tracker.finish("t", 0, 8)
    assert tracker.committable() == {("t", 0): 3}
    tracker.finish("t", 0, 3)
    assert tracker.committable() == {("t", 0): 4}
    tracker.finish("t", 0, 7)
    assert tracker.committable() == {("t", 0): 31}


def test_partitions_are_independent_and_can_be_forgotten() -> None:
    tracker = OffsetTracker()
    tracker.track("t", 0, 0)
    tracker.track("t", 1, 5)
    tracker.finish("t", 1, 5)
    assert tracker.committable() == {("t", 0): 0, ("t", 1): 6}
    tracker.forget([("t", 1)])  # revoked or lost
    assert tracker.position("t", 1) is None
    tracker.finish("t", 1, 6)  # a late finish of a forgotten partition is ignored
    assert ("t", 1) not in tracker.committable()
    tracker.track("t", 1, 9)  # assigned again later: starts afresh where consumption resumes
    assert tracker.committable()[("t", 1)] == 9


def test_finishing_an_offset_never_consumed_changes_nothing() -> None:
    tracker = _tracked(10, 12)
    tracker.finish("t", 0, 11)
    assert tracker.committable() == {("t", 0): 10}


def test_redelivery_after_a_rewind_reopens_the_record() -> None:
    tracker = _tracked(3)
    tracker.finish("t", 0, 3)
    tracker.track("t", 0, 4)
    assert tracker.position("t", 0) == 4
    tracker.track("t", 0, 2)  # seeked back further than the tracked start
    assert tracker.position("t", 0) == 2
    assert tracker.committable() == {("t", 0): 2}  # never past the reopened record


def test_redelivery_reopens_records_finished_after_it() -> None:
    tracker = _tracked(5, 6, 7)
    tracker.finish("t", 0, 7)
    tracker.track("t", 0, 6)  # rewound to 6: 6 and 7 are read (and finished) again
    tracker.finish("t", 0, 5)
    tracker.finish("t", 0, 6)
    assert tracker.committable() == {("t", 0): 7}  # 7 is open again until it is re-finished
    tracker.track("t", 0, 7)
    tracker.finish("t", 0, 7)
    assert tracker.committable() == {("t", 0): 8}


def test_a_caught_up_consumer_moves_the_commit_past_trailing_control_records() -> None:
    tracker = _tracked(4, 5)
    tracker.caught_up("t", 0, 7)  # 6 is a commit marker; 4 and 5 are still open
    assert tracker.committable() == {("t", 0): 4}
    tracker.finish("t", 0, 4)
    tracker.finish("t", 0, 5)
    tracker.caught_up("t", 0, 7)
    assert tracker.committable() == {("t", 0): 7}  # the end of the partition: lag 0
    tracker.caught_up("t", 0, 3)  # a stale position never moves the commit back
    assert tracker.committable() == {("t", 0): 7}


def test_a_partition_with_only_control_records_is_committed_at_the_position() -> None:
    tracker = OffsetTracker()
    tracker.caught_up("t", 2, 12)  # an aborted transaction and its marker: nothing consumed
    assert tracker.committable() == {("t", 2): 12}
    tracker.track("t", 2, 12)
    assert tracker.committable() == {("t", 2): 12}
