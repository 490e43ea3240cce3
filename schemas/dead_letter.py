"""The dead-letter record's contract: the headers a dead letter carries, beside the original ones.

A dead letter is the consumed record unchanged (key, value, the producer's headers) plus these
headers. Kafka Connect's ``__connect.errors.*`` names are used where they exist, so existing
dead-letter tooling understands them; ``trident.errors.*`` carry our own stage/attempt bookkeeping.
The worker writes them (``worker.dead_letter``); operator tools read them (``trident-dlq``).

A replayed record carries :data:`HEADER_REPLAY_COUNT` (how many times it has been republished
from the dead-letter topic). The worker keeps it, like any producer header, when the record
fails again, so the replay tool can refuse a record that keeps failing.
"""

from __future__ import annotations

from typing import Final

HEADER_TOPIC = "__connect.errors.topic"
HEADER_PARTITION = "__connect.errors.partition"
HEADER_OFFSET = "__connect.errors.offset"
HEADER_EXCEPTION_CLASS = "__connect.errors.exception.class.name"
HEADER_EXCEPTION_MESSAGE = "__connect.errors.exception.message"
HEADER_STAGE = "trident.errors.stage"
HEADER_REASON = "trident.errors.reason"
HEADER_ATTEMPTS = "trident.errors.attempts"
HEADER_FIRST_FAILED = "trident.errors.first_failed_at"
HEADER_WORKER = "trident.errors.worker"
HEADER_MODEL = "trident.errors.model_version"
# Decimal count of replays; set by the replay tool, not one of the headers a failure rewrites.
HEADER_REPLAY_COUNT = "trident.replay.count"
# On a record the worker re-published to its own topic after a per-record transient failure (an
# image host timing out or answering 5xx): how many attempts were made so far. It travels with
# the record, so the retry cap holds across pauses, rewinds, restarts and other workers.
HEADER_RETRY_ATTEMPTS = "trident.retry.attempts"
# Headers we add; a replay strips them so a re-failure is described afresh (and a replayed
# record gets a fresh retry budget).
DEAD_LETTER_HEADERS: Final = frozenset(
    {
        HEADER_TOPIC,
        HEADER_PARTITION,
        HEADER_OFFSET,
        HEADER_EXCEPTION_CLASS,
        HEADER_EXCEPTION_MESSAGE,
        HEADER_STAGE,
        HEADER_REASON,
        HEADER_ATTEMPTS,
        HEADER_FIRST_FAILED,
        HEADER_WORKER,
        HEADER_MODEL,
        HEADER_RETRY_ATTEMPTS,
    }
)
