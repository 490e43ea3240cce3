"""Search while the collection grows: after a bulk write, and while a worker ingests (issue 25).

Two modes, each comparing variants measured one after another in the same run:

``bulk``: Milvus settings. For each variant a private Milvus 2.3.5 server is started from the
local stack's cached binary (``devstack.milvus.MilvusService`` with the variant's ``milvus.yaml``
keys and environment over the stack's own, on ``--milvus-port``, its data in a temporary
folder, wiped afterwards), then:

1. a collection of the service's schema and index (``VectorStore``, HNSW) is filled with
   ``--count`` synthetic 1280-d vectors through ``VectorStore.upsert`` in batches of 2,000 (the
   write rate: ``write_vectors_per_s``);
2. ``--delay`` s after the last write is acknowledged, a ``trident-api`` process on that server
   (and the stack's Triton) answers ``POST /search`` sequentially for ``--window`` s: one query
   by vector (near-duplicates of stored vectors, recall@10 against exact numpy top-10), one by
   uploaded 640x480 JPEG, in turn; p50/p95/p99 overall and per ``--bucket`` s, with the cores
   the server's process used in each bucket;
3. once the server has been idle (under 0.15 cores for 15 s, at most ``--settle-timeout`` s),
   the same queries again: the settled figures of the same variant.

The variants fix every key they are about, so their figures do not depend on what the stack
adopts; ``stack`` is the stack's own settings (``devstack/milvus.py``) with nothing over them,
its index builds at idle CPU priority as the stack runs them (``devstack/build_priority.py``);
``stack_builds_not_idle`` the same without that.

``ingest``: CPU shares. On the stack at ``--milvus`` (the quick start's, with the stack's
settings): a collection of ``--count`` vectors is written and settled, then a
``trident-worker`` ingests ``--images`` JPEGs into a collection of its own, alone and then
while the API answers searches in a loop (by vector and by image in turn), for each ``--nice``
value given to the worker process (and, with ``--nice-triton``, to Triton's processes, set
back afterwards). ``ingest_rate_ratio_during_search`` = images/s while searched / images/s
alone, same nice. With ``--serving before stack``, each nice value runs once per way of serving
the model (reloaded in the running Triton between them): ``before``, the config as it was before
issue 25 (one instance per part of a batch, no priority levels), and ``stack``, the repository's
config (an instance kept for queries, queries' requests first; figures under ``nice_<n>``).

Every variant records what else ran on the machine (``top``, before and after) and the load.
Results merge into ``bench/results/latest.json`` (section ``growing_bulk`` / ``growing_ingest``;
headline keys ``search_{vector,image}_p99_ms_after_bulk_write`` from the first variant that runs
Milvus as the stack does (``stack``, or one whose keys are the stack's own),
``search_{vector,image}_p99_ms_during_ingest`` and ``ingest_rate_ratio_during_search`` from the
first nice value). From the repository root, with the quick start running::

    .venv/bin/python benchmarks/bench_growing.py bulk --variants stack_builds_not_idle stack
    .venv/bin/python benchmarks/bench_growing.py ingest --nice 0 10
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import httpx
import numpy as np
import tritonclient.grpc as grpcclient
from apps import (
    AppProcess,
    bench_settings,
    milvus_token,
    post_json,
    prepare,
    publish_paths,
    running,
    wait_http,
    wait_stored,
    write_settings,
)
from bench_milvus import make_vectors
from bench_preprocess import make_jpegs
from bench_search import settle, stages_of

import benchlib
from devstack.config import StackConfig
from devstack.milvus import SEARCH_UNDER_LOAD, MilvusService
from engine.priorities import INGEST_PRIORITY, PRIORITY_LEVELS, QUERY_INSTANCES
from engine.records import VectorRecord
from engine.settings import Settings
from engine.store import VectorStore

TOP_K = 10
WRITE_BATCH = 2_000
INTERIM = "queryNode.segcore.interimIndex.enableIndex"


@dataclass(frozen=True)
class Variant:
    """Milvus settings (dotted ``milvus.yaml`` keys) and environment over the stack's own, and
    whether its index builds run at idle CPU priority (devstack/build_priority.py)."""

    about: str
    settings: Mapping[str, Any] = field(default_factory=dict)
    environment: Mapping[str, str] = field(default_factory=dict)
    idle_builds: bool = True


VARIANTS: dict[str, Variant] = {
    "interim_off": Variant(
        "no temporary index on growing segments (the stack before issue 25)", {INTERIM: False}
    ),
    "interim_on": Variant(
        "temporary IVF index on growing segments (Milvus's default)", {INTERIM: True}
    ),
    "interim_on_gomaxprocs1": Variant(
        "interim index on; GOMAXPROCS=1: Milvus 2.3 sizes its index-build pool (and its search "
        "pool) to GOMAXPROCS, so one build thread leaves a core to searches",
        {INTERIM: True},
        {"GOMAXPROCS": "1"},
    ),
    "interim_off_gomaxprocs1": Variant(
        "interim index off; GOMAXPROCS=1", {INTERIM: False}, {"GOMAXPROCS": "1"}
    ),
    "interim_on_seal_full": Variant(
        "interim index on; segments sealed when full (sealProportion 1.0, not 0.23): fewer, "
        "larger index builds and no small segments to merge and index again",
        {INTERIM: True, "dataCoord.segment.sealProportion": 1.0},
    ),
    "interim_on_no_auto_compaction": Variant(
        "interim index on; no automatic compaction (what the merged segments' second build costs)",
        {INTERIM: True, "dataCoord.compaction.enableAutoCompaction": False},
    ),
    "stack": Variant("the stack's own settings (devstack/milvus.py)"),
    "stack_builds_not_idle": Variant(
        "the stack's own settings, its index builds at their own priority (nice 19, like its "
        "searches) instead of SCHED_IDLE",
        idle_builds=False,
    ),
}


class Workload(NamedTuple):
    """Queries by vector with their exact top-10 (as row numbers), and query JPEGs."""

    vectors: np.ndarray
    queries: np.ndarray
    exact: list[set[int]]
    jpegs: list[bytes]


def make_workload(count: int, queries: int, images: int) -> Workload:
    vectors, _labels = make_vectors(count, 1280, seed=0)
    rng = np.random.default_rng(1)
    picked = rng.choice(count, queries, replace=False)
    near = vectors[picked] + 0.02 * rng.standard_normal((queries, 1280), np.float32)
    near /= np.linalg.norm(near, axis=1, keepdims=True)
    exact = [set(np.argsort(-row)[:TOP_K].tolist()) for row in near @ vectors.T]
    return Workload(vectors, near, exact, make_jpegs(images, seed=5))


# ---------------------------------------------------------------------- measuring


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds so far of these processes (those that ended count 0)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / ticks
    return total


class CoreSampler:
    """Cores used by some processes, sampled every ``every`` s in a daemon thread."""

    def __init__(self, pids: list[int], every: float = 2.0) -> None:
        self.pids, self.every = pids, every
        self.samples: list[tuple[float, float]] = []  # (monotonic end of the sample, cores)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="core-sampler")

    def _run(self) -> None:
        last_t, last_cpu = time.monotonic(), cpu_seconds(self.pids)
        while not self._stop.wait(self.every):
            now, cpu = time.monotonic(), cpu_seconds(self.pids)
            self.samples.append((now, (cpu - last_cpu) / (now - last_t)))
            last_t, last_cpu = now, cpu

    def __enter__(self) -> CoreSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def mean(self, start: float, end: float) -> float:
        inside = [cores for t, cores in self.samples if start < t <= end + self.every]
        return round(sum(inside) / len(inside), 2) if inside else float("nan")


def top_snapshot(lines: int = 14) -> list[str]:
    """What used the CPU over the last 2 s (``top``'s second sample), busiest first."""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(
            ["top", "-b", "-n", "2", "-d", "2", "-w", "180", "-o", "%CPU"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        ).stdout
        last = out.rsplit("top - ", 1)[-1].splitlines()
        header = next((i for i, line in enumerate(last) if line.lstrip().startswith("PID")), 0)
        return [last[0], *last[header : header + lines]]
    return []


class Query(NamedTuple):
    """One timed answer: when it ended (monotonic), its kind, latency, recall (vector only)."""

    at: float
    kind: str
    ms: float
    recall: float | None
    search_ms: float


def percentiles(values: list[float]) -> dict[str, float]:
    return {f"p{q}_ms": round(benchlib.percentile(values, q), 1) for q in (50, 95, 99)}


def summarise(answers: list[Query]) -> dict[str, Any]:
    """p50/p95/p99 per kind, Milvus's own share (the ``search`` stage), recall@10."""
    out: dict[str, Any] = {}
    for kind in ("vector", "image"):
        mine = [a for a in answers if a.kind == kind]
        if not mine:
            continue
        out[kind] = {
            **percentiles([a.ms for a in mine]),
            "queries": len(mine),
            "search_stage": percentiles([a.search_ms for a in mine]),
        }
        recalls = [a.recall for a in mine if a.recall is not None]
        if recalls:
            out[kind]["recall_at_10"] = round(float(np.mean(recalls)), 3)
    return out


class Searcher:
    """Sequential searches through the API: by vector and by image, in turn."""

    def __init__(self, http: httpx.Client, collection: str, work: Workload) -> None:
        self.http, self.collection, self.work = http, collection, work
        self.n = 0

    def vector(self) -> Query:
        i = self.n % len(self.work.queries)
        began = time.perf_counter()
        body = {"vector": self.work.queries[i].tolist(), "topk": TOP_K}
        response = post_json(self.http, "/search", {**body, "collection_name": self.collection})
        ms = (time.perf_counter() - began) * 1000
        response.raise_for_status()
        found = {int(hit["id"][2:]) for hit in response.json()}
        recall = len(found & self.work.exact[i]) / TOP_K
        return Query(time.monotonic(), "vector", ms, recall, stages_of(response).get("search", 0))

    def image(self) -> Query:
        jpeg = self.work.jpegs[self.n % len(self.work.jpegs)]
        began = time.perf_counter()
        response = self.http.post(
            "/search",
            files={"file": ("q.jpg", jpeg, "image/jpeg")},
            data={"topk": str(TOP_K), "collection_name": self.collection},
        )
        ms = (time.perf_counter() - began) * 1000
        response.raise_for_status()
        return Query(time.monotonic(), "image", ms, None, stages_of(response).get("search", 0))

    def pair(self) -> list[Query]:
        self.n += 1
        return [self.vector(), self.image()]

    def run(self, until: Callable[[], bool]) -> list[Query]:
        answers: list[Query] = []
        while not until():
            answers.extend(self.pair())
        return answers


@contextlib.contextmanager
def api_on(settings: Settings, folder: Path, port: int) -> Iterator[httpx.Client]:
    api = AppProcess.api(write_settings(settings, folder / f"api-{port}.yaml"), port, folder)
    with running([api]):
        wait_http(f"http://127.0.0.1:{port}/health", api)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as http:
            yield http


def write_all(store: VectorStore, name: str, vectors: np.ndarray) -> float:
    """Upsert every vector in calls of ``WRITE_BATCH`` (the service's write path); vectors/s."""
    began = time.perf_counter()
    for start in range(0, len(vectors), WRITE_BATCH):
        store.upsert(
            [
                VectorRecord(id=f"v-{i:07d}", vector=vectors[i], metadata={"n": i})
                for i in range(start, min(start + WRITE_BATCH, len(vectors)))
            ],
            name,
        )
    return len(vectors) / (time.perf_counter() - began)


# ---------------------------------------------------------------------- bulk mode


def buckets(answers: list[Query], start: float, size: float, cores: CoreSampler) -> list[Any]:
    """Per ``size`` s from ``start``: p50/p99 by kind and the server's cores."""
    if not answers:
        return []
    out = []
    edge = start
    while edge < answers[-1].at:
        inside = [a for a in answers if edge <= a.at < edge + size]
        row: dict[str, Any] = {
            "from_s": round(edge - start),
            "milvus_cores": cores.mean(edge, edge + size),
        }
        for kind in ("vector", "image"):
            ms = [a.ms for a in inside if a.kind == kind]
            if ms:
                row[kind] = {
                    "p50_ms": round(benchlib.percentile(ms, 50), 1),
                    "p99_ms": round(benchlib.percentile(ms, 99), 1),
                }
        out.append(row)
        edge += size
    return out


def index_progress(store_uri: str, token: str, name: str) -> dict[str, int]:
    from pymilvus import MilvusClient  # noqa: PLC0415 (pymilvus is slow to import)

    client = MilvusClient(uri=store_uri, token=token)
    try:
        described = client.describe_index(name, client.list_indexes(name)[0])
        return {
            "indexed_rows": int(described.get("indexed_rows", 0)),
            "pending_index_rows": int(described.get("pending_index_rows", 0)),
        }
    finally:
        client.close()


def run_variant(
    name: str, variant: Variant, args: argparse.Namespace, work: Workload, folder: Path
) -> dict[str, Any]:
    """One variant on a fresh private server; its figures."""
    root = folder / name
    config = StackConfig(root=root, cache=args.cache, milvus_port=args.milvus_port)
    milvus = MilvusService(
        config,
        settings=variant.settings,
        environment=variant.environment,
        idle_builds=variant.idle_builds,
    )
    milvus.install()
    before = top_snapshot()
    milvus.start()
    pid = milvus.process.pid()
    assert pid is not None
    settings = bench_settings(
        kafka=args.kafka,
        triton_grpc=args.triton_grpc,
        milvus=milvus.uri,
        milvus_token=milvus.token,
        image_root=folder,
    )
    collection = settings.milvus.collection
    store = VectorStore(settings.milvus)
    figures: dict[str, Any] = {"about": variant.about, "settings": dict(variant.settings)}
    figures["environment"] = dict(variant.environment)
    try:
        store.create_collection(collection, model_tag=settings.triton.model_tag)
        with (
            api_on(settings, folder, args.api_port) as http,
            CoreSampler([pid]) as cores,
            benchlib.LoadSampler() as load,
        ):
            searcher = Searcher(http, collection, work)
            searcher.pair()  # warm-up: connections, the API's first Triton call
            write_began = time.monotonic()
            figures["write_vectors_per_s"] = round(write_all(store, collection, work.vectors))
            written = time.monotonic()
            figures["write_milvus_cores"] = cores.mean(write_began, written)
            time.sleep(args.delay)
            start = time.monotonic()
            window = searcher.run(lambda: time.monotonic() - start > args.window)
            figures["after_bulk_write"] = summarise(window)
            figures["after_bulk_write"]["milvus_cores"] = cores.mean(start, time.monotonic())
            figures["after_bulk_write"]["by_bucket"] = buckets(window, start, args.bucket, cores)
            figures["index_at_window_end"] = index_progress(milvus.uri, milvus.token, collection)
            figures["top_during_window"] = top_snapshot()
            print_variant(name, figures)
            if args.settled_pairs:
                figures.update(settled(milvus, pid, collection, searcher, cores=cores, args=args))
                figures["milvus_idle_s_after_write"] = round(time.monotonic() - written)
        figures["load"] = load.summary()
        figures["milvus_rss_mib"] = rss_mib(pid)
        figures["top_before"] = before
    finally:
        store.close()
        milvus.reset()
        shutil.rmtree(root, ignore_errors=True)
    return figures


def settled(
    milvus: MilvusService,
    pid: int,
    collection: str,
    searcher: Searcher,
    *,
    cores: CoreSampler,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """Wait for the server to be idle, seal and index the tail (a growing segment seals only
    after 10 idle minutes), wait again, then time the same queries: the settled figures."""
    try:
        wait_pid_idle(pid, timeout=args.settle_timeout)
        settle(
            milvus.uri,
            milvus.token,
            collection,
            len(searcher.work.vectors),
            timeout=args.settle_timeout,
        )
        wait_pid_idle(pid, timeout=args.settle_timeout)
    except TimeoutError as exc:
        return {"settle_note": str(exc)}
    began = time.monotonic()
    answers = [q for _ in range(args.settled_pairs) for q in searcher.pair()]
    result = summarise(answers)
    result["milvus_cores"] = cores.mean(began, time.monotonic())
    return {"settled": result}


def wait_pid_idle(
    pid: int, *, timeout: float, below: float = 0.15, window: float = 15.0
) -> tuple[float, float]:
    """Wait until process ``pid`` uses under ``below`` cores over ``window`` s.

    Raises:
        TimeoutError: still busy after ``timeout`` s.
    """
    began = time.monotonic()
    while True:
        first = cpu_seconds([pid])
        time.sleep(window)
        cores = (cpu_seconds([pid]) - first) / window
        if cores < below:
            return time.monotonic() - began, cores
        if time.monotonic() - began > timeout:
            raise TimeoutError(f"Milvus still used {cores:.2f} cores after {timeout:.0f} s")


def rss_mib(pid: int) -> float:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


def print_variant(name: str, f: dict[str, Any]) -> None:
    print(f"\n[{name}] {f['about']}")
    print(
        f"  write {f['write_vectors_per_s']:,} vectors/s (Milvus {f['write_milvus_cores']} cores); "
        f"idle {f.get('milvus_idle_s_after_write')} s after the write; index at the window's end "
        f"{f['index_at_window_end']}",
        flush=True,
    )
    for phase in ("after_bulk_write", "settled"):
        if phase not in f:
            continue
        p = f[phase]
        line = f"  {phase:<16} Milvus {p['milvus_cores']} cores"
        for kind in ("vector", "image"):
            if kind in p:
                k = p[kind]
                recall = f", recall {k['recall_at_10']}" if "recall_at_10" in k else ""
                line += (
                    f" | {kind} p50 {k['p50_ms']} p95 {k['p95_ms']} p99 {k['p99_ms']} ms "
                    f"(n {k['queries']}, Milvus p99 {k['search_stage']['p99_ms']}{recall})"
                )
        print(line)
    for row in f["after_bulk_write"].get("by_bucket", []):
        v, i = row.get("vector", {}), row.get("image", {})
        print(
            f"    +{row['from_s']:>4} s  Milvus {row['milvus_cores']:>5} cores  vector p50 "
            f"{v.get('p50_ms')} p99 {v.get('p99_ms')}  "
            f"image p50 {i.get('p50_ms')} p99 {i.get('p99_ms')}",
            flush=True,
        )


def bulk(args: argparse.Namespace) -> int:
    work = make_workload(args.count, args.queries, args.image_queries)
    figures: dict[str, Any] = {}
    with (
        tempfile.TemporaryDirectory(prefix="bench-growing-") as tmp,
        benchlib.LoadSampler() as load,
    ):
        for name in args.variants:
            print(f"== {name}: {VARIANTS[name].about}", flush=True)
            figures[name] = run_variant(name, VARIANTS[name], args, work, Path(tmp))
            if "settled" in figures[name]:
                print_variant(name, figures[name])
            record_bulk(args, figures, load)
    print("\n" + load.describe())
    return 0


def runs_as_stack(name: str) -> bool:
    """Whether variant ``name`` runs Milvus as the stack does (its headline figures)."""
    variant = VARIANTS[name]
    same = all(SEARCH_UNDER_LOAD.get(key) == value for key, value in variant.settings.items())
    return same and not variant.environment and variant.idle_builds


def record_bulk(
    args: argparse.Namespace, figures: dict[str, Any], load: benchlib.LoadSampler
) -> None:
    headline: dict[str, Any] = {}
    adopted = next((figures[name] for name in figures if runs_as_stack(name)), None)
    if adopted:
        after = adopted["after_bulk_write"]
        headline = {
            "search_vector_p99_ms_after_bulk_write": after["vector"]["p99_ms"],
            "search_image_p99_ms_after_bulk_write": after["image"]["p99_ms"],
        }
    benchlib.record(
        "growing_bulk",
        {
            "count": args.count,
            "window_s": args.window,
            "delay_s": args.delay,
            "variants": figures,
        },
        headline=headline,
        sampler=load,
        quick=args.quick,
        path=args.results,
    )


# ---------------------------------------------------------------------- ingest mode


def triton_pids() -> list[int]:
    """The local stack's Triton server and its python-backend stubs (by command line)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                if cmd.startswith(str(Path(".stack").resolve())) and "triton" in cmd:
                    pids.append(int(entry.name))
    return pids


@contextlib.contextmanager
def niced(pids: list[int], value: int) -> Iterator[None]:
    """Renice these processes (all their threads) to ``value`` for the block, then back."""
    old = {pid: os.getpriority(os.PRIO_PROCESS, pid) for pid in pids}

    def renice(pid: int, to: int) -> None:
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{pid}/task").iterdir():
                os.setpriority(os.PRIO_PROCESS, int(task.name), to)

    try:
        for pid in pids:
            renice(pid, value)
        yield
    finally:
        for pid, was in old.items():
            renice(pid, was)


SERVING = ("before", "stack")


def serve_as(grpc_url: str, settings: Settings, serving: str) -> None:
    """Reload the ingest model in the running Triton: its repository config (``stack``), or
    that config as it was before issue 25 (``before``: one instance per part of a batch, no
    priority levels)."""
    client = grpcclient.InferenceServerClient(grpc_url)
    name = settings.triton.model_name
    try:
        # Both ways as an override: a load naming no config keeps a running model as it is.
        config = client.get_model_config(name, as_json=True, client_timeout=10)["config"]
        batching = config["dynamic_batching"]
        instances = settings.model.instance_count
        if serving == "stack":
            batching["priority_levels"] = PRIORITY_LEVELS
            batching["default_priority_level"] = INGEST_PRIORITY
            instances += QUERY_INSTANCES
        else:
            for key in ("priority_levels", "default_priority_level"):
                batching.pop(key, None)
        config["instance_group"][0]["count"] = instances
        client.load_model(name, config=json.dumps(config), client_timeout=120)
    finally:
        client.close()


def ingest_phase(
    store: VectorStore,
    settings: Settings,
    worker: AppProcess,
    paths: list[Path],
    *,
    tag: str,
    searcher: Searcher | None,
) -> dict[str, Any]:
    """Publish ``paths``, wait until stored; images/s, and the searches made meanwhile."""
    collection = settings.milvus.collection
    total = store.count(collection) + len(paths)
    done = threading.Event()
    answers: list[Query] = []
    thread = None
    if searcher is not None:
        thread = threading.Thread(target=lambda: answers.extend(searcher.run(done.is_set)))
    with benchlib.LoadSampler() as load:
        began = time.monotonic()
        if thread is not None:
            thread.start()
        publish_paths(settings, paths, tag)
        ended = wait_stored(store, collection, total, [worker], timeout=1_800)
        done.set()
        if thread is not None:
            thread.join()
    return {
        "images_per_s": round(len(paths) / (ended - began), 1),
        **summarise(answers),
        "load": load.summary(),
    }


def ingest(args: argparse.Namespace) -> int:
    work = make_workload(args.count, args.queries, args.image_queries)
    figures: dict[str, Any] = {}
    token = milvus_token(args.milvus_token_file)
    with (
        tempfile.TemporaryDirectory(prefix="bench-growing-") as tmp,
        benchlib.LoadSampler() as load,
    ):
        folder = Path(tmp)
        paths = []
        phases = 2 * len(args.nice) * len(args.serving)
        for n, jpeg in enumerate(make_jpegs(args.images * phases + 64, seed=9)):
            paths.append(folder / f"ingest-{n:05d}.jpg")
            paths[-1].write_bytes(jpeg)
        common = {"kafka": args.kafka, "triton_grpc": args.triton_grpc, "milvus": args.milvus}
        searched = bench_settings(**common, milvus_token=token, image_root=folder)
        ingesting = bench_settings(**common, milvus_token=token, image_root=folder)
        store = VectorStore(searched.milvus)
        target = searched.milvus.collection
        try:
            store.create_collection(target, model_tag=searched.triton.model_tag)
            figures["write_vectors_per_s"] = round(write_all(store, target, work.vectors))
            figures["settle_s"] = round(
                settle(args.milvus, token, target, args.count, timeout=1_800)
            )
            # The stack's own server, by its pid file: other stacks' servers may be busy.
            server = int(args.milvus_pid_file.read_text())
            try:
                wait_pid_idle(server, timeout=args.settle_timeout)
            except TimeoutError as exc:
                figures["settle_note"] = str(exc)
            prepare(ingesting)
            worker = AppProcess.worker(
                write_settings(ingesting, folder / "w.yaml"), "bench-g", folder
            )
            with running([worker]), api_on(searched, folder, args.api_port) as http:
                publish_paths(ingesting, paths[:64], "warm")
                wait_stored(store, ingesting.milvus.collection, 64, [worker], timeout=600)
                searcher = Searcher(http, target, work)
                searcher.pair()
                settled = [q for _ in range(args.settled_pairs) for q in searcher.pair()]
                figures["settled"] = summarise(settled)
                figures["top_before"] = top_snapshot()
                cursor = 64
                for serving, value in [(s, v) for v in args.nice for s in args.serving]:
                    serve_as(args.triton_grpc, ingesting, serving)
                    pids = [worker.process.pid] + (triton_pids() if args.nice_triton else [])
                    row: dict[str, Any] = {}
                    with niced(pids, value):
                        for tag, who in (("alone", None), ("searched", searcher)):
                            chunk = paths[cursor : cursor + args.images]
                            cursor += args.images
                            row[tag] = ingest_phase(
                                store, ingesting, worker, chunk, tag=f"{tag}{value}", searcher=who
                            )
                    row["ingest_rate_ratio_during_search"] = round(
                        row["searched"]["images_per_s"] / row["alone"]["images_per_s"], 3
                    )
                    prefix = "" if serving == "stack" else f"{serving}_"
                    figures[f"{prefix}nice_{value}"] = row
                    print(f"serving {serving}:", end=" ")
                    print_ingest(value, row)
                serve_as(args.triton_grpc, ingesting, "stack")
                figures["top_after"] = top_snapshot()
        finally:
            for name in (target, ingesting.milvus.collection):
                with contextlib.suppress(Exception):
                    if store.collection_exists(name):
                        store.drop_collection(name)
            store.close()
    first = figures.get(f"nice_{args.nice[0]}") or figures[f"before_nice_{args.nice[0]}"]
    print("settled:", figures["settled"])
    print(load.describe())
    benchlib.record(
        "growing_ingest",
        {
            "count": args.count,
            "images": args.images,
            "nice_triton": args.nice_triton,
            "serving": args.serving,
            **figures,
        },
        headline={
            "search_vector_p99_ms_during_ingest": first["searched"]["vector"]["p99_ms"],
            "search_image_p99_ms_during_ingest": first["searched"]["image"]["p99_ms"],
            "ingest_rate_ratio_during_search": first["ingest_rate_ratio_during_search"],
        },
        sampler=load,
        quick=args.quick,
        path=args.results,
    )
    return 0


def print_ingest(value: int, row: dict[str, Any]) -> None:
    alone, searched = row["alone"], row["searched"]
    print(
        f"nice {value}: ingest alone {alone['images_per_s']} images/s, while searched "
        f"{searched['images_per_s']} (x{row['ingest_rate_ratio_during_search']})"
    )
    for kind in ("vector", "image"):
        if kind in searched:
            k = searched[kind]
            print(
                f"    by {kind} p50 {k['p50_ms']} p95 {k['p95_ms']} p99 {k['p99_ms']} ms "
                f"(n {k['queries']})"
            )


# ---------------------------------------------------------------------- command line


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("mode", choices=("bulk", "ingest"))
    parser.add_argument("--kafka", default="127.0.0.1:19092")
    parser.add_argument("--triton-grpc", default="127.0.0.1:18001")
    parser.add_argument("--milvus", default="http://127.0.0.1:19530", help="ingest mode's server")
    parser.add_argument("--milvus-token-file", type=Path, default=Path(".stack/milvus/secret"))
    parser.add_argument("--milvus-pid-file", type=Path, default=Path(".stack/milvus/milvus.pid"))
    parser.add_argument(
        "--cache", type=Path, default=Path(".stack/cache"), help="the stack's install cache"
    )
    parser.add_argument(
        "--milvus-port", type=int, default=19830, help="bulk mode's private servers"
    )
    parser.add_argument("--api-port", type=int, default=28395)
    parser.add_argument(
        "--variants",
        nargs="+",
        default=["interim_off", "stack_builds_not_idle", "stack"],
        choices=VARIANTS,
    )
    parser.add_argument("--count", type=int, default=100_000)
    parser.add_argument("--window", type=float, default=300.0)
    parser.add_argument("--delay", type=float, default=5.0)
    parser.add_argument("--bucket", type=float, default=30.0)
    parser.add_argument("--settle-timeout", type=float, default=900.0)
    parser.add_argument(
        "--settled-pairs",
        type=int,
        default=0,
        help="bulk mode: also time this many pairs once the server is idle again (0: skip; "
        "on a busy machine the wait can take longer than the window)",
    )
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--image-queries", type=int, default=50)
    parser.add_argument("--images", type=int, default=1_500, help="ingest mode: per phase")
    parser.add_argument("--nice", type=int, nargs="+", default=[0, 10])
    parser.add_argument("--nice-triton", action="store_true")
    parser.add_argument(
        "--serving",
        nargs="+",
        default=["stack"],
        choices=SERVING,
        help="ingest mode: ways of serving the model, each measured (see the module docstring)",
    )
    parser.add_argument("--quick", action="store_true", help="5,000 vectors, short windows")
    parser.add_argument("--results", type=Path, default=benchlib.DEFAULT_RESULTS)
    args = parser.parse_args(argv)
    if args.quick:
        args.count, args.window, args.bucket, args.settled_pairs = 5_000, 20.0, 10.0, 20
        args.queries, args.image_queries, args.images, args.settle_timeout = 40, 8, 64, 300.0
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the chosen mode, print, record; returns the exit code."""
    args = parse(argv)
    benchlib.exit_on_sigterm()
    return bulk(args) if args.mode == "bulk" else ingest(args)


if __name__ == "__main__":
    raise SystemExit(main())
