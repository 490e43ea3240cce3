"""One test stack for several pytest processes (pytest-xdist workers) of one run.

Every lock is an ``flock`` on a file in the stack's root: it binds the processes of this run
(and of any other run on the same root), and the kernel drops it when a process dies.
"""

from __future__ import annotations

import fcntl
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

# How often a blocked process asks for a lock again: the waits are seconds to minutes long.
_POLL_S = 0.1


def _lock(handle: IO[str], mode: int, *, timeout_s: float, what: str) -> None:
    """Take ``mode`` (``fcntl.LOCK_SH`` or ``LOCK_EX``) on ``handle`` within ``timeout_s``.

    Raises:
        TimeoutError: still held by another process after ``timeout_s``; names ``what``.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            fcntl.flock(handle, mode | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"waited {timeout_s:.0f}s for {what}") from None
            time.sleep(_POLL_S)


@contextmanager
def exclusive_file_lock(path: Path, *, timeout_s: float, what: str) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if missing) for the ``with`` block.

    Raises:
        TimeoutError: another process held it for over ``timeout_s``.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        _lock(handle, fcntl.LOCK_EX, timeout_s=timeout_s, what=what)
        yield  # closing the file releases the lock


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
        _lock(self._turnstile, fcntl.LOCK_EX, timeout_s=self._timeout_s, what=what)
        try:
            mode = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
            _lock(self._gate, mode, timeout_s=self._timeout_s, what=what)
        finally:
            fcntl.flock(self._turnstile, fcntl.LOCK_UN)

    def leave(self) -> None:
        fcntl.flock(self._gate, fcntl.LOCK_UN)

    def close(self) -> None:
        self._turnstile.close()
        self._gate.close()
