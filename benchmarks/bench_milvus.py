"""Upsert throughput and top-10 search latency of the running Milvus server, against numpy.

Builds a collection shaped like the project's (VARCHAR primary key, 1280-d FLOAT_VECTOR, JSON
``metadata``, COSINE, HNSW), upserts ``--count`` synthetic embeddings (clustered, unit-norm, so
nearest neighbours mean something) in batches of 1,000, waits until every sealed segment is
indexed and served, then times single-vector top-10 searches, plain and with a JSON filter. The
baseline is exact brute-force cosine top-10 in numpy over the same vectors, which also gives
the recall of the HNSW answers.

Upserts: a tenth through pymilvus's rows API one batch at a time, then half of the rest through
the rows API with ``--inflight`` batches in flight (against 2.3.5 one upsert stream is bound by
request latency), and the other half as pre-packed requests: pymilvus's own conversion of the
vectors into protobuf costs more CPU than the server's work, which matters on a 2-core machine.

Searches use the collection's default consistency (bounded staleness), as the query path must:
``Strong`` costs a few hundred ms per query. Everything written is flushed and indexed before
the timing starts, so no row is missed.

Needs a running server (``MilvusService.start()``); from the repository root::

    PYTHONPATH=. python benchmarks/bench_milvus.py --uri http://127.0.0.1:19530 --count 100000

This is pymilvus directly (what the server can take); bench_search.py measures the service's own
write path, ``VectorStore.upsert``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from pymilvus import DataType, MilvusClient, connections, utility
from pymilvus.grpc_gen import milvus_pb2, schema_pb2

import benchlib

Matrix = npt.NDArray[np.float32]

UPSERT_TARGET = 5_000.0  # vectors/s
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
    schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("id", DataType.VARCHAR, is_primary=True, max_length=256)
    schema.add_field("vector", DataType.FLOAT_VECTOR, dim=dim)
    schema.add_field("metadata", DataType.JSON)
    index = client.prepare_index_params()
    # Nested "params": milvus-lite ignores the flat form; 2.3.5 takes this one.
    index.add_index(
        field_name="vector",
        index_type="HNSW",
        metric_type="COSINE",
        params={"params": {"M": 16, "efConstruction": 128}},
    )
    client.create_collection(name, schema=schema, index_params=index)  # also loads it


class Upserter:
    """Sends one batch of rows ``[start, stop)``: through the public rows API, or pre-packed."""

    def __init__(
        self, client: MilvusClient, name: str, vectors: Matrix, labels: npt.NDArray[np.int64]
    ) -> None:
        self.client, self.name, self.vectors, self.labels = client, name, vectors, labels

    def rows(self, start: int, stop: int) -> None:
        rows = [
            {"id": row_id(i), "vector": self.vectors[i], "metadata": self.metadata(i)}
            for i in range(start, stop)
        ]
        self.client.upsert(self.name, rows)

    def packed(self, start: int, stop: int) -> None:
        # pymilvus copies vectors into protobuf one Python float at a time (~0.15-0.4 s per
        # 1,000 x 1280-d, more than the server's own work); protobuf can instead parse the
        # packed float32 bytes in one go. Same request on the wire; private stub, bench only.
        raw = np.ascontiguousarray(self.vectors[start:stop], dtype="<f4").tobytes()
        ids = schema_pb2.FieldData(field_name="id", type=DataType.VARCHAR)
        ids.scalars.string_data.data.extend(row_id(i) for i in range(start, stop))
        vec = schema_pb2.FieldData(field_name="vector", type=DataType.FLOAT_VECTOR)
        vec.vectors.dim = self.vectors.shape[1]
        vec.vectors.float_vector.MergeFromString(b"\x0a" + _varint(len(raw)) + raw)
        meta = schema_pb2.FieldData(field_name="metadata", type=DataType.JSON)
        meta.scalars.json_data.data.extend(
            json.dumps(self.metadata(i)).encode() for i in range(start, stop)
        )
        request = milvus_pb2.UpsertRequest(
            collection_name=self.name, num_rows=stop - start, fields_data=[ids, vec, meta]
        )
        status = self.client._get_connection()._stub.Upsert(request).status
        if status.code != 0:
            raise RuntimeError(f"upsert failed: {status.reason}")

    def metadata(self, i: int) -> dict[str, str]:
        return {"category": f"c{self.labels[i] % 10}"}

    def run(
        self, send: Callable[[int, int], None], starts: Sequence[int], batch: int, inflight: int
    ) -> float:
        """Send the batches beginning at ``starts``, ``inflight`` at a time; return vectors/s."""
        total = len(self.vectors)
        count = sum(min(batch, total - start) for start in starts)
        began = time.perf_counter()
        with ThreadPoolExecutor(inflight) as pool:
            # list() re-raises any failure.
            list(pool.map(lambda start: send(start, min(start + batch, total)), starts))
        return count / (time.perf_counter() - began)


def row_id(i: int) -> str:
    return f"img-{i:07d}"


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


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
    parser.add_argument("--batch", type=int, default=1_000)
    parser.add_argument("--inflight", type=int, default=4, help="upsert batches in flight")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--ef", type=int, default=64, help="HNSW search breadth")
    parser.add_argument("--collection", default="bench_milvus")
    parser.add_argument("--keep", action="store_true", help="keep the collection afterwards")
    parser.add_argument("--quick", action="store_true", help="10,000 vectors, 50 queries")
    parser.add_argument("--results", type=Path, default=benchlib.DEFAULT_RESULTS)
    args = parser.parse_args(argv)
    if args.quick:
        args.count, args.queries = 10_000, 50

    if args.count < 10 * args.batch:
        parser.error("--count must be at least 10 batches")
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
    create_collection(client, args.collection, args.dim)
    # A tenth one batch at a time, then half of the rest each way with batches in flight.
    starts = list(range(0, args.count, args.batch))
    tenth, half = len(starts) // 10, (len(starts) + len(starts) // 10) // 2
    upserter = Upserter(client, args.collection, vectors, labels)
    serial = upserter.run(upserter.rows, starts[:tenth], args.batch, 1)
    rate = upserter.run(upserter.rows, starts[tenth:half], args.batch, args.inflight)
    packed = upserter.run(upserter.packed, starts[half:], args.batch, args.inflight)
    settle = wait_indexed(client, args.uri, token, args.collection, args.count, timeout=1_800)

    params = {"metric_type": "COSINE", "params": {"ef": args.ef}}
    found: list[list[str]] = []

    def search(query: Matrix, flt: str = "") -> None:
        hits = client.search(
            args.collection, data=[query], limit=TOP_K, filter=flt, search_params=params
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
    line(f"upsert rows API, batches of {args.batch:,}", f"{serial:8,.0f} vectors/s (1 at a time)")
    for label, value in (("upsert rows API", rate), ("upsert pre-packed requests", packed)):
        line(
            f"{label}, {args.inflight} in flight",
            f"{value:8,.0f} vectors/s  ({value / UPSERT_TARGET:.2f}x the "
            f"{UPSERT_TARGET:,.0f}/s target: {verdict(value >= UPSERT_TARGET)})",
        )
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
            "upsert_rows_serial_per_s": round(serial),
            "upsert_rows_inflight_per_s": round(rate),
            "upsert_packed_inflight_per_s": round(packed),
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
