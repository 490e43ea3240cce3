"""Errors of the local stack."""

from __future__ import annotations

from pathlib import Path


class StackError(RuntimeError):
    """A stack service could not be installed, started or stopped; names the service and its log."""

    def __init__(self, message: str, log_file: Path | None = None) -> None:
        super().__init__(message)
        self.log_file = log_file
