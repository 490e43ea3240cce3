"""Where a search's time goes: the stages of one request, timed.

A handler makes one :class:`StageTimings` per request and hands it to the service, which times
each stage it runs (``resolve``: which collection an alias names, ``fetch``, ``decode``,
``preprocess``, ``embed``, ``lookup``, ``search``; a search by image of a collection with
regions also runs ``embed_regions`` and ``search_regions``).
The handler then answers the stages in a ``Server-Timing`` header (milliseconds, in the order
they ran: ``decode;dur=2.9, preprocess;dur=4.1, embed;dur=21.3, search;dur=5.2``) and records
them in the ``trident_api_stage_seconds`` histogram, so a slow answer says which step made it
slow, per request (benchmarks, browser tools) and in aggregate (Prometheus).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

Stage = Literal[
    "resolve",
    "fetch",
    "decode",
    "preprocess",
    "embed",
    "embed_regions",
    "lookup",
    "search",
    "search_regions",
]
SERVER_TIMING = "Server-Timing"


class StageTimings:
    """The stages one request ran and how long each took, in order.

    Used by one request at a time: its handler and the worker thread it hands the work to run
    one after the other, never together. Two stages a search runs at once (on a collection
    with regions: ``embed`` and ``embed_regions``, ``search`` and ``search_regions``) are each
    recorded, from two threads, in the order they end; their times overlap.
    """

    def __init__(self) -> None:
        self._stages: list[tuple[Stage, float]] = []

    @contextmanager
    def stage(self, name: Stage) -> Iterator[None]:
        """Time the block as stage ``name`` (recorded even when the block raises)."""
        began = time.perf_counter()
        try:
            yield
        finally:
            self._stages.append((name, time.perf_counter() - began))

    @property
    def stages(self) -> list[tuple[Stage, float]]:
        """``(stage, seconds)`` in the order they ran."""
        return list(self._stages)

    def header(self) -> str:
        """The ``Server-Timing`` value: each stage's duration in milliseconds."""
        return ", ".join(f"{name};dur={seconds * 1000:.1f}" for name, seconds in self._stages)
