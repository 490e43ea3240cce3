"""File locks that bind processes: an ``flock`` on a file, taken within a deadline.

The kernel drops a lock when its process dies, so a crashed holder never blocks the others for
good. Used for what several processes of one stack root change (the model repository) and by
the test suite's gate.
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


def lock_within(handle: IO[str], mode: int, *, timeout_s: float, what: str) -> None:
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

    Not re-entrant: a second ``with`` on the same path in the same process waits for the first.

    Raises:
        TimeoutError: another process held it for over ``timeout_s``.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        lock_within(handle, fcntl.LOCK_EX, timeout_s=timeout_s, what=what)
        yield  # closing the file releases the lock
