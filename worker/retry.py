"""Retrying calls to services that may be briefly down: jittered exponential backoff."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential_jitter,
)

from engine.errors import RetriableError
from engine.settings import RetrySettings

logger = logging.getLogger(__name__)

T = TypeVar("T")


def call_with_retries(
    fn: Callable[[], T],
    settings: RetrySettings,
    *,
    what: str,
    should_stop: Callable[[], bool] = lambda: False,
    on_retry: Callable[[RetriableError], None] | None = None,
) -> T:
    """Call ``fn``, retrying :class:`RetriableError` with jittered exponential backoff.

    Gives up early when ``should_stop()`` turns true (shutdown), so a stop is never held up by
    an outage.

    Raises:
        RetriableError: the last error, once the attempts are used up or a stop was requested.
        Exception: any non-retriable error from ``fn``, at once.
    """

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
        wait=wait_exponential_jitter(
            multiplier=settings.initial_backoff_s,
            max=settings.max_backoff_s,
            jitter=settings.initial_backoff_s,
        ),
        retry=retry_if_exception_type(RetriableError),
        before_sleep=before_sleep,
        reraise=True,
    )
    return retrying(fn)
