"""Search through the HTTP query API by index type, and the service's Milvus write path.

For each of FLAT, IVF_FLAT and HNSW: a collection of ``--count`` synthetic unit-norm 1280-d
vectors (clustered, see ``bench_milvus.make_vectors``) is created with ``VectorStore`` and
filled through ``VectorStore.upsert`` in batches of ``--upsert-batch`` (the worker's write path,
one batch at a time: ``milvus_upsert_vectors_per_s``; its first tenth through pymilvus's rows
API, the path before issue 12, as the baseline), flushed, compacted and indexed, and queried
once Milvus is idle (each index alone, its collection dropped before the next). Then a
``trident-api`` process started from this venv answers ``POST /search`` sequentially:

- by vector (JSON ``vector``): near-duplicate queries, p50/p95/p99, QPS, and recall@10 against
  exact brute-force cosine top-10 in numpy over the same vectors;
- by id (JSON ``id``): a stored id, whose vector the API fetches then searches with;
- by image (multipart ``file``, a 640x480 JPEG): decode, preprocess, Triton, search;
- by vector on the HNSW collection while a ``trident-worker`` ingests ``--ingest-images``
  JPEGs into a collection of its own (``search_vector_p99_ms_during_ingest``).

Where the time goes: each answer's ``Server-Timing`` header (query_api.timing) gives its
stages (decode, preprocess, embed, lookup, search), summarised per stage with p50/p95/p99, and
``overhead`` (the client's latency minus the stages: HTTP, JSON, thread hops); Triton's own
statistics over the by-image queries split ``embed`` into its queue wait and model compute.

QPS is sequential (one client): 1 / mean latency. From the repository root::

    .venv/bin/python benchmarks/bench_search.py --milvus http://127.0.0.1:29530 \\
        --triton-grpc 127.0.0.1:28001 --kafka 127.0.0.1:29092 --quick
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import httpx
import numpy as np
import tritonclient.grpc as grpcclient
from apps import (
    AppProcess,
    add_stack_arguments,
    bench_settings,
    milvus_token,
    post_json,
    prepare,
    publish_paths,
    running,
    wait_http,
    write_settings,
)
from bench_milvus import make_vectors
from bench_preprocess import make_jpegs
from pymilvus import MilvusClient, connections, utility

import benchlib
from engine.indexes import IndexSpec, IndexType
from engine.records import VectorRecord
from engine.settings import MilvusSettings, Settings
from engine.store import VectorStore

TOP_K = 10
INDEXES: tuple[IndexType, ...] = ("FLAT", "IVF_FLAT", "HNSW")
# Triton's cumulative per-model durations that make up one request's time in the server.
TRITON_PHASES = ("queue", "compute_input", "compute_infer", "compute_output")


class Answer(NamedTuple):
    """One search answer: its hits and its stages (ms) from ``Server-Timing``."""

    hits: list[dict[str, Any]]
    stages: dict[str, float]


def stages_of(response: httpx.Response) -> dict[str, float]:
    """``{stage: ms}`` from a ``Server-Timing`` header (empty when the API sends none)."""
    stages: dict[str, float] = {}
    for part in filter(None, response.headers.get("server-timing", "").split(",")):
        name, _, duration = part.strip().partition(";dur=")
        stages[name] = stages.get(name, 0.0) + float(duration or 0)
    return stages


def stage_summary(latencies: list[float], answers: list[Answer]) -> dict[str, dict[str, float]]:
    """p50/p95/p99 of each stage, and of ``overhead``: latency minus the stages' sum."""
    names = list(dict.fromkeys(name for answer in answers for name in answer.stages))  # in order
    summaries = {name: [a.stages.get(name, 0.0) for a in answers] for name in names}
    summaries["overhead"] = [
        total - sum(a.stages.values()) for total, a in zip(latencies, answers, strict=True)
    ]
    return {name: percentiles(values) for name, values in summaries.items()}


def triton_totals(url: str, model: str) -> dict[str, float]:
    """Triton's cumulative request count and per-phase nanoseconds for ``model``."""
    with grpcclient.InferenceServerClient(url=url) as client:
        stats = client.get_inference_statistics(model, as_json=True)["model_stats"][0]
    phases = stats["inference_stats"]
    totals = {name: float(phases[name].get("ns", 0)) for name in TRITON_PHASES}
    totals["requests"] = float(phases["success"].get("count", 0))
    return totals


def triton_per_request(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Mean ms per request in each phase between two :func:`triton_totals` (all clients')."""
    requests = after["requests"] - before["requests"]
    per = {
        f"{name}_ms": round((after[name] - before[name]) / max(requests, 1) / 1e6, 2)
        for name in TRITON_PHASES
    }
    return {**per, "requests": requests}


def index_spec(index_type: IndexType, count: int) -> IndexSpec:
    # IVF's k-means wants tens of vectors per list: fewer lists for the quick sizes.
    params = {"nlist": max(16, min(1024, count // 100))} if index_type == "IVF_FLAT" else {}
    return IndexSpec(index_type=index_type, metric="COSINE", params=params)


def fill(
    store: VectorStore, milvus: MilvusSettings, name: str, vectors: np.ndarray, batch: int
) -> tuple[float, float]:
    """Upsert every vector, the first tenth through pymilvus's rows API (the write path before
    issue 12), the rest through ``VectorStore.upsert``; return both in vectors/s."""
    records = [
        VectorRecord(id=f"v-{i:07d}", vector=v, metadata={"n": i}) for i, v in enumerate(vectors)
    ]
    tenth = len(records) // 10
    rows_api = MilvusClient(uri=milvus.uri, token=milvus.token)
    began = time.perf_counter()
    for start in range(0, tenth, batch):
        rows_api.upsert(name, data=[r.to_row() for r in records[start : min(start + batch, tenth)]])
    baseline = tenth / (time.perf_counter() - began)
    rows_api.close()
    began = time.perf_counter()
    for start in range(tenth, len(records), batch):
        store.upsert(records[start : start + batch], name)
    return (len(records) - tenth) / (time.perf_counter() - began), baseline


def settle(uri: str, token: str, name: str, count: int, timeout: float) -> float:
    """Flush, compact, then wait until the index covers every row and is served; return seconds.

    A bulk load leaves several small sealed segments, which Milvus merges on its own minutes
    later and then indexes again: queries timed meanwhile measure that work, not the search.
    Compacting at once, and waiting for the merged segments' index, leaves it nothing to do.

    Raises:
        TimeoutError: not compacted, indexed and served within ``timeout``.
    """
    began = time.perf_counter()
    client = MilvusClient(uri=uri, token=token)
    try:
        client.flush(name)
        job = client.compact(name)
        index = client.list_indexes(name)[0]
        while time.perf_counter() - began < timeout:
            described = client.describe_index(name, index)
            if (
                client.get_compaction_state(job) == "Completed"
                and int(described.get("indexed_rows", 0)) >= count
                and int(described.get("pending_index_rows", 0)) == 0
                and served(uri, token, name) >= count
            ):
                return time.perf_counter() - began
            time.sleep(1.0)
    finally:
        client.close()
    raise TimeoutError(f"{name}: not compacted, indexed and served after {timeout:.0f}s")


def served(uri: str, token: str, name: str) -> int:
    """Rows in the sealed segments the query nodes serve (with their index, once handed off).

    Until the handoff, fresh rows are searched from a temporary index, which lowers recall.
    """
    connections.connect(alias="bench-search", uri=uri, token=token)
    return sum(s.num_rows for s in utility.get_query_segment_info(name, using="bench-search"))


def during_ingest(
    settings: Settings,
    folder: Path,
    images: int,
    *,
    search: Callable[..., Answer],
    queries: np.ndarray,
) -> dict[str, Any]:
    """Search by vector in a loop while one worker ingests ``images`` JPEGs elsewhere.

    The worker writes its own collection on the same Milvus: the contention measured is for
    the server's CPU and the machine's, as in production, not for one collection's segments.
    """
    paths = []
    for n, jpeg in enumerate(make_jpegs(images, seed=9)):
        paths.append(folder / f"ingest-{n:05d}.jpg")
        paths[-1].write_bytes(jpeg)
    store = prepare(settings)
    worker = AppProcess.worker(write_settings(settings, folder / "ingest.yaml"), "bench-i", folder)
    latencies: list[float] = []
    answers: list[Answer] = []
    try:
        with running([worker]):
            publisher = threading.Thread(target=publish_paths, args=(settings, paths, "i"))
            publisher.start()
            n = 0
            while store.count(settings.milvus.collection) < images:
                worker.check_running()
                for query in queries[n % len(queries) :][:20]:
                    began = time.perf_counter()
                    answers.append(search(vector=query.tolist()))
                    latencies.append((time.perf_counter() - began) * 1000)
                n += 20
            publisher.join(60)
    finally:
        store.drop_collection(settings.milvus.collection)
        store.close()
    # The stages say whether a slow answer waited in Milvus or in the API's process.
    return {"images": images, **summary(latencies), "stages": stage_summary(latencies, answers)}


def timed(calls: list[Callable[[], Answer]]) -> tuple[list[float], list[Answer]]:
    """Latencies (ms) and answers of each call, in order, after two untimed warm-up calls."""
    for call in calls[:2]:
        call()
    latencies, answers = [], []
    for call in calls:
        began = time.perf_counter()
        answers.append(call())
        latencies.append((time.perf_counter() - began) * 1000)
    return latencies, answers


class Workload(NamedTuple):
    """The queries every index answers: vectors with their exact top-10, ids, JPEGs."""

    queries: np.ndarray
    exact: list[set[int]]
    picked: np.ndarray
    jpegs: list[bytes]


def query_all(
    post: Callable[..., Answer],
    upload: Callable[[bytes, str], Answer],
    name: str,
    *,
    work: Workload,
    triton_url: str,
    model: str,
) -> dict[str, Any]:
    """By vector (with recall@10), by id and by image on collection ``name``, sequentially."""
    queries, exact, picked, jpegs = work
    by_vector, answers = timed(
        [partial(post, vector=q.tolist(), topk=TOP_K, collection_name=name) for q in queries]
    )
    found = [{int(h["id"][2:]) for h in a.hits} for a in answers]
    recall = float(np.mean([len(f & e) / TOP_K for f, e in zip(found, exact, strict=True)]))
    by_id, id_answers = timed(
        [partial(post, id=f"v-{i:07d}", topk=TOP_K, collection_name=name) for i in picked]
    )
    triton_before = triton_totals(triton_url, model)
    by_image, image_answers = timed([partial(upload, j, name) for j in jpegs])
    triton = triton_per_request(triton_before, triton_totals(triton_url, model))
    return {
        "vector": summary(by_vector),
        "id": summary(by_id),
        "image": summary(by_image),
        "recall_at_10": round(recall, 3),
        "stages": {
            "vector": stage_summary(by_vector, answers),
            "id": stage_summary(by_id, id_answers),
            "image": stage_summary(by_image, image_answers),
        },
        "triton_during_image": triton,
    }


def percentiles(values: list[float]) -> dict[str, float]:
    return {f"p{q}_ms": round(benchlib.percentile(values, q), 2) for q in (50, 95, 99)}


def summary(latencies: list[float]) -> dict[str, float]:
    return {
        **percentiles(latencies),
        "qps": round(1000 / (sum(latencies) / len(latencies)), 1),
        "queries": len(latencies),
    }


def print_stages(stages: dict[str, dict[str, float]]) -> None:
    for stage, t in stages.items():
        print(
            f"      {stage:<10} p50 {t['p50_ms']:7.1f}  p95 {t['p95_ms']:7.1f}  "
            f"p99 {t['p99_ms']:7.1f} ms"
        )


def main() -> int:
    """Run, print, record; returns the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    add_stack_arguments(parser, api_port=28391)
    parser.add_argument("--count", type=int, default=100_000)
    parser.add_argument("--upsert-batch", type=int, default=2_000)
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--image-queries", type=int, default=100)
    parser.add_argument(
        "--ingest-images", type=int, default=1_000, help="ingested while searching (0: skip)"
    )
    parser.add_argument("--indexes", nargs="+", default=list(INDEXES), choices=INDEXES)
    parser.add_argument("--quick", action="store_true", help="5,000 vectors, 40 queries")
    parser.add_argument("--results", type=Path, default=benchlib.DEFAULT_RESULTS)
    args = parser.parse_args()
    benchlib.exit_on_sigterm()
    if args.quick:
        args.count, args.queries, args.image_queries, args.ingest_images = 5_000, 40, 10, 32

    vectors, _labels = make_vectors(args.count, 1280, seed=0)
    rng = np.random.default_rng(1)
    picked = rng.choice(args.count, args.queries, replace=False)
    queries = vectors[picked] + 0.02 * rng.standard_normal((args.queries, 1280), np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    scores = queries @ vectors.T
    exact = [set(np.argsort(-row)[:TOP_K].tolist()) for row in scores]
    work = Workload(queries, exact, picked, make_jpegs(args.image_queries, seed=5))
    headers = {"X-API-Key": args.api_key} if args.api_key else {}
    figures: dict[str, dict[str, Any]] = {}
    main_index = "HNSW" if "HNSW" in args.indexes else args.indexes[0]
    during: dict[str, Any] = {}

    with tempfile.TemporaryDirectory(prefix="bench-search-") as tmp, benchlib.LoadSampler() as load:
        folder = Path(tmp)
        settings = bench_settings(
            kafka=args.kafka,
            triton_grpc=args.triton_grpc,
            milvus=args.milvus,
            milvus_token=milvus_token(args.milvus_token_file),
            image_root=folder,
            quick=args.quick,
        )
        store = VectorStore(settings.milvus)
        names = {kind: f"{settings.milvus.collection}_{kind.lower()}" for kind in args.indexes}
        api = AppProcess.api(write_settings(settings, folder / "api.yaml"), args.api_port, folder)
        try:
            with running([api]):
                wait_http(f"http://127.0.0.1:{args.api_port}/health", api)
                base = f"http://127.0.0.1:{args.api_port}"
                with httpx.Client(base_url=base, headers=headers, timeout=60) as http:

                    def post(**body: Any) -> Answer:
                        response = post_json(http, "/search", body)
                        response.raise_for_status()
                        return Answer(response.json(), stages_of(response))

                    def upload(jpeg: bytes, name: str) -> Answer:
                        response = http.post(
                            "/search",
                            files={"file": ("q.jpg", jpeg, "image/jpeg")},
                            data={"topk": str(TOP_K), "collection_name": name},
                        )
                        response.raise_for_status()
                        return Answer(response.json(), stages_of(response))

                    # One index at a time, each queried alone once Milvus is idle: with all
                    # three loaded, the later ones' builds and compactions ran during the
                    # earlier ones' queries and were what those measured.
                    for kind, name in names.items():
                        store.create_collection(
                            name,
                            index=index_spec(kind, args.count),
                            model_tag=settings.triton.model_tag,
                        )
                        rate, rows_api_rate = fill(
                            store, settings.milvus, name, vectors, args.upsert_batch
                        )
                        token = settings.milvus.token
                        seconds = settle(args.milvus, token, name, args.count, timeout=1_800)
                        idle_after, idle_cores = benchlib.wait_idle("milvus", window=15.0)
                        figures[kind] = {
                            "upsert_vectors_per_s": round(rate),
                            "upsert_rows_api_vectors_per_s": round(rows_api_rate),
                            "settle_s": round(seconds),
                            "milvus_idle_after_s": round(idle_after),
                            "milvus_cores_when_idle": round(idle_cores, 3),
                        }
                        with benchlib.LoadSampler() as queried:
                            figures[kind].update(
                                query_all(
                                    post,
                                    upload,
                                    name,
                                    work=work,
                                    triton_url=args.triton_grpc,
                                    model=settings.triton.model_name,
                                )
                            )
                        figures[kind]["load_while_queried"] = queried.summary()
                        if kind == main_index and args.ingest_images:
                            during = during_ingest(
                                settings,
                                folder,
                                args.ingest_images,
                                search=partial(post, topk=TOP_K, collection_name=name),
                                queries=queries,
                            )
                        store.drop_collection(name)
        finally:
            for name in names.values():
                if store.collection_exists(name):
                    store.drop_collection(name)
            store.close()

    print(f"search through the query API, {args.count:,} vectors x 1280-d, top-{TOP_K}, sequential")
    for kind, f in figures.items():
        rate, recall = f["upsert_vectors_per_s"], f["recall_at_10"]
        base = f["upsert_rows_api_vectors_per_s"]
        print(
            f"  {kind}: upsert {rate:,} vectors/s (rows API {base:,}: x{rate / base:.2f}), "
            f"recall@10 {recall}"
        )
        cores = f["load_while_queried"]["cpu_cores_by_role"]
        print(
            f"    indexed and served in {f['settle_s']} s, Milvus idle "
            f"{f['milvus_idle_after_s']} s later; cores while queried: "
            f"Milvus {cores.get('milvus', 0):.2f}, "
            f"Triton {cores.get('triton', 0):.2f}, API {cores.get('query-api', 0):.2f}"
        )
        for what in ("vector", "id", "image"):
            s = f[what]
            print(
                f"    by {what:<6} p50 {s['p50_ms']:7.1f}  p95 {s['p95_ms']:7.1f}  "
                f"p99 {s['p99_ms']:7.1f} ms  {s['qps']:6.1f} q/s"
            )
            print_stages(f["stages"][what])
        t = f["triton_during_image"]
        print(
            f"    Triton per request while searching by image ({t['requests']:.0f} requests, "
            f"all clients): queue {t['queue_ms']:.1f}, input {t['compute_input_ms']:.1f}, "
            f"model {t['compute_infer_ms']:.1f}, output {t['compute_output_ms']:.1f} ms"
        )
    if during:
        print(
            f"  {main_index} by vector while a worker ingests {during['images']} images: "
            f"p50 {during['p50_ms']:.1f}  p99 {during['p99_ms']:.1f} ms "
            f"({during['queries']:.0f} queries)"
        )
        print_stages(during["stages"])
    print(load.describe())
    benchlib.record(
        "search",
        {
            "count": args.count,
            "by_index": figures,
            "upsert_batch": args.upsert_batch,
            "vector_during_ingest": during,
        },
        headline={
            "milvus_upsert_vectors_per_s": max(f["upsert_vectors_per_s"] for f in figures.values()),
            "search_vector_p99_ms": figures[main_index]["vector"]["p99_ms"],
            "search_image_p99_ms": figures[main_index]["image"]["p99_ms"],
            "search_id_p99_ms": figures[main_index]["id"]["p99_ms"],
            "search_recall_at_10": figures[main_index]["recall_at_10"],
            "search_index": main_index,
            **({"search_vector_p99_ms_during_ingest": during["p99_ms"]} if during else {}),
        },
        sampler=load,
        quick=args.quick,
        path=args.results,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
