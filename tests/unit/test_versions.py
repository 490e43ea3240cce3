"""VersionGuard's claims directly: a batch's release drops its own claims and no other's."""

from __future__ import annotations

from engine.records import Consistency, StoredVersion
from worker.ownership import Ownership
from worker.versions import Candidate, VersionGuard

PARTITION = ("images", 0)


def nothing_stored(ids: list[str], consistency: Consistency) -> dict[str, StoredVersion]:
    return {}


def guard_and_owner() -> tuple[VersionGuard, Candidate]:
    ownership = Ownership()
    ownership.assign([PARTITION])
    owner = ownership.current(PARTITION)
    assert owner is not None
    return VersionGuard(ownership, cache_size=10), Candidate("a", 5, owner)


def test_releasing_a_batch_keeps_the_claims_of_the_others() -> None:
    guard, candidate = guard_and_owner()
    guard.screen(1, "c", [candidate], nothing_stored)
    guard.screen(2, "c", [Candidate("a", 6, candidate.owner)], nothing_stored)

    guard.release(2)
    # Batch 1's claim (version 5) still makes version 4 stale; batch 2's (6) is gone.
    known = guard.screen(3, "c", [Candidate("a", 4, candidate.owner)], nothing_stored)
    assert known["a"].newest == 5

    guard.release(1)
    guard.release(3)
    known = guard.screen(4, "c", [Candidate("a", 4, candidate.owner)], nothing_stored)
    assert known["a"].newest is None


def test_a_batch_screened_twice_is_released_once_and_an_unknown_batch_is_a_no_op() -> None:
    guard, candidate = guard_and_owner()
    guard.screen(1, "c", [candidate], nothing_stored)
    guard.screen(1, "c", [candidate], nothing_stored)
    guard.release(7)
    guard.release(1)
    known = guard.screen(2, "c", [Candidate("a", 1, candidate.owner)], nothing_stored)
    assert known["a"].newest is None


# Deletes: a tombstone is a stored version like a row's.


def test_a_tombstone_read_from_the_store_makes_older_records_stale_and_equal_ones_not() -> None:
    guard, candidate = guard_and_owner()

    def deleted_at_5(ids: list[str], consistency: Consistency) -> dict[str, StoredVersion]:
        return {i: StoredVersion.tombstone(5) for i in ids}

    owner = candidate.owner
    known = guard.screen(1, "c", [Candidate("a", 4, owner)], deleted_at_5)
    assert known["a"].stale(4) and known["a"].stored == StoredVersion.tombstone(5)
    known = guard.screen(2, "c", [Candidate("b", 5, owner)], deleted_at_5)
    assert not known["b"].stale(5)  # equal: the later record wins
    known = guard.screen(3, "c", [Candidate("c", 6, owner)], deleted_at_5)
    assert not known["c"].stale(6)


def test_a_delete_this_worker_wrote_is_remembered_without_a_read() -> None:
    guard, candidate = guard_and_owner()
    guard.wrote("c", 0.0, [("a", StoredVersion.tombstone(7), candidate.owner)])
    reads: list[list[str]] = []

    def read(ids: list[str], consistency: Consistency) -> dict[str, StoredVersion]:
        reads.append(ids)
        return {}

    known = guard.screen(1, "c", [Candidate("a", 6, candidate.owner)], read)
    assert known["a"].stale(6) and known["a"].stored is not None and known["a"].stored.deleted
    assert reads == []
