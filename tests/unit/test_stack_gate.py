"""The gate that lets the suite's processes share one test stack (tests/support/stack_gate.py).

Each gate opens its own files, so two gates of one process lock each other as two processes
would (``flock`` binds open files, not processes).
"""

from __future__ import annotations

import fcntl
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.stack_gate import StackGate, exclusive_file_lock


def _held(path: Path) -> bool:
    with path.open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        return False


def _wait_until(predicate: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 5
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


def test_readers_share_and_a_waiting_writer_goes_before_later_readers(tmp_path: Path) -> None:
    first, second, writer, late = (StackGate(tmp_path, timeout_s=5) for _ in range(4))
    first.enter(exclusive=False)
    second.enter(exclusive=False)  # readers share
    order: list[str] = []

    def write() -> None:
        writer.enter(exclusive=True)
        order.append("writer")
        writer.leave()

    def read_late() -> None:
        late.enter(exclusive=False)
        order.append("late reader")
        late.leave()

    writing = threading.Thread(target=write)
    writing.start()
    _wait_until(lambda: _held(tmp_path / ".test-gate-turnstile"), "the writer never waited")
    reading = threading.Thread(target=read_late)
    reading.start()
    first.leave()
    assert order == [], "the writer entered while a reader was in"
    second.leave()
    writing.join(timeout=5)
    reading.join(timeout=5)
    assert order == ["writer", "late reader"]


def test_a_writer_that_waits_too_long_fails_and_lets_readers_in(tmp_path: Path) -> None:
    reader, writer, other = (StackGate(tmp_path, timeout_s=0.3) for _ in range(3))
    reader.enter(exclusive=False)
    with pytest.raises(TimeoutError, match="other test processes"):
        writer.enter(exclusive=True)
    other.enter(exclusive=False)  # the turnstile was given back
    other.leave()
    reader.leave()


def test_the_start_lock_is_held_for_the_block_only(tmp_path: Path) -> None:
    lock = tmp_path / "root" / ".start.lock"
    with exclusive_file_lock(lock, timeout_s=1, what="the start"):
        assert _held(lock)
        with (
            pytest.raises(TimeoutError, match="the start"),
            exclusive_file_lock(lock, timeout_s=0.2, what="the start"),
        ):
            pass
    assert not _held(lock)
