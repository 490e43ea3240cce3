"""End-to-end ingest (publish -> all stored) against the model alone and a naive loop; memory.

All in one run, on the stack at the given addresses:

1. **ceiling**: the workers' embedding model alone, onnxruntime in-process on ready uint8
   tensors, at the workers' batch size, on every core (the faster of one session with a thread
   per core and one single-threaded session per core): no decode, no transfer, no store. End
   to end cannot beat it.
2. **naive**: one image at a time: read the file, decode, Pillow+numpy preprocess
   (``reference_pixels``), Triton batch 1 (``TritonEmbedder``), ``VectorStore.upsert`` of
   one row.
3. **e2e**: ``trident-worker`` processes (1, then 2) started from this venv on a topic, group
   and collection of their own; a warm-up batch is published and stored first (JAX compiles,
   connections open), then the timed set: 640x480 JPEGs made from scikit-image's photos, and
   separately a set of 12-megapixel JPEGs. Time = first publish to the count reaching the
   total (``VectorStore.count``, strong).
4. **memory + search during ingest**: one worker ingests ``--memory-images`` images while the
   query API (``trident-api``) answers top-10 searches by vector in a loop; the worker's and
   the API's RSS are sampled throughout. The warm-up is one batch (compiles, connections),
   then ``WARM_FILL_BATCHES`` batches published at once, which run the pipeline at its full
   depth. ``worker_rss_growth_ratio`` = RSS at the end / RSS after the warm-up; the RSS after
   the first batch alone, and at each quarter of the run, are recorded beside it.

From the repository root (the test stack's addresses shown)::

    .venv/bin/python benchmarks/bench_e2e.py --kafka 127.0.0.1:29092 \\
        --triton-grpc 127.0.0.1:28001 --milvus http://127.0.0.1:29530 --quick
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnxruntime as ort
from apps import (
    AppProcess,
    add_stack_arguments,
    bench_settings,
    make_large_jpegs,
    milvus_token,
    post_json,
    prepare,
    publish_paths,
    running,
    wait_http,
    wait_stored,
    write_settings,
)
from bench_preprocess import make_jpegs

import benchlib
from engine.images import decode_image
from engine.inference import TritonEmbedder
from engine.models import UINT8_MODEL_SPEC
from engine.records import VectorRecord
from engine.resampling import reference_pixels
from engine.settings import Settings
from model_build.efficientnet_lite import build_embedding_model, load_packaged_weights

# The memory run's warm-up after its first batch: this many batches published at once.
WARM_FILL_BATCHES = 10


def write_jpegs(folder: Path, count: int, seed: int) -> list[Path]:
    paths = []
    for n, jpeg in enumerate(make_jpegs(count, seed=seed)):
        path = folder / f"vga-{seed}-{n:05d}.jpg"
        path.write_bytes(jpeg)
        paths.append(path)
    return paths


def ceiling(batch: int, rounds: int) -> float:
    """Images/s of the workers' model alone in-process on ready tensors, the better of two ways
    to run it on every core (median of ``rounds`` each).

    The model is the one the workers are served (the uint8-pixel graph, ``UINT8_MODEL_SPEC``)
    on ready uint8 batches. It runs once as one session with an intra-op thread per CPU, and
    once as one single-threaded session per CPU, each on its own batch at the same time (how
    Triton runs it: ``ModelSpec.instance_count`` instances of ``intra_op_threads`` 1). The
    higher figure is the ceiling: the conservative choice for the ratio.
    """
    cpus = os.cpu_count() or 1
    model = build_embedding_model(load_packaged_weights(), UINT8_MODEL_SPEC).SerializeToString()
    rng = np.random.default_rng(0)
    tensors = rng.integers(0, 256, (batch, *UINT8_MODEL_SPEC.input_dims), dtype=np.uint8)
    feed = {UINT8_MODEL_SPEC.input_name: tensors}

    def session(threads: int) -> ort.InferenceSession:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        made = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        made.run(None, feed)
        return made

    def timed_round(sessions: list[ort.InferenceSession]) -> float:
        runs = [threading.Thread(target=s.run, args=(None, feed)) for s in sessions]
        began = time.perf_counter()
        for run in runs:  # onnxruntime releases the GIL: the sessions run in parallel
            run.start()
        for run in runs:
            run.join()
        return len(sessions) * batch / (time.perf_counter() - began)

    layouts = {
        f"1 session x {cpus} threads": [session(cpus)],
        f"{cpus} sessions x 1 thread": [session(1) for _ in range(cpus)],
    }
    rates = {
        name: statistics.median(timed_round(sessions) for _ in range(rounds))
        for name, sessions in layouts.items()
    }
    print("ceiling layouts: " + ", ".join(f"{n} {r:.1f} images/s" for n, r in rates.items()))
    return max(rates.values())


def wait_ready(embedder: TritonEmbedder, timeout: float = 120.0) -> None:
    """Wait until Triton serves the model (``is_ready`` only: main's embedder has no waiting).

    Raises:
        TimeoutError: not ready within ``timeout``.
    """
    deadline = time.monotonic() + timeout
    while not embedder.is_ready():
        if time.monotonic() > deadline:
            raise TimeoutError(f"Triton not ready after {timeout:.0f}s")
        time.sleep(0.5)


def naive(settings: Settings, paths: Sequence[Path]) -> float:
    """Images/s of the one-at-a-time loop over ``paths`` into the settings' collection."""
    with TritonEmbedder(settings.triton) as embedder:
        store = prepare(settings)
        try:
            wait_ready(embedder)
            began = time.perf_counter()
            for n, path in enumerate(paths):
                pixels = decode_image(
                    path.read_bytes(),
                    max_pixels=settings.fetch.max_pixels,
                    target_short_side=settings.model.resize_short_side,
                )
                # The default model takes the cropped uint8 pixels (issue 12.3).
                tensor = reference_pixels(pixels.pixels)[np.newaxis]
                vector = embedder.embed(tensor)[0]
                store.upsert(
                    [VectorRecord(id=f"naive-{n:06d}", vector=vector, source=str(path))],
                    settings.milvus.collection,
                )
            return len(paths) / (time.perf_counter() - began)
        finally:
            store.drop_collection(settings.milvus.collection)
            store.close()


def ingest(
    settings: Settings, folder: Path, workers: int, sets: dict[str, list[Path]], warmup: list[Path]
) -> dict[str, float]:
    """Start ``workers`` workers; return images/s for each named set of paths."""
    store = prepare(settings)
    config = write_settings(settings, folder / f"e2e-{workers}.yaml")
    processes = [AppProcess.worker(config, f"bench-w{i}", folder) for i in range(workers)]
    rates: dict[str, float] = {}
    try:
        with running(processes):
            collection = settings.milvus.collection
            publish_paths(settings, warmup, "warm")
            total = len(warmup)
            wait_stored(store, collection, total, processes, timeout=600)
            for name, paths in sets.items():
                began = time.monotonic()
                publish_paths(settings, paths, name)
                total += len(paths)
                done = wait_stored(store, collection, total, processes, timeout=3_600)
                rates[name] = len(paths) / (done - began)
    finally:
        store.drop_collection(settings.milvus.collection)
        store.close()
    return rates


def rss_by_quarter(progress: list[tuple[int, int]], images: int) -> list[float]:
    """Worker RSS (MiB) when a quarter, half, three quarters and all of ``images`` were stored
    (the first sample at or past each mark): a leak climbs through them, a pool levels off."""
    marks = []
    for quarter in (1, 2, 3, 4):
        at = next((rss for done, rss in progress if done >= images * quarter // 4), None)
        if at is None and progress:
            at = progress[-1][1]
        marks.append(round((at or 0) / 2**20, 1))
    return marks


def memory_and_search(
    settings: Settings,
    folder: Path,
    paths: list[Path],
    warmup: list[Path],
    *,
    port: int,
    api_key: str,
) -> dict[str, Any]:
    """One worker ingests ``paths`` while the API is searched by vector; RSS sampled."""
    store = prepare(settings)
    config = write_settings(settings, folder / "memory.yaml")
    worker = AppProcess.worker(config, "bench-mem", folder)
    api = AppProcess.api(config, port, folder)
    headers = {"X-API-Key": api_key} if api_key else {}
    rss: dict[str, list[int]] = {"worker": [], "api": []}
    progress: list[tuple[int, int]] = []  # (images stored since the warm-up, worker RSS)
    latencies: list[float] = []
    stop = threading.Event()
    rng = np.random.default_rng(3)

    def search_loop() -> None:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=headers) as client:
            while not stop.is_set():
                vector = rng.standard_normal(settings.milvus.dimension).astype(np.float32)
                body = {"vector": (vector / np.linalg.norm(vector)).tolist(), "topk": 10}
                began = time.perf_counter()
                response = post_json(client, "/search", body, timeout=30)
                latencies.append((time.perf_counter() - began) * 1000)
                response.raise_for_status()
                time.sleep(0.05)  # a steady trickle of queries, not a load test

    try:
        with running([worker, api]):
            wait_http(f"http://127.0.0.1:{port}/health", api)
            publish_paths(settings, warmup, "warm")
            wait_stored(store, settings.milvus.collection, len(warmup), [worker], timeout=600)
            rss_first_batch = worker.rss_bytes()
            # One batch never has a second in flight: the pipeline's steady state (up to
            # worker.pipeline_depth batches, and the allocator's pools sized for them) is
            # reached only by a stream. Published at once, the fill keeps the pipeline full.
            fill = [paths[n % len(paths)] for n in range(WARM_FILL_BATCHES * len(warmup))]
            publish_paths(settings, fill, "fill")
            warmed = len(warmup) + len(fill)
            wait_stored(store, settings.milvus.collection, warmed, [worker], timeout=600)
            rss_after_warmup = worker.rss_bytes()
            searcher = threading.Thread(target=search_loop, daemon=True)
            publisher = threading.Thread(
                target=publish_paths, args=(settings, paths, "mem"), daemon=True
            )
            searcher.start()
            publisher.start()
            target = warmed + len(paths)
            while (stored := store.count(settings.milvus.collection)) < target:
                worker.check_running()
                rss["worker"].append(worker.rss_bytes())
                progress.append((stored - warmed, rss["worker"][-1]))
                rss["api"].append(api.rss_bytes())
                time.sleep(1.0)
            stop.set()
            searcher.join(60)
            publisher.join(60)
            rss_end = worker.rss_bytes()
            progress.append((len(paths), rss_end))
    finally:
        stop.set()
        store.drop_collection(settings.milvus.collection)
        store.close()
    mib = 2**20
    return {
        "images": len(paths),
        "warmup_images": warmed,
        "worker_rss_first_batch_mib": round(rss_first_batch / mib, 1),
        "worker_rss_after_warmup_mib": round(rss_after_warmup / mib, 1),
        "worker_rss_by_quarter_mib": rss_by_quarter(progress, len(paths)),
        "worker_rss_end_mib": round(rss_end / mib, 1),
        "worker_rss_max_mib": round(max(rss["worker"], default=0) / mib, 1),
        "api_rss_start_mib": round(rss["api"][0] / mib, 1) if rss["api"] else None,
        "api_rss_max_mib": round(max(rss["api"], default=0) / mib, 1),
        "worker_rss_growth_ratio": round(rss_end / max(rss_after_warmup, 1), 3),
        "worker_rss_growth_from_first_batch": round(rss_end / max(rss_first_batch, 1), 3),
        "search_during_ingest_queries": len(latencies),
        "search_vector_p50_ms_during_ingest": round(benchlib.percentile(latencies, 50), 2),
        "search_vector_p99_ms_during_ingest": round(benchlib.percentile(latencies, 99), 2),
    }


def memory_phase(
    args: argparse.Namespace,
    fresh: Callable[..., Settings],
    folder: Path,
    memory: list[Path],
    warmup: list[Path],
) -> dict[str, Any]:
    """Phase 4 (memory + search during ingest), printed."""
    mem = memory_and_search(
        fresh(api={"host": "127.0.0.1", "port": args.api_port}),
        folder,
        memory,
        warmup,
        port=args.api_port,
        api_key=args.api_key,
    )
    print(
        f"memory over {mem['images']} images: worker RSS {mem['worker_rss_first_batch_mib']}"
        f" MiB after the first batch, {mem['worker_rss_after_warmup_mib']} after the warm-up"
        f" ({mem['warmup_images']} images), by quarter {mem['worker_rss_by_quarter_mib']}"
        f" -> {mem['worker_rss_end_mib']} MiB (x{mem['worker_rss_growth_ratio']}; "
        f"x{mem['worker_rss_growth_from_first_batch']} from the first batch), API max "
        f"{mem['api_rss_max_mib']} MiB; search by vector during ingest p50 "
        f"{mem['search_vector_p50_ms_during_ingest']} ms, p99 "
        f"{mem['search_vector_p99_ms_during_ingest']} ms "
        f"({mem['search_during_ingest_queries']} queries)"
    )
    return mem


def main() -> int:
    """Run every phase, print, record; returns the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    add_stack_arguments(parser, api_port=28390)
    parser.add_argument("--images", type=int, default=2_000, help="640x480 JPEGs per run")
    parser.add_argument("--large", type=int, default=64, help="12-megapixel JPEGs per run")
    parser.add_argument("--naive-images", type=int, default=300)
    parser.add_argument("--memory-images", type=int, default=10_000)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch", type=int, default=32, help="worker batch = ceiling batch")
    parser.add_argument(
        "--no-memory", action="store_true", help="skip the memory + search-during-ingest phase"
    )
    parser.add_argument("--quick", action="store_true", help="a few hundred images in all")
    parser.add_argument("--results", type=Path, default=benchlib.DEFAULT_RESULTS)
    args = parser.parse_args()
    benchlib.exit_on_sigterm()
    if args.quick:
        args.images, args.large, args.naive_images, args.memory_images = 64, 2, 16, 96
        args.workers = [1]

    with tempfile.TemporaryDirectory(prefix="bench-e2e-") as tmp, benchlib.LoadSampler() as load:
        folder = Path(tmp)
        vga = write_jpegs(folder, args.images, seed=0)
        warmup = write_jpegs(folder, args.batch, seed=1)
        large = make_large_jpegs(folder, args.large)
        memory = [vga[n % len(vga)] for n in range(args.memory_images)]

        def fresh(**sections: Any) -> Settings:
            return bench_settings(
                kafka=args.kafka,
                triton_grpc=args.triton_grpc,
                milvus=args.milvus,
                milvus_token=milvus_token(args.milvus_token_file),
                image_root=folder,
                batch=args.batch,
                quick=args.quick,
                **sections,
            )

        # Measured before and after the rest: on a shared machine one sample can land in a
        # spike. The higher of the two is the ceiling (the conservative choice for the ratio).
        rounds = 3 if args.quick else 10
        top_before = ceiling(args.batch, rounds)
        slow = naive(fresh(), vga[: args.naive_images])
        print(f"naive one-at-a-time loop ({args.naive_images} images): {slow:.1f} images/s")
        runs: dict[str, dict[str, float]] = {}
        for workers in args.workers:
            runs[str(workers)] = ingest(
                fresh(), folder, workers, {"vga": vga, "12mp": large}, warmup
            )
            rate = runs[str(workers)]
            print(
                f"e2e, {workers} worker(s): {len(vga)} 640x480 at {rate['vga']:.1f} images/s "
                f"(x{rate['vga'] / top_before:.2f} first ceiling, "
                f"x{rate['vga'] / slow:.2f} naive); "
                f"{len(large)} 12-MP at {rate['12mp']:.1f} images/s"
            )
        mem = None if args.no_memory else memory_phase(args, fresh, folder, memory, warmup)
        top_after = ceiling(args.batch, rounds)
        top = max(top_before, top_after)
    print(
        f"ceiling: model alone in-process, batch {args.batch}: {top:.1f} images/s "
        f"(before {top_before:.1f}, after {top_after:.1f})"
    )
    print(load.describe())
    best = max(runs.values(), key=lambda r: r["vga"])["vga"]
    benchlib.record(
        "e2e",
        {
            "ceiling_images_per_s": round(top, 1),
            "ceiling_before_after": [round(top_before, 1), round(top_after, 1)],
            "naive_images_per_s": round(slow, 1),
            "by_workers": runs,
            "images": len(vga),
            "large_images": len(large),
            "batch": args.batch,
            "memory": mem,
        },
        headline={
            "e2e_images_per_s": round(best, 1),
            "e2e_over_ceiling": round(best / top, 3),
            "e2e_over_naive": round(best / slow, 3),
            "e2e_12mp_images_per_s": round(max(r["12mp"] for r in runs.values()), 1),
            **({} if mem is None else {"worker_rss_growth_ratio": mem["worker_rss_growth_ratio"]}),
        },
        sampler=load,
        quick=args.quick,
        path=args.results,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
