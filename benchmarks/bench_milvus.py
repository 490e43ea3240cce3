"""Upsert throughput and top-10 search latency of the running Milvus server, against numpy.

Builds a collection of the store's schema (``engine.store.collection_schema``: VARCHAR primary
key, 1280-d FLOAT_VECTOR, JSON ``metadata``, the version fields; COSINE, HNSW), upserts
``--count`` synthetic embeddings (clustered, unit-norm, so nearest neighbours mean something),
waits until every sealed segment is indexed and served, then times single-vector top-10
searches, plain and with a JSON filter. The baseline is exact brute-force cosine top-10 in numpy
over the same vectors, which also gives the recall of the HNSW answers.

Upserts, each phase on its own slice of the rows, in this order (a later phase writes into a
larger collection, which can only slow it):

- the **rows API** baseline, pymilvus's ``MilvusClient.upsert(data=[row, ...])`` as
  ``VectorStore.upsert`` sent until issue 12: 1 call at a time, then ``--inflight`` threads;
- ``VectorStore.upsert`` (the service's write path: packed by columns, a call of ``--batch``
  rows sent in chunks with several in flight), one call at a time;
- ``VectorStore.upsert`` with the worker's calls of ``--worker-batch`` rows from one thread;
- the **server alone**: one pre-packed request resent ``--inflight`` at a time (no client
  work), the bound the server sets on this machine; and the **packing alone** (no server).

Each phase records the CPU that Milvus and this process used while it ran. Searches use the
collection's default consistency (bounded staleness), as the query path must: ``Strong`` costs
a few hundred ms per query. Everything written is flushed and indexed before the timing starts,
so no row is missed.

Needs a running server (``MilvusService.start()``); from the repository root::

    PYTHONPATH=. python benchmarks/bench_milvus.py --uri http://127.0.0.1:19530 --count 100000
"""

from __future__ import annotations

import argparse
import itertools
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from pymilvus import MilvusClient, connections, utility

import benchlib
from engine.records import VECTOR_FIELD, VectorRecord
from engine.settings import MilvusSettings
from engine.store import VectorStore, collection_schema
from engine.store_requests import pack_upsert

Matrix = npt.NDArray[np.float32]

UPSERT_TARGET = 10_000.0  # vectors/s (issue 12)
SEARCH_TARGET_MS = 50.0  # top-10 at 100k vectors
TOP_K = 10


def make_vectors(count: int, dim: int, seed: int) -> tuple[Matrix, npt.NDArray[np.int64]]:
    """Unit-norm vectors around 1,000 centres (same-cluster cosine ~0.5), and their cluster."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((1_000, dim), dtype=np.float32)
    labels = rng.integers(0, len(centres), count)
    vectors = centres[labels] + rng.standard_normal((count, dim), dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors, labels


def create_collection(client: MilvusClient, name: str, dim: int) -> None:
    if client.has_collection(name):
        client.drop_collection(name)
    index = client.prepare_index_params()
    # Nested "params": milvus-lite ignores the flat form; 2.3.5 takes this one.
    index.add_index(
        field_name=VECTOR_FIELD,
        index_type="HNSW",
        metric_type="COSINE",
        params={"params": {"M": 16, "efConstruction": 128}},
    )
    # Also loads it.
    client.create_collection(name, schema=collection_schema(dim), index_params=index)


class Upserter:
    """Writes rows ``[start, stop)`` one way or another, and times a phase of such writes."""

    def __init__(
        self, client: MilvusClient, store: VectorStore, name: str, records: list[VectorRecord]
    ) -> None:
        self.client, self.store, self.name, self.records = client, store, name, records

    def rows_api(self, start: int, stop: int) -> None:
        """The write path before issue 12: pymilvus's rows API."""
        self.client.upsert(self.name, [r.to_row() for r in self.records[start:stop]])

    def store_upsert(self, start: int, stop: int) -> None:
        self.store.upsert(self.records[start:stop], self.name)

    def run(
        self, send: Callable[[int, int], None], rows: range, batch: int, inflight: int
    ) -> dict[str, Any]:
        """Send ``rows`` in calls of ``batch``, ``inflight`` calls at a time; vectors/s and the
        CPU used meanwhile."""
        starts = range(rows.start, rows.stop, batch)
        with benchlib.LoadSampler(every=0.5) as load, ThreadPoolExecutor(inflight) as pool:
            began = time.perf_counter()
            # list() re-raises any failure.
            list(pool.map(lambda start: send(start, min(start + batch, rows.stop)), starts))
            elapsed = time.perf_counter() - began
        return phase(len(rows), elapsed, load)

    def server_alone(self, rows: range, inflight: int, repeats: int) -> dict[str, Any]:
        """One pre-packed request resent ``repeats`` times, ``inflight`` at a time: what the
        server takes when the client does nothing but wait."""
        request = self.pack(rows)
        stub = self.client._get_connection()._stub
        with benchlib.LoadSampler(every=0.5) as load, ThreadPoolExecutor(inflight) as pool:
            began = time.perf_counter()
            statuses = list(pool.map(lambda _: stub.Upsert(request).status, range(repeats)))
            elapsed = time.perf_counter() - began
        if any(status.code for status in statuses):
            raise RuntimeError(f"upsert failed: {statuses[0].reason}")
        return phase(len(rows) * repeats, elapsed, load)

    def packing_alone(self, rows: range, repeats: int) -> float:
        """Rows packed per second of this process's CPU (no server)."""
        began = time.process_time()
        for _ in range(repeats):
            self.pack(rows)
        return len(rows) * repeats / (time.process_time() - began)

    def pack(self, rows: range) -> Any:
        return pack_upsert(
            self.name,
            self.records[rows.start : rows.stop],
            vector_field=VECTOR_FIELD,
            dimension=len(self.records[0].vector),
            dynamic_field=False,
        )


def phase(vectors: int, elapsed: float, load: benchlib.LoadSampler) -> dict[str, Any]:
    summary = load.summary()
    cores = summary["cpu_cores_by_role"]
    return {
        "vectors_per_s": round(vectors / elapsed),
        "milvus_cores": cores.get("milvus", 0.0),
        "client_cores": cores.get("benchmark", 0.0),
        "load_avg_mean": summary["load_avg_mean"],
    }


def row_id(i: int) -> str:
    return f"img-{i:07d}"


def wait_indexed(
    client: MilvusClient, uri: str, token: str, name: str, count: int, *, timeout: float
) -> float:
    """Flush, then wait until every indexable segment is indexed and served; return seconds."""
    began = time.perf_counter()
    client.flush(name)
    connections.connect(alias="bench", uri=uri, token=token)
    deadline = began + timeout
    while time.perf_counter() < deadline:
        segments = utility.get_query_segment_info(name, using="bench")
        served = sum(s.num_rows for s in segments)
        # Segments under 1,024 rows are never indexed (searched brute force): skip those.
        unindexed = [s for s in segments if s.num_rows >= 1_024 and not s.index_name]
        if served >= count and not unindexed:
            return time.perf_counter() - began
        time.sleep(1.0)
    raise TimeoutError(f"{name}: segments not indexed and served after {timeout:.0f}s")


def latencies(run: Callable[[Matrix], Any], queries: Matrix, warmup: int = 10) -> list[float]:
    for query in queries[:warmup]:
        run(query)
    timings = []
    for query in queries:
        began = time.perf_counter()
        run(query)
        timings.append((time.perf_counter() - began) * 1_000)
    return timings


def pct(timings: list[float], q: float) -> float:
    return float(np.percentile(timings, q))


def print_upserts(
    upserts: dict[str, dict[str, Any]], packing: float, args: argparse.Namespace
) -> None:
    """The upsert figures, each against the rows API one call at a time."""
    phases = {
        "rows_api_serial": f"rows API (the old path), calls of {args.batch:,}, 1 at a time",
        "rows_api_inflight": f"rows API, calls of {args.batch:,}, {args.inflight} at a time",
        "store": f"VectorStore.upsert, calls of {args.batch:,}, 1 at a time",
        "store_worker_calls": f"VectorStore.upsert, calls of {args.worker_batch}, 1 at a time",
        "server_alone": f"server alone: a pre-packed request x{args.inflight} in flight",
    }
    print(f"Milvus upserts, {args.count:,} vectors x {args.dim}-d (CPU: cores used meanwhile)")
    baseline = upserts["rows_api_serial"]["vectors_per_s"]
    for key, label in phases.items():
        f = upserts[key]
        print(
            f"  {label:<58} {f['vectors_per_s']:8,} vectors/s  x{f['vectors_per_s'] / baseline:.2f}"
            f"  (Milvus {f['milvus_cores']:.2f}, client {f['client_cores']:.2f}; "
            f"load {f['load_avg_mean']})"
        )
    best = upserts["store"]["vectors_per_s"]
    verdict = "meets" if best >= UPSERT_TARGET else "MISSES"
    print(
        f"  VectorStore.upsert: {best / UPSERT_TARGET:.2f}x the {UPSERT_TARGET:,.0f}/s target "
        f"({verdict} it); packing alone (no server) {packing:,.0f} rows per CPU-second",
        flush=True,
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--uri", default="http://127.0.0.1:19530")
    parser.add_argument(
        "--token-file",
        type=Path,
        default=Path(".stack/milvus/secret"),
        help="root password of the local stack's Milvus (authentication is on)",
    )
    parser.add_argument("--count", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=1280)
    parser.add_argument("--batch", type=int, default=2_000, help="rows per upsert call")
    parser.add_argument("--worker-batch", type=int, default=64, help="rows per worker call")
    parser.add_argument("--inflight", type=int, default=4, help="rows-API calls in flight")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--ef", type=int, default=64, help="HNSW search breadth")
    parser.add_argument("--collection", default="bench_milvus")
    parser.add_argument("--keep", action="store_true", help="keep the collection afterwards")
    parser.add_argument(
        "--upserts-only", action="store_true", help="stop after the upserts (no index, no search)"
    )
    parser.add_argument("--quick", action="store_true", help="10,000 vectors, 50 queries")
    parser.add_argument("--results", type=Path, default=benchlib.DEFAULT_RESULTS)
    args = parser.parse_args(argv)
    if args.quick:
        args.count, args.queries = 10_000, 50

    if args.count < 5 * args.batch:
        parser.error("--count must be at least 5 batches")
    load = os.getloadavg()  # the machine may be shared: the figures shrink under load
    sampler = benchlib.LoadSampler().__enter__()  # left in __exit__ below, after the last timing
    vectors, labels = make_vectors(args.count, args.dim, seed=0)
    # Queries: perturbed copies of stored vectors, i.e. near-duplicate lookups.
    rng = np.random.default_rng(1)
    picked = rng.choice(args.count, args.queries, replace=False)
    queries = vectors[picked] + 0.02 * rng.standard_normal((args.queries, args.dim), np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)

    token = f"root:{args.token_file.read_text().strip()}" if args.token_file.exists() else ""
    client = MilvusClient(uri=args.uri, token=token)
    store = VectorStore(MilvusSettings(uri=args.uri, token=token, dimension=args.dim))
    create_collection(client, args.collection, args.dim)
    records = [
        VectorRecord(id=row_id(i), vector=vectors[i], metadata={"category": f"c{labels[i] % 10}"})
        for i in range(args.count)
    ]
    upserter = Upserter(client, store, args.collection, records)
    # Slices of the rows: 15 % and 15 % rows API (1, then --inflight at a time), 50 %
    # VectorStore.upsert, 20 % VectorStore.upsert in the worker's calls.
    cut = [round(args.count * f) for f in (0, 0.15, 0.30, 0.80, 1.0)]
    rows = [range(a, b) for a, b in itertools.pairwise(cut)]
    upserts = {
        "rows_api_serial": upserter.run(upserter.rows_api, rows[0], args.batch, 1),
        "rows_api_inflight": upserter.run(upserter.rows_api, rows[1], args.batch, args.inflight),
        "store": upserter.run(upserter.store_upsert, rows[2], args.batch, 1),
        "store_worker_calls": upserter.run(upserter.store_upsert, rows[3], args.worker_batch, 1),
        # Rewrites rows already written (same values): the collection's size is unchanged.
        "server_alone": upserter.server_alone(range(args.batch // 2), args.inflight, repeats=10),
    }
    packing = upserter.packing_alone(range(args.batch), repeats=5)
    store.close()
    print_upserts(upserts, packing, args)  # now: the index and searches take a while
    if args.upserts_only:
        client.drop_collection(args.collection)
        client.close()
        sampler.__exit__(None, None, None)
        benchlib.record(
            "milvus_upserts",
            {
                "count": args.count,
                "upsert_batch": args.batch,
                "upsert": upserts,
                "upsert_packing_rows_per_cpu_s": round(packing),
            },
            sampler=sampler,
            quick=args.quick,
            path=args.results,
        )
        return
    settle = wait_indexed(client, args.uri, token, args.collection, args.count, timeout=1_800)

    params = {"metric_type": "COSINE", "params": {"ef": args.ef}}
    found: list[list[str]] = []

    def search(query: Matrix, flt: str = "") -> None:
        hits = client.search(
            args.collection,
            data=[query],
            limit=TOP_K,
            filter=flt,
            search_params=params,
            anns_field=VECTOR_FIELD,
        )
        found.append([hit["id"] for hit in hits[0]])

    milvus_ms = latencies(search, queries)
    milvus_ids = found[-args.queries :]
    filtered_ms = latencies(lambda q: search(q, 'metadata["category"] == "c3"'), queries)

    exact: list[list[str]] = []

    def brute_force(query: Matrix) -> None:
        scores = vectors @ query
        top = np.argpartition(-scores, TOP_K)[:TOP_K]
        exact.append([row_id(i) for i in top[np.argsort(-scores[top])]])

    numpy_ms = latencies(brute_force, queries)
    exact_ids = exact[-args.queries :]
    recall = np.mean(
        [len(set(m) & set(e)) / TOP_K for m, e in zip(milvus_ids, exact_ids, strict=True)]
    )

    if not args.keep:
        client.drop_collection(args.collection)
    client.close()
    sampler.__exit__(None, None, None)

    def verdict(ok: bool) -> str:
        return "meets target" if ok else "MISSES target"

    def line(label: str, text: str) -> None:
        print(f"  {label:<40} {text}")

    p50, p95 = pct(milvus_ms, 50), pct(milvus_ms, 95)
    print(f"Milvus at {args.uri}: {args.count:,} vectors x {args.dim}-d, COSINE")
    print(f"  load average (1 min) at start {load[0]:.1f}, at end {os.getloadavg()[0]:.1f}")
    line("flush + index build + handoff", f"{settle:8.1f} s")
    line(
        f"HNSW top-{TOP_K} (M=16, efC=128, ef={args.ef})",
        f"p50 {p50:6.2f} ms  p95 {p95:6.2f} ms  recall@{TOP_K} {recall:.3f}  "
        f"(p95 < {SEARCH_TARGET_MS:.0f} ms: {verdict(p95 < SEARCH_TARGET_MS)})",
    )
    line(
        f"HNSW top-{TOP_K} + JSON filter (10%)",
        f"p50 {pct(filtered_ms, 50):6.2f} ms  p95 {pct(filtered_ms, 95):6.2f} ms",
    )
    line(
        f"numpy brute-force top-{TOP_K} (exact)",
        f"p50 {pct(numpy_ms, 50):6.2f} ms  p95 {pct(numpy_ms, 95):6.2f} ms  "
        f"(numpy p50 / Milvus p50 = {pct(numpy_ms, 50) / p50:.1f})",
    )
    print(f"  {sampler.describe()}")
    benchlib.record(
        "milvus_raw",
        {
            "count": args.count,
            "upsert_batch": args.batch,
            "upsert_worker_batch": args.worker_batch,
            "upsert": upserts,
            "upsert_packing_rows_per_cpu_s": round(packing),
            "settle_s": round(settle, 1),
            "hnsw_p50_ms": round(p50, 2),
            "hnsw_p95_ms": round(p95, 2),
            "hnsw_recall_at_10": round(float(recall), 3),
            "numpy_p50_ms": round(pct(numpy_ms, 50), 2),
        },
        sampler=sampler,
        quick=args.quick,
        path=args.results,
    )


if __name__ == "__main__":
    main()
