"""The errors the contracts raise: a payload that breaks them (:class:`ContractError`) and, of
those, an event over one of its size limits (:class:`EventLimitError`).

The contracts import nothing else of the project, so they cannot raise the engine's error tree
(drawn whole in ``engine.errors``); callers translate :class:`ContractError` into theirs (the
worker dead-letters it as a permanent ``invalid_event``, the producer refuses the event before
sending it).
"""

from __future__ import annotations


class ContractError(ValueError):
    """A message or event that does not satisfy its contract.

    ``reason`` is a short machine-readable code (``malformed_json``, ``schema_invalid``,
    ``unknown_image_kind``, ...), ``str(error)`` says what is wrong in words.
    """

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class EventLimitError(ContractError):
    """An event over one of its ``EventLimits``: ``limit`` names it, ``size`` > ``maximum``."""

    def __init__(self, message: str, *, reason: str, limit: str, size: int, maximum: int) -> None:
        super().__init__(message, reason=reason)
        self.limit = limit
        self.size = size
        self.maximum = maximum
