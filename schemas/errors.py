"""The one error the contracts raise: a payload that breaks them.

The contracts import nothing else of the project, so they cannot raise the engine's error tree;
callers translate :class:`ContractError` into theirs (the worker dead-letters it as a permanent
``invalid_event``, the producer refuses the event before sending it).
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
