"""A search's embedding while a worker's batches keep Triton busy (issue 25, item 1 "by image").

On the running Triton, for each way of serving the ingest model (reloaded between them, see
``bench_growing.serve_as``) and each role of the query client, in one run:

1. **alone**: a thread sends worker-like batches (``--batch`` random pixels, split into
   ``triton.parallel_requests`` parts sent at once, ``TritonEmbedder``'s ingest role) back to
   back for ``--seconds``: images/s;
2. **queried**: the same, while another thread embeds one image at a time (what the query API
   does for a search by image) with the ``--roles`` given: its latency p50/p95/p99, and the
   ingest's images/s over the alone figure.

Variants: ``before`` (the config before issue 25: one instance per part, no priority levels)
with ingest-role queries, then ``stack`` (the repository's config: an instance kept for
queries, priority levels) with ingest-role queries (the instance alone) and query-role queries
(instance and priority). Only Triton's queue is measured: no decode, no API, no Milvus.

    .venv/bin/python benchmarks/bench_query_queue.py --triton-grpc 127.0.0.1:18001
"""

from __future__ import annotations

import argparse
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from bench_growing import serve_as

import benchlib
from engine.inference import TritonEmbedder
from engine.priorities import Role
from engine.settings import Settings

VARIANTS: tuple[tuple[str, Role], ...] = (
    ("before", "ingest"),
    ("stack", "ingest"),
    ("stack", "query"),
)


def ingest_loop(settings: Settings, batch: np.ndarray, stop: threading.Event) -> float:
    """Batches back to back until ``stop``; images/s."""
    sent = 0
    with TritonEmbedder(settings.triton) as embedder:
        began = time.monotonic()
        while not stop.is_set():
            embedder.embed(batch)
            sent += len(batch)
        return sent / (time.monotonic() - began)


def query_loop(
    settings: Settings, role: Role, image: np.ndarray, stop: threading.Event
) -> list[float]:
    """One image at a time until ``stop``, a short pause between; latencies in ms."""
    latencies = []
    with TritonEmbedder(settings.triton, role=role) as embedder:
        while not stop.is_set():
            began = time.perf_counter()
            embedder.embed(image)
            latencies.append((time.perf_counter() - began) * 1000)
            time.sleep(0.05)
    return latencies


def phase(
    settings: Settings, batch: np.ndarray, seconds: float, role: Role | None
) -> dict[str, Any]:
    stop = threading.Event()
    rate: list[float] = []
    latencies: list[float] = []
    threads = [threading.Thread(target=lambda: rate.append(ingest_loop(settings, batch, stop)))]
    if role is not None:
        threads.append(
            threading.Thread(
                target=lambda: latencies.extend(query_loop(settings, role, batch[:1], stop))
            )
        )
    with benchlib.LoadSampler() as load:
        for thread in threads:
            thread.start()
        time.sleep(seconds)
        stop.set()
        for thread in threads:
            thread.join()
    figures: dict[str, Any] = {"images_per_s": round(rate[0], 1), "load": load.summary()}
    if role is not None:
        figures["query_ms"] = {
            f"p{q}": round(benchlib.percentile(latencies, q), 1) for q in (50, 95, 99)
        }
        figures["queries"] = len(latencies)
    return figures


def main(argv: list[str] | None = None) -> int:
    """Run every variant, print, record; returns the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--triton-grpc", default="127.0.0.1:18001")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=30.0, help="per phase")
    parser.add_argument("--results", type=Path, default=benchlib.DEFAULT_RESULTS)
    args = parser.parse_args(argv)
    benchlib.exit_on_sigterm()
    settings = Settings(triton={"url": args.triton_grpc, "protocol": "grpc"})
    rng = np.random.default_rng(0)
    batch = rng.integers(0, 256, (args.batch, *settings.model.input_dims), dtype=np.uint8)
    figures: dict[str, Any] = {}
    try:
        for serving, role in VARIANTS:
            serve_as(args.triton_grpc, settings, serving)
            TritonEmbedder(settings.triton).embed(batch)  # the new instances warm
            alone = phase(settings, batch, args.seconds, None)
            queried = phase(settings, batch, args.seconds, role)
            ratio = round(queried["images_per_s"] / alone["images_per_s"], 3)
            figures[f"{serving}_{role}"] = {
                "alone": alone,
                "queried": queried,
                "ingest_rate_ratio": ratio,
            }
            q = queried["query_ms"]
            print(
                f"{serving:6s} queries as {role:6s}: query p50 {q['p50']} p95 {q['p95']} "
                f"p99 {q['p99']} ms (n {queried['queries']}); ingest {alone['images_per_s']} "
                f"-> {queried['images_per_s']} images/s (x{ratio}); load "
                f"{queried['load']['load_avg_mean']}"
            )
    finally:
        serve_as(args.triton_grpc, settings, "stack")
    benchlib.record("query_queue", {"batch": args.batch, **figures}, path=args.results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
