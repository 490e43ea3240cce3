"""Who a request to Triton is for, and the priority it gets there: one fact for the model
configs (``model_build.triton_repository`` writes the levels) and the client
(:class:`engine.inference.TritonEmbedder` sends them).

Triton's dynamic batcher takes a request of a higher priority (a lower level) from its queue
before any of a lower one: a search's single image never waits behind ingest batches queued
before it. A request naming no priority (0), e.g. from a client that predates this, gets the
default level, the ingest's; a server whose model config has no levels ignores the priority.
"""

from __future__ import annotations

from typing import Literal

Role = Literal["ingest", "query"]

PRIORITY_LEVELS = 2
INGEST_PRIORITY = 2  # the default level: what a request naming none gets
# Sent with each request; the ingest's names none (0), as before the levels existed.
PRIORITY: dict[Role, int] = {"query": 1, "ingest": 0}
# Model instances beyond the ones a batch is split over (``ModelSpec.instance_count``, the
# worker's parallel_requests): a search finds one free while the worker's parts run.
QUERY_INSTANCES = 1
