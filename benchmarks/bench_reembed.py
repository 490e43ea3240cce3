"""Changing the model: rebuild rate against the ingest rate, and searches during a rebuild.

Issue 23: "rebuild rate (images/s) against the ingest figure of the same run, and search p99
during a rebuild". One run, on the quick start (default) or on a stack of its own
(``--own-stack DIR --port-offset N``: ports as the test stack's, 29092 + N ..., started here and
stopped at the end):

1. ``--images`` derived JPEGs (``devstack.samples.derived_image_set``) are published as path
   events into a topic and collection of the benchmark's own and ingested by one worker serving
   Lite0 (after a warm-up batch, so JAX's compiles are not timed): ``ingest_images_per_s``.
2. The query API answers searches sequentially, by vector (stored Lite0 vectors) and by image
   (the JPEGs, uploaded) in turn, for ``--window`` s with nothing else running: p50/p99 before.
3. ``reembed.rebuild.start`` (what ``trident-reembed start`` runs) migrates the collection to an
   alias of ``<name>_v1``, creates ``<name>_v2`` bound to ``--model`` (Lite2 by default, loaded
   into the stack's Triton when not served) and starts one rebuild worker. The searches go on
   until the new version holds as many rows as the old: p50/p99 during the rebuild, and the
   rebuild rate: rows/s from the first rows seen in the new version to the last
   (``rebuild_rows_per_s``; the worker's start and JAX compiles are before the first rows),
   and over the whole wall time from ``start`` (``rebuild_rows_per_s_wall``).
   ``rebuild_to_ingest_ratio`` = rebuild rows/s over ingest images/s.
4. ``reembed.rebuild.switch`` moves the alias (its compare step is given an empty report: the
   compare is not what is timed here): the first image search the new version answers is
   timed apart (the API makes the new model's client, JAX compiles included, on its first
   image query: ``first_image_query_of_new_version_ms``), then p50/p99 of the searches of the
   next ``--window`` s, and the longest search from the switch on (``max_ms``).

The collections, the topic's group and the rebuild's state are removed at the end. Figures merge
into ``bench/results/latest.json`` (section ``reembed``; headline ``reembed_rebuild_rows_per_s``,
``reembed_rebuild_to_ingest_ratio``, ``reembed_search_p99_ms_during_rebuild``), with the load
average and ``top`` before and after (what else ran). From the repository root::

    .venv/bin/python benchmarks/bench_reembed.py                       # the quick start's stack
    .venv/bin/python benchmarks/bench_reembed.py --own-stack /tmp/r-stack --port-offset 900
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import httpx
from apps import (
    AppProcess,
    bench_settings,
    post_json,
    publish_paths,
    running,
    wait_http,
    write_settings,
)
from bench_growing import top_snapshot

import benchlib
from devstack.config import StackConfig
from devstack.samples import derived_image_set
from devstack.stack import LocalStack
from engine.errors import UnknownCollectionError
from engine.kafka import delete_consumer_group, ensure_topics
from engine.records import VECTOR_FIELD
from engine.settings import Settings
from engine.store import VectorStore
from reembed import local, rebuild
from reembed.plan import alias_folder, load_state, remove_state

TOP_K = 10
WARMUP_IMAGES = 32
NEW_MODEL = "efficientnet_lite2_embedding_uint8"


class Answer(NamedTuple):
    at: float  # monotonic time the answer came
    kind: str
    ms: float
    collection: str


class Searcher:
    """Sequential searches through the API, by vector and by image in turn, in a thread."""

    def __init__(
        self, http: httpx.Client, alias: str, vectors: list[list[float]], jpegs: list[bytes]
    ):
        self.http, self.alias, self.vectors, self.jpegs = http, alias, vectors, jpegs
        self.answers: list[Answer] = []
        self.errors = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._n = 0

    def one(self) -> None:
        self._n += 1
        kind = "vector" if self._n % 2 else "image"
        began = time.perf_counter()
        if kind == "vector":
            body = {"vector": self.vectors[self._n % len(self.vectors)], "topk": TOP_K}
            response = post_json(self.http, "/search", {**body, "collection_name": self.alias})
        else:
            jpeg = self.jpegs[self._n % len(self.jpegs)]
            response = self.http.post(
                "/search",
                files={"file": ("q.jpg", jpeg, "image/jpeg")},
                data={"topk": str(TOP_K), "collection_name": self.alias},
            )
        ms = (time.perf_counter() - began) * 1000
        if response.status_code != 200:
            self.errors += 1
            return
        collection = response.headers.get("trident-collection", "")
        self.answers.append(Answer(time.monotonic(), kind, ms, collection))

    def _run(self) -> None:
        while not self._stop.is_set():
            self.one()

    @contextlib.contextmanager
    def running(self) -> Iterator[Searcher]:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="searcher", daemon=True)
        self._thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            self._thread.join()

    def between(self, start: float, end: float) -> dict[str, Any]:
        """p50/p99 of each kind for the answers that came in [start, end]."""
        out: dict[str, Any] = {"errors": self.errors}
        for kind in ("vector", "image"):
            ms = [a.ms for a in self.answers if a.kind == kind and start <= a.at <= end]
            out[kind] = {
                "queries": len(ms),
                "p50_ms": round(benchlib.percentile(ms, 50), 1),
                "p99_ms": round(benchlib.percentile(ms, 99), 1),
            }
        answered = {a.collection for a in self.answers if start <= a.at <= end}
        out["answered_by"] = sorted(answered)
        return out


def wait_rows(
    store: VectorStore, name: str, count: int, worker: AppProcess, timeout: float
) -> float:
    """Wait until ``name`` holds ``count`` rows; the monotonic time it did.

    Raises:
        RuntimeError: the worker exited; TimeoutError: not stored within ``timeout``.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        worker.check_running()
        with contextlib.suppress(UnknownCollectionError):
            if store.count(name) >= count:
                return time.monotonic()
        time.sleep(0.25)
    raise TimeoutError(f"{name}: fewer than {count} rows after {timeout:.0f}s")


def follow_rebuild(
    store: VectorStore, new: str, target: int, timeout: float
) -> tuple[float, int, float]:
    """Poll the new version's rows until ``target``: (when rows were first seen, how many, when
    the last was).

    Raises:
        TimeoutError: not caught up within ``timeout``.
    """
    first: tuple[float, int] | None = None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = 0
        with contextlib.suppress(UnknownCollectionError):
            rows = store.count(new)
        now = time.monotonic()
        if rows and first is None:
            first = (now, rows)
        if rows >= target:
            seen, at_first = first or (now, rows)
            return seen, at_first, now
        time.sleep(0.25)
    raise TimeoutError(f"{new}: fewer than {target} rows after {timeout:.0f}s")


def first_answer_from(searcher: Searcher, collection: str, kind: str, timeout: float) -> Answer:
    """The first search of ``kind`` that ``collection`` answered.

    Raises:
        TimeoutError: none within ``timeout``.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        after = [a for a in searcher.answers if a.collection == collection and a.kind == kind]
        if after:
            return after[0]
        time.sleep(0.1)
    raise TimeoutError(f"no search answered within {timeout:.0f}s of the switch")


def stack_of(args: argparse.Namespace) -> LocalStack:
    if args.own_stack is None:
        return LocalStack(StackConfig())
    offset = args.port_offset
    return LocalStack(
        StackConfig.test_stack(args.own_stack, Path(".stack/cache").resolve(), offset)
    )


def settings_for(stack: LocalStack, folder: Path, args: argparse.Namespace) -> Settings:
    config = stack.config
    return bench_settings(
        kafka=config.kafka_bootstrap,
        triton_grpc=config.triton_grpc_url,
        milvus=config.milvus_uri,
        milvus_token=stack.milvus.token,
        image_root=folder,
        quick=args.quick,
        reembed={"state_dir": str(folder / "reembed"), "compare_sample": 10},
        api={"port": args.api_port},
    )


def measure(stack: LocalStack, args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    settings = settings_for(stack, folder / "images", args)
    alias = settings.milvus.collection
    paths = derived_image_set(folder / "images", args.images + WARMUP_IMAGES)
    warm, timed = paths[:WARMUP_IMAGES], paths[WARMUP_IMAGES:]
    ensure_topics(settings.kafka)
    store = VectorStore(settings.milvus)
    store.create_collection(
        alias, model_tag=settings.triton.model_tag, model_name=settings.triton.model_name
    )
    config = write_settings(settings, folder / "bench.yaml")
    worker = AppProcess.worker(config, "worker-1", folder)
    api = AppProcess.api(config, args.api_port, folder)
    figures: dict[str, Any] = {"images": args.images, "new_model": args.model}
    try:
        with running([worker, api]):
            publish_paths(settings, warm, "warm")
            wait_rows(store, alias, len(warm), worker, timeout=900)
            began = time.monotonic()
            publish_paths(settings, timed, "img")
            done = wait_rows(store, alias, len(paths), worker, timeout=1800)
            figures["ingest_s"] = round(done - began, 1)
            figures["ingest_images_per_s"] = round(args.images / (done - began), 2)
            print(f"ingest: {args.images} images in {done - began:.1f}s", flush=True)
            figures.update(rebuild_phase(store, settings, stack, args, paths, api))
    finally:
        cleanup(store, settings, alias)
        store.close()
    figures["rebuild_to_ingest_ratio"] = round(
        figures["rebuild_rows_per_s"] / figures["ingest_images_per_s"], 3
    )
    return figures


def rebuild_phase(  # noqa: PLR0917 - the run's pieces, named at the one call
    store: VectorStore,
    settings: Settings,
    stack: LocalStack,
    args: argparse.Namespace,
    paths: list[Path],
    api: AppProcess,
) -> dict[str, Any]:
    alias = settings.milvus.collection
    ids = [f"img-{n:06d}" for n in range(0, args.images, max(1, args.images // 20))]
    vectors = [
        list(map(float, row[VECTOR_FIELD])) for row in store.get(ids, alias, with_vectors=True)
    ]
    jpegs = [path.read_bytes() for path in paths[:20]]
    out: dict[str, Any] = {}
    with httpx.Client(base_url=f"http://127.0.0.1:{args.api_port}", timeout=120) as http:
        wait_http(f"http://127.0.0.1:{args.api_port}/health", api)
        searcher = Searcher(http, alias, vectors, jpegs)
        for _ in range(4):
            searcher.one()  # warm-up: connections, the API's first Triton call
        searcher.answers.clear()
        with searcher.running():
            t0 = time.monotonic()
            time.sleep(args.window)
            t1 = time.monotonic()
            out["search_before"] = searcher.between(t0, t1)
            started = rebuild.start(
                settings,
                store,
                alias,
                args.model,
                workers=1,
                serve=lambda name: served(stack, name),
            )
            state = started.state
            out["migration_window_ms"] = (
                None if started.migration is None else round(started.migration.window_s * 1000, 1)
            )
            target = store.count(state.old)
            first, rows_at_first, last = follow_rebuild(store, state.new, target, timeout=3600)
            out["rebuild_rows"] = target
            out["rebuild_s"] = round(last - t1, 1)
            out["rebuild_rows_per_s_wall"] = round(target / (last - t1), 2)
            out["rebuild_first_rows_after_s"] = round(first - t1, 1)
            # From the first rows seen: the worker's start and compiles are before them.
            steady = last - first
            out["rebuild_rows_per_s"] = (
                round((target - rows_at_first) / steady, 2) if steady > 0 else None
            )
            out["search_during"] = searcher.between(t1, last)
            print(f"rebuild: {target} rows in {last - t1:.1f}s", flush=True)
            switched_at = time.monotonic()
            rebuild.switch(
                settings,
                store,
                alias,
                max_lag=args.max_lag,
                max_missing=0,
                force=False,
                compare=lambda _state: {"lines": [], "new_is_worse": False},
                show=lambda _lines: None,
            )
            t2 = time.monotonic()
            out["switch_ms"] = round((t2 - switched_at) * 1000, 1)
            # A search that began before the switch is answered by the old version; the API
            # makes the new model's client on its first image query: timed apart.
            first_after = first_answer_from(searcher, state.new, "image", timeout=600)
            out["first_image_query_of_new_version_ms"] = round(first_after.ms, 1)
            time.sleep(args.window)
            t3 = time.monotonic()
        out["search_after_switch"] = searcher.between(first_after.at + 1e-6, t3)
        out["search_after_switch"]["max_ms"] = round(
            max(a.ms for a in searcher.answers if a.at >= t2), 1
        )
    return out


def served(stack: LocalStack, name: str) -> None:
    """Load ``name`` into the stack's running Triton (``trident-stack models add``)."""
    stack.serve_models([name])


def cleanup(store: VectorStore, settings: Settings, alias: str) -> None:
    """Stop the rebuild worker, drop the versions, the alias, the groups and the state."""
    state_dir = settings.reembed.state_dir
    state = load_state(state_dir, alias)
    local.stop_workers(alias_folder(state_dir, alias), timeout_s=30)
    with contextlib.suppress(Exception):
        store.drop_alias(alias)
    for name in store.list_collections():
        if name == alias or name.startswith(f"{alias}_v"):
            with contextlib.suppress(UnknownCollectionError):
                store.drop_collection(name)
    groups = [settings.kafka.group_id] + ([state.group] if state else [])
    for group in groups:
        with contextlib.suppress(Exception):
            delete_consumer_group(settings.kafka, group, timeout_s=30)
    remove_state(state_dir, alias)


def describe(figures: dict[str, Any]) -> list[str]:
    def searches(name: str) -> str:
        s = figures[name]
        return (
            f"vector p50 {s['vector']['p50_ms']} / p99 {s['vector']['p99_ms']} ms "
            f"({s['vector']['queries']}), image p50 {s['image']['p50_ms']} / p99 "
            f"{s['image']['p99_ms']} ms ({s['image']['queries']}); errors {s['errors']}"
        )

    return [
        f"ingest (Lite0, 1 worker): {figures['images']} images in {figures['ingest_s']} s = "
        f"{figures['ingest_images_per_s']} images/s",
        f"rebuild ({figures['new_model']}, 1 worker, searches meanwhile): "
        f"{figures['rebuild_rows']} rows in {figures['rebuild_s']} s from start "
        f"(first rows after {figures['rebuild_first_rows_after_s']} s) = "
        f"{figures['rebuild_rows_per_s']} rows/s from the first rows, "
        f"{figures['rebuild_rows_per_s_wall']} from start; "
        f"x{figures['rebuild_to_ingest_ratio']} of the ingest rate; migration window "
        f"{figures['migration_window_ms']} ms",
        f"search before:        {searches('search_before')}",
        f"search during:        {searches('search_during')}",
        f"switch {figures['switch_ms']} ms; the new version's first image query "
        f"{figures['first_image_query_of_new_version_ms']} ms (the API's new model client)",
        f"search after switch:  {searches('search_after_switch')}",
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--window", type=float, default=30.0, help="s of searches before/after")
    parser.add_argument("--model", default=NEW_MODEL)
    parser.add_argument("--api-port", type=int, default=18180)
    parser.add_argument("--max-lag", type=int, default=0)
    parser.add_argument("--own-stack", type=Path, default=None, help="start a stack here")
    parser.add_argument("--port-offset", type=int, default=900)
    parser.add_argument("--quick", action="store_true", help="200 images, 10 s windows")
    parser.add_argument("--results", type=Path, default=benchlib.DEFAULT_RESULTS)
    args = parser.parse_args(argv)
    if args.quick:
        args.images, args.window = min(args.images, 200), min(args.window, 10.0)
    benchlib.exit_on_sigterm()
    stack = stack_of(args)
    if args.own_stack is not None:
        stack.up()
    top_before = top_snapshot()
    folder = Path(tempfile.mkdtemp(prefix="bench-reembed-"))
    try:
        with benchlib.LoadSampler() as sampler:
            figures = measure(stack, args, folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        if args.own_stack is not None:
            stack.down()
    figures["top_before"] = top_before
    figures["top_after"] = top_snapshot()
    figures["stack"] = "own" if args.own_stack else "quick start"
    for line in describe(figures):
        print(line)
    print(sampler.describe())
    print("\n".join(["top before:", *top_before]))
    headline = {
        "reembed_rebuild_rows_per_s": figures["rebuild_rows_per_s"],
        "reembed_rebuild_to_ingest_ratio": figures["rebuild_to_ingest_ratio"],
        "reembed_search_p99_ms_during_rebuild": max(
            figures["search_during"][k]["p99_ms"] for k in ("vector", "image")
        ),
    }
    path = benchlib.record(
        "reembed", figures, headline=headline, sampler=sampler, quick=args.quick, path=args.results
    )
    print(f"results merged into {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
