"""The errors the contracts raise: a payload that breaks them (:class:`ContractError`) and, of
those, an event over one of its size limits (:class:`EventLimitError`).

The contracts import nothing else of the project, so they cannot raise the engine's error tree
(drawn whole in ``engine.errors``); callers translate :class:`ContractError` into theirs (the
worker dead-letters it as a permanent ``invalid_event``, the producer refuses the event before
sending it).
"""

from __future__ import annotations

from pydantic import ValidationError


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


def validation_problems(exc: ValidationError, *, whole: str = "<event>") -> str:
    """One line for a pydantic error: ``where: what`` per problem, joined by ``; ``.

    ``whole`` names the object itself when a problem has no location. An unknown key reads
    "unknown key" (pydantic says "Extra inputs are not permitted").
    """
    problems = []
    for error in exc.errors():
        where = ".".join(str(part) for part in error["loc"]) or whole
        what = "unknown key" if error["type"] == "extra_forbidden" else error["msg"]
        problems.append(f"{where}: {what}")
    return "; ".join(problems)
