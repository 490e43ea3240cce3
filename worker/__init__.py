"""The consumer-group worker: micro-batches ingest events into Milvus through Triton.

Public surface: :class:`Worker` (the loop), :func:`build_worker` and :func:`run_worker`.
"""

from worker.consumer import Worker
from worker.runner import build_worker, run_worker

__all__ = ["Worker", "build_worker", "run_worker"]
