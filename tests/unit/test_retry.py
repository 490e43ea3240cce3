"""The worker's one retry mechanism: a stop cuts a backoff short, with or without an event."""

from __future__ import annotations

import threading
import time

import pytest

from engine.errors import StoreUnavailableError
from engine.settings import RetrySettings
from worker.retry import call_with_retries, retry_rounds

LONG = RetrySettings(attempts=5, initial_backoff_s=8.0, max_backoff_s=8.0)


class _Down:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self) -> None:
        self.calls += 1
        raise StoreUnavailableError("milvus down")


@pytest.mark.parametrize("wake", [True, False], ids=["event", "polled"])
def test_a_stop_during_the_backoff_gives_up_at_once(wake: bool) -> None:
    stop = threading.Event()
    down = _Down()
    timer = threading.Timer(0.2, stop.set)
    timer.start()
    began = time.monotonic()
    with pytest.raises(StoreUnavailableError):
        call_with_retries(
            down, LONG, what="probe", should_stop=stop.is_set, wake=stop if wake else None
        )
    timer.cancel()
    assert time.monotonic() - began < 1.0
    assert down.calls == 1  # never called again once stopped


def test_retries_until_the_call_succeeds() -> None:
    answers = iter([StoreUnavailableError("down"), StoreUnavailableError("down"), None])

    def flaky() -> str:
        answer = next(answers)
        if answer is not None:
            raise answer
        return "ok"

    quick = RetrySettings(attempts=3, initial_backoff_s=0.0, max_backoff_s=0.0)
    assert call_with_retries(flaky, quick, what="probe") == "ok"


def test_rounds_run_until_nothing_is_left_and_a_stop_settles_them_at_once() -> None:
    left = [3]

    def round_() -> list[int]:
        left[0] -= 1
        return list(range(left[0]))

    retry_rounds(round_, RetrySettings(initial_backoff_s=0.0, max_backoff_s=0.0))
    assert left == [0]

    stop = threading.Event()
    rounds: list[bool] = []

    def stoppable() -> list[int]:
        rounds.append(stop.is_set())
        return [] if stop.is_set() else [1]  # settles what it holds once stopped

    timer = threading.Timer(0.2, stop.set)
    timer.start()
    began = time.monotonic()
    retry_rounds(stoppable, LONG, should_stop=stop.is_set, wake=stop)
    timer.cancel()
    assert time.monotonic() - began < 1.0
    assert rounds == [False, True]
