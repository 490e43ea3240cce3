"""The worker's one retry mechanism (tenacity): jittered exponential backoff between attempts,
cut short by a stop or a cancel.

Two shapes of retrying use it: :func:`call_with_retries` (one call to a service that may be
briefly down) and :func:`retry_rounds` (rounds over what is left to retry, such as the images
whose hosts failed). Neither waits out a backoff once ``should_stop()`` turns true: the wait
looks at it every ``POLL_S`` seconds, and returns at once when ``wake`` is set.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception_type,
    retry_if_result,
    stop_after_attempt,
    wait_exponential_jitter,
)
from tenacity.wait import wait_base

from engine.errors import RetriableError
from engine.settings import RetrySettings

logger = logging.getLogger(__name__)

T = TypeVar("T")
# How often a backoff without an event to wait on looks at should_stop().
POLL_S = 0.05


def call_with_retries(
    fn: Callable[[], T],
    settings: RetrySettings,
    *,
    what: str,
    should_stop: Callable[[], bool] = lambda: False,
    on_retry: Callable[[RetriableError], None] | None = None,
    wake: threading.Event | None = None,
) -> T:
    """Call ``fn``, retrying :class:`RetriableError` with jittered exponential backoff.

    Gives up early when ``should_stop()`` turns true (shutdown, a cancelled batch), also in the
    middle of a backoff, so a stop is never held up by an outage. ``wake``, when given, is an
    event set along with ``should_stop()`` turning true: the backoff then ends at once.

    Raises:
        RetriableError: the last error, once the attempts are used up or a stop was requested.
        Exception: any non-retriable error from ``fn``, at once.
    """
    failures: list[RetriableError] = []

    def attempt() -> T:
        if failures and should_stop():
            # A stop came during the backoff: give up with the last error, without calling again.
            raise failures[-1]
        try:
            return fn()
        except RetriableError as exc:
            failures.append(exc)
            raise

    def stop(state: RetryCallState) -> bool:
        return bool(stop_after_attempt(settings.attempts)(state)) or should_stop()

    def before_sleep(state: RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome else None
        logger.warning(
            "%s failed (attempt %d/%d), retrying: %s",
            what,
            state.attempt_number,
            settings.attempts,
            error,
        )
        if on_retry is not None and isinstance(error, RetriableError):
            on_retry(error)

    retrying = Retrying(
        stop=stop,
        wait=backoff(settings),
        retry=retry_if_exception_type(RetriableError),
        before_sleep=before_sleep,
        sleep=_sleep_unless_stopped(should_stop, wake),
        reraise=True,
    )
    return retrying(attempt)


def retry_rounds(
    round_: Callable[[], Sequence[T]],
    settings: RetrySettings,
    *,
    should_stop: Callable[[], bool] = lambda: False,
    wake: threading.Event | None = None,
) -> None:
    """Run ``round_`` until it returns nothing left to retry, backing off between rounds as
    :func:`call_with_retries` does.

    ``round_`` bounds the rounds itself (each thing it retries has its own budget), and settles
    what it still holds when it finds ``should_stop()`` true: after a backoff cut short, it is
    called once more to do that. No backoff follows once ``should_stop()`` is true.

    Raises:
        Exception: whatever ``round_`` raises, at once.
    """
    retrying = Retrying(
        stop=lambda _state: False,
        wait=backoff(settings),
        retry=retry_if_result(bool),
        sleep=_sleep_unless_stopped(should_stop, wake),
        reraise=True,
    )
    retrying(round_)


def backoff(settings: RetrySettings) -> wait_base:
    """The delay before each retry: exponential from ``initial_backoff_s`` up to
    ``max_backoff_s``, with up to ``initial_backoff_s`` of jitter."""
    return wait_exponential_jitter(
        multiplier=settings.initial_backoff_s,
        max=settings.max_backoff_s,
        jitter=settings.initial_backoff_s,
    )


def _sleep_unless_stopped(
    should_stop: Callable[[], bool], wake: threading.Event | None
) -> Callable[[float], None]:
    def sleep(seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not should_stop():
            left = deadline - time.monotonic()
            if left <= 0:
                return
            if wake is not None:
                wake.wait(min(left, POLL_S))
            else:
                time.sleep(min(left, POLL_S))

    return sleep
