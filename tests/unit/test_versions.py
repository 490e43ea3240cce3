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
