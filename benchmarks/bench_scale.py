"""Milvus at scale, in stages up to 1,000,000 vectors of 1280-d: writes, builds, memory, search.

Not part of ``make bench`` (a 1M run takes hours on 2 cores): ``make bench-scale``. For each index
type (``--indexes``, default HNSW and IVF_FLAT, each with the service's default parameters) a
private Milvus 2.3.5 server is started from the local stack's cached binary with the stack's own
settings (``devstack.milvus.MilvusService`` on ``--milvus-port``, data in a temporary folder,
wiped afterwards), and one collection of the service's schema grows through ``--sizes`` (e.g.
``100000 250000 1000000``). At each stage:

1. **writes**: the rows up to the stage's size go in through ``VectorStore.upsert`` in calls of
   2,000 (the service's write path): vectors/s, while another thread searches
   (``VectorStore.search``, top-10) in a loop: p50/p99 **during writes**;
2. **build**: flush, compact, and wait until the index covers every row and the query node
   serves it, then until the server is idle: seconds and the server's CPU-seconds;
3. **memory**: the server's RSS once settled;
4. **settled search**: p50/p95/p99 and recall@10 against exact top-10 (numpy, over every row
   written so far), with the default search parameters and a sweep (HNSW ``ef``, IVF
   ``nprobe``).

The vectors are synthetic, clustered unit vectors made chunk by chunk from fixed seeds (a
1M x 1280 float32 matrix is 5 GB; it is never held at once); the exact top-10 is kept as a
running merge over the chunks. Queries are near-duplicates of rows of the first chunk. Each
stage is merged into ``bench/results/latest.json`` (section ``scale_1m``) as soon as it is
measured, so a run stopped part-way keeps what it measured. From the repository root::

    .venv/bin/python benchmarks/bench_scale.py --sizes 100000 250000 --indexes HNSW
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from bench_growing import CoreSampler, cpu_seconds, rss_mib, top_snapshot, wait_pid_idle
from bench_search import settle

import benchlib
from devstack.config import StackConfig
from devstack.milvus import MilvusService
from engine.indexes import IndexSpec, IndexType
from engine.records import VectorRecord
from engine.settings import MilvusSettings
from engine.store import VectorStore

Matrix = npt.NDArray[np.float32]
DIM = 1280
TOP_K = 10
CHUNK = 10_000
WRITE_BATCH = 2_000
CLUSTERS = 1_000
SWEEP: dict[str, tuple[str, tuple[int, ...]]] = {
    "HNSW": ("ef", (32, 64, 128, 256)),
    "IVF_FLAT": ("nprobe", (8, 16, 32, 64)),
}


class Vectors:
    """Clustered unit vectors, made ``CHUNK`` rows at a time from fixed seeds."""

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        self.centres = np.random.default_rng(seed).standard_normal((CLUSTERS, DIM), np.float32)

    def chunk(self, index: int) -> Matrix:
        rng = np.random.default_rng((self.seed, index))
        labels = rng.integers(0, CLUSTERS, CHUNK)
        rows = self.centres[labels] + rng.standard_normal((CHUNK, DIM), np.float32)
        rows /= np.linalg.norm(rows, axis=1, keepdims=True)
        return rows

    def rows(self, start: int, stop: int) -> Iterator[tuple[int, Matrix]]:
        """``(first row number, rows)`` covering ``[start, stop)``, chunk-aligned pieces."""
        row = start
        while row < stop:
            index, offset = divmod(row, CHUNK)
            take = min(CHUNK - offset, stop - row)
            yield row, self.chunk(index)[offset : offset + take]
            row += take


class ExactTopK:
    """The exact cosine top-k of each query over every row seen so far (a running merge)."""

    def __init__(self, queries: Matrix, k: int = TOP_K) -> None:
        self.queries, self.k = queries, k
        self.scores = np.full((len(queries), k), -np.inf, np.float32)
        self.ids = np.full((len(queries), k), -1, np.int64)

    def add(self, first: int, rows: Matrix) -> None:
        scores = self.queries @ rows.T
        ids = np.broadcast_to(np.arange(first, first + len(rows)), scores.shape)
        merged_scores = np.concatenate([self.scores, scores], axis=1)
        merged_ids = np.concatenate([self.ids, ids], axis=1)
        best = np.argpartition(-merged_scores, self.k - 1, axis=1)[:, : self.k]
        self.scores = np.take_along_axis(merged_scores, best, axis=1)
        self.ids = np.take_along_axis(merged_ids, best, axis=1)

    def sets(self) -> list[set[int]]:
        return [set(row.tolist()) for row in self.ids]


def make_queries(vectors: Vectors, count: int) -> Matrix:
    """Near-duplicates of rows of the first chunk (present from the first stage on)."""
    rng = np.random.default_rng(11)
    base = vectors.chunk(0)[rng.choice(CHUNK, count, replace=False)]
    near = base + 0.02 * rng.standard_normal(base.shape, np.float32)
    return (near / np.linalg.norm(near, axis=1, keepdims=True)).astype(np.float32)


def row_id(n: int) -> str:
    return f"v-{n:08d}"


def write(store: VectorStore, name: str, vectors: Vectors, rows: range, exact: ExactTopK) -> float:
    """Upsert ``rows`` (row numbers) in calls of ``WRITE_BATCH``; vectors/s (exact kept up)."""
    spent = 0.0
    for first, chunk in vectors.rows(rows.start, rows.stop):
        exact.add(first, chunk)
        records = [
            VectorRecord(id=row_id(first + i), vector=chunk[i], metadata={"n": first + i})
            for i in range(len(chunk))
        ]
        began = time.perf_counter()
        for at in range(0, len(records), WRITE_BATCH):
            store.upsert(records[at : at + WRITE_BATCH], name)
        spent += time.perf_counter() - began
    return len(rows) / spent


def timed_search(
    store: VectorStore, name: str, queries: Matrix, exact: list[set[int]] | None
) -> dict[str, Any]:
    """Sequential top-10 searches: p50/p95/p99 and, given the exact sets, recall@10."""
    for query in queries[:5]:
        store.search(query, top_k=TOP_K, collection=name)
    latencies, recalls = [], []
    for i, query in enumerate(queries):
        began = time.perf_counter()
        hits = store.search(query, top_k=TOP_K, collection=name)
        latencies.append((time.perf_counter() - began) * 1000)
        if exact is not None:
            found = {int(hit.id[2:]) for hit in hits}
            recalls.append(len(found & exact[i]) / TOP_K)
    out: dict[str, Any] = {
        f"p{q}_ms": round(benchlib.percentile(latencies, q), 2) for q in (50, 95, 99)
    }
    out["queries"] = len(latencies)
    if recalls:
        out["recall_at_10"] = round(float(np.mean(recalls)), 4)
    return out


def search_while(
    store: VectorStore, name: str, queries: Matrix, busy: threading.Event
) -> list[float]:
    """Search in a loop while ``busy`` is set; the latencies (ms)."""
    latencies: list[float] = []
    n = 0
    while busy.is_set():
        began = time.perf_counter()
        try:
            store.search(queries[n % len(queries)], top_k=TOP_K, collection=name)
        except Exception:  # an empty or not yet loaded collection at the very start
            time.sleep(0.1)
            continue
        latencies.append((time.perf_counter() - began) * 1000)
        n += 1
    return latencies


def stage(ctx: dict[str, Any], start: int, size: int, exact: ExactTopK) -> dict[str, Any]:
    """Grow the collection to ``size`` and measure; the stage's figures."""
    store, name, milvus, pid = ctx["store"], ctx["name"], ctx["milvus"], ctx["pid"]
    busy = threading.Event()
    busy.set()
    during: list[float] = []
    # A store of its own: the writes' client stays the writes'.
    reader = VectorStore(ctx["settings"])
    searcher = threading.Thread(
        target=lambda: during.extend(search_while(reader, name, ctx["queries"], busy))
    )
    searcher.start()
    with CoreSampler([pid]) as cores:
        began = time.monotonic()
        try:
            rate = write(store, name, ctx["vectors"], range(start, size), exact)
        finally:
            busy.clear()
            searcher.join()
            reader.close()
        written = time.monotonic()
        milvus_cores = cores.mean(began, written)
    figures: dict[str, Any] = {
        "vectors": size,
        "write_vectors_per_s": round(rate),
        "write_milvus_cores": milvus_cores,
        "search_during_writes": {
            f"p{q}_ms": round(benchlib.percentile(during, q), 2) for q in (50, 95, 99)
        }
        | {"queries": len(during)},
    }
    cpu_before = cpu_seconds([pid])
    built = settle(milvus.uri, milvus.token, name, size, timeout=ctx["timeout"])
    idle, _ = wait_pid_idle(pid, timeout=ctx["timeout"])
    figures["build_s"] = round(built)
    figures["build_and_idle_s"] = round(built + idle)
    figures["build_milvus_cpu_s"] = round(cpu_seconds([pid]) - cpu_before)
    figures["milvus_rss_mib"] = rss_mib(pid)
    figures["raw_vectors_mib"] = round(size * DIM * 4 / 2**20)
    sets = exact.sets()
    figures["settled"] = timed_search(store, name, ctx["queries"], sets)
    param, values = SWEEP[ctx["index"]]
    sweep = {}
    for value in values:
        spec = IndexSpec(index_type=ctx["index"], metric="COSINE", search_params={param: value})
        tuned = VectorStore(
            ctx["settings"].model_copy(update={"search_params": spec.search_params})
        )
        try:
            sweep[f"{param}={value}"] = timed_search(tuned, name, ctx["queries"], sets)
        finally:
            tuned.close()
    figures["settled_sweep"] = sweep
    figures["top"] = top_snapshot()
    return figures


def print_stage(index: str, f: dict[str, Any]) -> None:
    s, d = f["settled"], f["search_during_writes"]
    print(
        f"{index} {f['vectors']:>9,}: write {f['write_vectors_per_s']:,}/s (Milvus "
        f"{f['write_milvus_cores']} cores); build {f['build_s']} s ({f['build_milvus_cpu_s']} "
        f"CPU-s), RSS {f['milvus_rss_mib']:,} MiB (raw vectors {f['raw_vectors_mib']:,})",
        flush=True,
    )
    print(f"    during writes p50 {d['p50_ms']} p99 {d['p99_ms']} ms (n {d['queries']})")
    print(
        f"    settled p50 {s['p50_ms']} p95 {s['p95_ms']} p99 {s['p99_ms']} ms, "
        f"recall@10 {s['recall_at_10']}"
    )
    for label, t in f["settled_sweep"].items():
        print(
            f"      {label:<10} p50 {t['p50_ms']} p99 {t['p99_ms']} ms, recall {t['recall_at_10']}"
        )


def run_index(
    index: IndexType, args: argparse.Namespace, folder: Path, results: dict[str, Any]
) -> None:
    vectors = Vectors()
    queries = make_queries(vectors, args.queries)
    root = folder / index.lower()
    milvus = MilvusService(StackConfig(root=root, cache=args.cache, milvus_port=args.milvus_port))
    milvus.install()
    milvus.start()
    pid = milvus.process.pid()
    assert pid is not None
    settings = MilvusSettings(
        uri=milvus.uri, token=milvus.token, collection=f"scale_{index.lower()}", index_type=index
    )
    store = VectorStore(settings)
    name = settings.collection
    results[index] = {"stages": []}
    ctx = {
        "store": store,
        "name": name,
        "milvus": milvus,
        "pid": pid,
        "queries": queries,
        "vectors": vectors,
        "index": index,
        "settings": settings,
        "timeout": args.stage_timeout,
    }
    try:
        store.create_collection(name)
        results[index]["index"] = store.describe_collection(name).index.describe()
        exact = ExactTopK(queries)
        start = 0
        for size in sorted(args.sizes):
            figures = stage(ctx, start, size, exact)
            start = size
            results[index]["stages"].append(figures)
            print_stage(index, figures)
            record(args, results)
    finally:
        store.close()
        milvus.reset()
        shutil.rmtree(root, ignore_errors=True)


def record(args: argparse.Namespace, results: dict[str, Any]) -> None:
    headline: dict[str, Any] = {}
    largest = {
        index: r["stages"][-1]
        for index, r in results.items()
        if isinstance(r, dict) and r.get("stages")
    }
    if largest:
        headline["scale_largest_vectors"] = max(s["vectors"] for s in largest.values())
    benchlib.record(
        "scale_1m",
        {
            "sizes": sorted(args.sizes),
            "dimension": DIM,
            "queries": args.queries,
            "by_index": results,
        },
        headline=headline,
        quick=args.quick,
        path=args.results,
    )


def main() -> int:
    """Run every index through every stage, print, record; returns the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--sizes", type=int, nargs="+", default=[100_000, 250_000, 500_000, 1_000_000]
    )
    parser.add_argument("--indexes", nargs="+", default=["HNSW", "IVF_FLAT"], choices=list(SWEEP))
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--cache", type=Path, default=Path(".stack/cache"))
    parser.add_argument("--milvus-port", type=int, default=19860)
    parser.add_argument("--stage-timeout", type=float, default=7_200.0)
    parser.add_argument("--quick", action="store_true", help="stages of 10,000 and 20,000")
    parser.add_argument("--results", type=Path, default=benchlib.DEFAULT_RESULTS)
    args = parser.parse_args()
    benchlib.exit_on_sigterm()
    if args.quick:
        args.sizes, args.queries = [10_000, 20_000], 50
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        for index in args.indexes:
            run_index(index, args, Path(tmp), results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
