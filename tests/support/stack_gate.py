"""One test stack for several pytest processes (pytest-xdist workers) of one run.

Every lock is an ``flock`` on a file in the stack's root: it binds the processes of this run
(and of any other run on the same root), and the kernel drops it when a process dies.
"""

from __future__ import annotations

import fcntl
from pathlib import Path

from devstack._locking import exclusive_file_lock, lock_within

__all__ = ["StackGate", "exclusive_file_lock"]


class StackGate:
    """Shared access to the stack for ordinary tests, exclusive for those that stop or kill
    one of its services (no other test may meet that outage by chance).

    Writers go first: a process waiting for exclusive access holds the turnstile, so no new
    reader enters meanwhile and the readers already in finish their one test. A lock is held
    for one test (setup to teardown, module fixtures included), so a waiting process waits
    at most about one test of the others.
    """

    def __init__(self, folder: Path, *, timeout_s: float) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self._turnstile = (folder / ".test-gate-turnstile").open("a")
        self._gate = (folder / ".test-gate").open("a")
        self._timeout_s = timeout_s

    def enter(self, *, exclusive: bool) -> None:
        """Wait for this process's turn.

        Raises:
            TimeoutError: the other processes' tests held the stack for over the timeout.
        """
        what = "the other test processes to leave the stack" if exclusive else "an outage test"
        lock_within(self._turnstile, fcntl.LOCK_EX, timeout_s=self._timeout_s, what=what)
        try:
            mode = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
            lock_within(self._gate, mode, timeout_s=self._timeout_s, what=what)
        finally:
            fcntl.flock(self._turnstile, fcntl.LOCK_UN)

    def leave(self) -> None:
        fcntl.flock(self._gate, fcntl.LOCK_UN)

    def close(self) -> None:
        self._turnstile.close()
        self._gate.close()
