"""The consumer-group worker: micro-batches ingest events into Milvus through Triton.

Public surface: :class:`Worker` (the loop), :func:`build_worker` (a :class:`WorkerRuntime`: the
worker and every adapter it owns and closes) and :func:`run_worker`.
"""

from worker.consumer import Worker
from worker.runner import WorkerRuntime, build_worker, run_worker

__all__ = ["Worker", "WorkerRuntime", "build_worker", "run_worker"]
