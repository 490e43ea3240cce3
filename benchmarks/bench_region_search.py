"""Region vectors through the public path (issue 24, item 5): finding an image by a detail.

One run against a running stack (the quick start's by default, or ``--stack-root DIR
--port-offset N``: ports as the test stack's, 29092 + N ...), with a ``trident-worker`` and a
``trident-api`` of its own (its own topic and group, the API's rate limit off):

1. **The set** is ``bench_regions.py``'s, deterministic for ``--seed``: a gallery of photo-like
   tuxpaint stamps and scikit-image's photos, written as PNG files; as queries, seeded crops of
   8-20 % of an image's area and of 25-60 %, a near-duplicate of each image (shift, brightness,
   JPEG), and each labelled image itself (class P@1, leave-one-out).
2. **Ingest**: two collections are created through ``POST /collections/create``, one with
   ``regions: true`` and its twin without; the gallery is published with the producer library
   (``EventPublisher``, path events naming the collection) and the worker ingests it. A warm-up
   share is published to both first (JAX's compiles, Triton's first requests), then the rest to
   the twin, then the same images to the collection with regions: images/s of each from the
   first publish to the last row stored, and the CPU seconds per image of the worker, Triton
   and Milvus of the stack (by process id) meanwhile.
3. **Quality**: every query is uploaded to ``POST /search`` (multipart) on both collections:
   R@1/R@5 of each crop set's source image, class P@1 (the first hit that is not the query
   image itself has its class) and near-duplicate R@1; and, on the collection with regions,
   how often the first hit's ``box`` is a region when that hit is the crop's source, and how
   often such a region contains the crop's centre.
4. **Scale**: a pair of collections (``--scale-collection``, made through the API like the
   others) is filled directly with the store (``VectorStore.upsert``, regions first) up to
   ``--scale-images`` items. The filler is the gallery's own vectors, embedded in-process
   (``bench_regions.Embedder``: the global vector at 224 px, the model's region recipe at the
   region model's size) with noise (a unit vector shared by the item's vectors and one of each
   vector's own), renormalised: vectors of the model's space, as far from their source as
   ``--noise`` says (the run records the mean cosine to the source beside the gallery's own
   nearest-neighbour cosine). Then each collection and the region companion is flushed,
   compacted and indexed, up to ``--settle-timeout`` (whether it settled, and how many rows the
   query nodes serve from an index, are recorded), and Milvus of the stack is left to go idle
   (by its process tree's CPU, up to ``--idle-timeout``); then searches by image (the detail
   crops, uploaded) alternate between the two, sequentially: p50/p99, each stage from
   ``Server-Timing``, the CPU of Milvus, Triton and the API and the load meanwhile. Storage
   per image: the raw floats, and the bytes on disk of the segments each collection is served
   from (binlogs and index files; the data folder's growth over a fill, message log and garbage
   collection included, is recorded as a rough second figure). ``--keep-scale`` keeps the pair
   (and the fill's figures, in ``region_search_scale.json`` beside the results) so that a later
   run reuses it instead of filling again; without it the pair is dropped at the end.

Figures merge into ``bench/results/latest.json`` (section ``region_search``; headline keys
``regions_*``). From the repository root::

    .venv/bin/python benchmarks/bench_region_search.py [--quick]      # --quick: ~3 min
    .venv/bin/python benchmarks/bench_region_search.py --stack-root /tmp/s --port-offset 900
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import shutil
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import numpy.typing as npt
from apps import AppProcess, bench_settings, post_json, running, wait_http, wait_stored
from apps import write_settings as write_app_settings
from bench_growing import top_snapshot
from bench_int8 import STAMPS
from bench_regions import (
    WHOLE,
    Box,
    Embedder,
    Gallery,
    QuerySets,
    build_gallery,
    build_queries,
    is_photo,
)
from bench_search import Answer as StagedAnswer
from bench_search import stage_summary, stages_of
from PIL import Image
from pymilvus import MilvusClient, connections, utility

import benchlib
from devstack.config import StackConfig
from devstack.stack import LocalStack
from engine.kafka import delete_consumer_group, ensure_topics
from engine.models import UINT8_MODEL_SPEC, region_model_of
from engine.records import ItemRegions, VectorRecord
from engine.settings import MilvusSettings, Settings
from engine.store import VectorStore, region_collection
from producer.publisher import EventPublisher
from schemas import IngestEvent, PathImage

logger = logging.getLogger(__name__)

SPEC = UINT8_MODEL_SPEC  # the stack's default model: the collections' model
REGION_SPEC = region_model_of(SPEC)
assert SPEC.regions is not None
BOXES: tuple[Box, ...] = SPEC.regions.boxes
TOP_K = 5
SCALE_TOP_K = 10
WARMUP_SHARE = 32  # gallery images published to both collections before timing
Matrix = npt.NDArray[np.float32]
RAW_BYTES_PER_IMAGE = (len(BOXES) + 1) * SPEC.output_dim * 4
# The scale phase's fill figures, beside the results, for a later run reusing its pair.
SCALE_RECORD = "region_search_scale.json"


# --- the stack and its processes ---------------------------------------------------------


def stack_of(root: Path, offset: int | None) -> LocalStack:
    """The running stack at ``root``: the quick start's ports, or the test stack's + ``offset``."""
    if offset is None:
        return LocalStack(StackConfig(root=root))
    return LocalStack(StackConfig.test_stack(root, Path(".stack/cache").resolve(), offset))


def serve_region_model(stack: LocalStack) -> None:
    """Make the stack's Triton serve the region model unless it does (an older quick start)."""
    url = f"http://{stack.config.triton_url}/v2/models/{REGION_SPEC.name}/ready"
    with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=5) as answer:
        if answer.status == 200:
            return
    logger.info("loading %s into the stack's Triton", REGION_SPEC.name)
    stack.serve_models([REGION_SPEC.name])


def _cpu_by_pid() -> dict[int, tuple[int, float]]:
    """``pid -> (parent pid, CPU seconds used so far)`` of every process."""
    ticks = os.sysconf("SC_CLK_TCK")
    out: dict[int, tuple[int, float]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            out[int(entry.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / ticks)
    return out


def tree_cpu_seconds(roots: dict[str, int | None]) -> dict[str, float]:
    """CPU seconds used so far by each named process and its descendants (Triton's backend
    stubs, Milvus's helpers); 0 for a name without a process."""
    table = _cpu_by_pid()
    children: dict[int, list[int]] = {}
    for pid, (parent, _) in table.items():
        children.setdefault(parent, []).append(pid)
    out: dict[str, float] = {}
    for name, root in roots.items():
        total, todo = 0.0, [root] if root is not None else []
        while todo:
            pid = todo.pop()
            total += table.get(pid, (0, 0.0))[1]
            todo += children.get(pid, [])
        out[name] = total
    return out


class CpuMeter:
    """CPU seconds of named process trees between :meth:`start` and :meth:`stop`."""

    def __init__(self, roots: dict[str, int | None]) -> None:
        self.roots = roots
        self._began: dict[str, float] = {}
        self._at = 0.0

    def start(self) -> None:
        self._began, self._at = tree_cpu_seconds(self.roots), time.monotonic()

    def stop(self) -> tuple[dict[str, float], float]:
        """CPU seconds of each since :meth:`start`, and the wall seconds."""
        now = tree_cpu_seconds(self.roots)
        spent = {name: round(now[name] - self._began.get(name, 0.0), 2) for name in self.roots}
        return spent, time.monotonic() - self._at


def wait_quiet(
    meter: CpuMeter, name: str, *, below: float, window: float, timeout: float
) -> tuple[bool, float]:
    """Wait until ``name``'s tree uses under ``below`` cores over a ``window``; whether it did
    within ``timeout``, and the last window's cores (every wait has a deadline)."""
    deadline = time.monotonic() + timeout
    cores = float("nan")
    while time.monotonic() < deadline:
        meter.start()
        time.sleep(window)
        spent, wall = meter.stop()
        cores = spent[name] / wall
        if cores < below:
            return True, round(cores, 3)
    return False, round(cores, 3)


def folder_bytes(folder: Path) -> int:
    """Bytes under ``folder`` (``du -sb``)."""
    done = subprocess.run(["du", "-sb", str(folder)], capture_output=True, text=True, check=True)
    return int(done.stdout.split()[0])


# --- the set on disk and as uploads ------------------------------------------------------


def gallery_id(index: int) -> str:
    return f"g-{index:04d}"


def write_gallery(gallery: Gallery, folder: Path) -> list[tuple[str, Path]]:
    """The gallery as PNG files: ``(id, path)`` per image, in gallery order."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for index, image in enumerate(gallery.images):
        path = folder / f"{gallery_id(index)}.png"
        image.save(path, format="PNG")
        out.append((gallery_id(index), path))
    return out


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@dataclass
class Query:
    """One upload: its image, the index of the gallery image it should find, and for a crop
    where in that image it was."""

    image: bytes
    truth: int
    box: Box | None = None


def query_sets(gallery: Gallery, sets: QuerySets, limit: int | None) -> dict[str, list[Query]]:
    """Uploads per set: ``small`` and ``large`` crops, ``dup`` near-duplicates, ``whole``
    (each labelled stamp itself); the first ``limit`` of each when given."""
    out: dict[str, list[Query]] = {}
    for name in ("small", "large"):
        truth, boxes = sets.truth[name], sets.boxes[name]
        out[name] = [
            Query(png(crop), int(truth[n]), boxes[n]) for n, crop in enumerate(sets.crops[name])
        ]
    out["dup"] = [Query(png(image), n) for n, image in enumerate(sets.crops["dup"])]
    out["whole"] = [
        Query(png(image), n)
        for n, image in enumerate(gallery.images)
        if not is_photo(gallery.labels[n])
    ]
    return {name: queries[:limit] for name, queries in out.items()}


# --- ingest through the worker -----------------------------------------------------------


def publish(settings: Settings, items: Sequence[tuple[str, Path]], collection: str) -> None:
    """One path event per item into ``collection``, through the producer's publisher.

    Raises:
        RuntimeError: some events were not delivered.
    """
    with EventPublisher(settings.kafka) as publisher:
        report = publisher.publish_many(
            IngestEvent(id=item_id, image=PathImage(path=str(path)), collection=collection)
            for item_id, path in items
        )
    if report.failed:
        raise RuntimeError(f"{report.failed} events not delivered: {report.failures[:3]}")


def create_through_api(http: httpx.Client, name: str, *, regions: bool) -> dict[str, Any]:
    """Create ``name`` (``regions`` or not) through the API; its stats as the API answers them.

    Raises:
        RuntimeError: the API refused (the message quotes its answer).
    """
    body: dict[str, Any] = {"name": name, "regions": True} if regions else {"name": name}
    made = post_json(http, "/collections/create", body)
    if made.status_code not in {200, 201}:
        raise RuntimeError(f"create {name}: {made.status_code} {made.text[:300]}")
    stats: dict[str, Any] = http.get(f"/collections/{name}/stats").raise_for_status().json()
    if bool(stats.get("regions")) != regions:
        raise RuntimeError(f"{name}: the API says regions={stats.get('regions')!r}")
    return stats


def timed_ingest(
    settings: Settings,
    store: VectorStore,
    worker: AppProcess,
    meter: CpuMeter,
    *,
    items: Sequence[tuple[str, Path]],
    collection: str,
    already: int,
) -> dict[str, Any]:
    """Publish ``items`` into ``collection`` (holding ``already`` rows) and wait for their rows:
    images/s from the first publish to the last row, and CPU seconds per image by process."""
    meter.start()
    began = time.monotonic()
    publish(settings, items, collection)
    done = wait_stored(store, collection, already + len(items), [worker], timeout=3600)
    spent, _ = meter.stop()
    seconds = done - began
    return {
        "images": len(items),
        "seconds": round(seconds, 2),
        "images_per_s": round(len(items) / seconds, 2),
        "cpu_s_per_image": {k: round(v / len(items), 4) for k, v in spent.items()},
    }


def region_rows(settings: Settings, collection: str) -> int:
    """Rows of ``collection``'s region companion (Strong: the rows just written), read with
    pymilvus: the store hides its companions."""
    client = MilvusClient(uri=settings.milvus.uri, token=settings.milvus.token)
    try:
        rows = client.query(
            region_collection(collection),
            filter="",
            output_fields=["count(*)"],
            consistency_level="Strong",
        )
    finally:
        client.close()
    return int(rows[0]["count(*)"])


def ingest(
    settings: Settings,
    store: VectorStore,
    worker: AppProcess,
    meter: CpuMeter,
    *,
    files: list[tuple[str, Path]],
    names: dict[str, str],
) -> dict[str, Any]:
    """The warm-up share into both collections, then the rest into each in turn, timed."""
    warm, rest = files[:WARMUP_SHARE], files[WARMUP_SHARE:]
    for collection in names.values():
        publish(settings, warm, collection)
    for collection in names.values():
        wait_stored(store, collection, len(warm), [worker], timeout=1800)
    out: dict[str, Any] = {}
    for kind, collection in names.items():
        out[kind] = timed_ingest(
            settings, store, worker, meter, items=rest, collection=collection, already=len(warm)
        )
        logger.info("ingest into %s: %s", kind, out[kind])
    regions_rows = region_rows(settings, names["regions"])
    out["region_rows"] = regions_rows
    out["region_rows_per_image"] = round(regions_rows / len(files), 2)
    return out


# --- searching through the API -----------------------------------------------------------


@dataclass
class Hits:
    """One answer of ``POST /search``: the hits' ids and boxes, its latency and stages."""

    ids: list[str]
    boxes: list[list[float] | None]
    ms: float
    stages: dict[str, float] = field(default_factory=dict)


def search_image(http: httpx.Client, image: bytes, collection: str, topk: int) -> Hits:
    """Upload ``image`` to ``POST /search`` (multipart).

    Raises:
        httpx.HTTPStatusError: the API answered an error.
    """
    began = time.perf_counter()
    answer = http.post(
        "/search",
        files={"file": ("query.png", image, "image/png")},
        data={"topk": str(topk), "collection_name": collection},
    )
    ms = (time.perf_counter() - began) * 1000
    answer.raise_for_status()
    hits = answer.json()
    return Hits([str(h["id"]) for h in hits], [h.get("box") for h in hits], ms, stages_of(answer))


def rank_of(ids: Sequence[str], wanted: str) -> int:
    """0-based rank of ``wanted`` among ``ids``; ``len(ids)`` when absent."""
    return ids.index(wanted) if wanted in ids else len(ids)


def box_has_centre(box: Sequence[float] | None, crop: Box) -> bool:
    """Whether ``box`` (a hit's, normalised) contains the centre of ``crop``."""
    if box is None:
        return False
    cx, cy = (crop[0] + crop[2]) / 2, (crop[1] + crop[3]) / 2
    return bool(box[0] <= cx <= box[2] and box[1] <= cy <= box[3])


def is_region(box: Sequence[float] | None) -> bool:
    """Whether a hit's box is a region (not absent, not the whole image)."""
    return box is not None and tuple(round(float(c), 6) for c in box) != WHOLE


def score_crops(answers: list[Hits], queries: list[Query]) -> dict[str, Any]:
    """R@1/R@5 of the crops' sources; where the source came first, how often its box is a
    region, and how often such a region contains the crop's centre."""
    ranks = [rank_of(a.ids, gallery_id(q.truth)) for a, q in zip(answers, queries, strict=True)]
    first = [(a.boxes[0], q) for a, q, r in zip(answers, queries, ranks, strict=True) if r == 0]
    regions = [(box, q) for box, q in first if is_region(box)]
    centred = [box_has_centre(box, q.box or WHOLE) for box, q in regions]
    return {
        "queries": len(queries),
        "r_at_1": round(float(np.mean([r < 1 for r in ranks])), 3),
        "r_at_5": round(float(np.mean([r < 5 for r in ranks])), 3),
        "first_hit_box_is_region": round(len(regions) / len(first), 3) if first else None,
        "region_box_has_crop_centre": round(float(np.mean(centred)), 3) if centred else None,
    }


def class_p_at_1(answers: list[Hits], queries: list[Query], labels: list[str]) -> float:
    """Share of labelled images whose first hit other than themselves has their class."""
    hits = []
    for answer, query in zip(answers, queries, strict=True):
        others = [i for i in answer.ids if i != gallery_id(query.truth)]
        hits.append(bool(others) and labels[int(others[0][2:])] == labels[query.truth])
    return round(float(np.mean(hits)), 3)


def quality(
    http: httpx.Client, collection: str, queries: dict[str, list[Query]], labels: list[str]
) -> dict[str, Any]:
    """Every query set against ``collection``: the figures and the latencies."""
    answers = {
        name: [search_image(http, q.image, collection, TOP_K) for q in qs]
        for name, qs in queries.items()
    }
    ms = [a.ms for each in answers.values() for a in each]
    dup = [
        rank_of(a.ids, gallery_id(q.truth))
        for a, q in zip(answers["dup"], queries["dup"], strict=True)
    ]
    return {
        "small": score_crops(answers["small"], queries["small"]),
        "large": score_crops(answers["large"], queries["large"]),
        "near_duplicate_r_at_1": round(float(np.mean([r < 1 for r in dup])), 3),
        "class_p_at_1": class_p_at_1(answers["whole"], queries["whole"], labels),
        "searches": len(ms),
        "search_ms_p50": round(benchlib.percentile(ms, 50), 1),
        "search_ms_p99": round(benchlib.percentile(ms, 99), 1),
    }


# --- the collections at scale ------------------------------------------------------------


def _unit(x: Matrix) -> Matrix:
    out: Matrix = (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)
    return out


@dataclass(frozen=True)
class Sources:
    """The gallery's own vectors, which the filler is made from."""

    globals: Matrix  # [G, d]
    regions: Matrix  # [G, R, d]


def embed_sources(gallery: Gallery, threads: int, cache: Path | None, key: str) -> Sources:
    """The gallery's global vectors (224 px) and its regions (the recipe at the region model's
    size), in-process: what the worker stores, up to the preprocessing's resampling."""
    embedder = Embedder(threads, cache)
    whole = embedder.embed(f"gallery-{key}", gallery.images, [WHOLE], SPEC.image_size)[:, 0]
    regions = embedder.embed(f"gallery-{key}", gallery.images, BOXES, REGION_SPEC.image_size)
    return Sources(_unit(whole), _unit(regions))


def filler(
    sources: Sources, first: int, count: int, *, seed: int, noise: float
) -> tuple[Matrix, Matrix]:
    """Items ``first`` .. ``first + count - 1`` of the filler: item ``k`` is gallery image
    ``k % G``'s global and region vectors plus ``noise`` times a unit vector shared by the
    item and ``noise / 2`` times one of each vector's own, renormalised (seeded by ``k``).
    Returns ``([count, d], [count, R, d])``."""
    source = np.arange(first, first + count) % len(sources.globals)
    stacked = np.concatenate([sources.globals[source][:, None], sources.regions[source]], axis=1)
    rng = np.random.default_rng([seed, first])
    shared = _unit(rng.standard_normal((count, 1, stacked.shape[-1]), dtype=np.float32))
    own = _unit(rng.standard_normal(stacked.shape, dtype=np.float32))
    out = _unit(stacked + noise * shared + noise / 2 * own)
    return out[:, 0], out[:, 1:]


def fill(
    store: VectorStore,
    name: str,
    sources: Sources,
    target: int,
    *,
    seed: int,
    noise: float,
    batch: int = 64,
) -> int:
    """Write filler items ``fill-<n>`` into ``name`` until it holds ``target`` rows (into a
    collection with regions, each item's regions first: ``VectorStore.upsert``); how many
    items were written."""
    start = store.count(name)
    for first in range(start, target, batch):
        count = min(batch, target - first)
        vectors, regions = filler(sources, first, count, seed=seed, noise=noise)
        ids = [f"fill-{first + n:06d}" for n in range(count)]
        records = [
            VectorRecord(
                id=item_id,
                vector=vectors[n],
                event_version=1,
                regions=ItemRegions(item_id, 1, BOXES, regions[n]),
            )
            for n, item_id in enumerate(ids)
        ]
        store.upsert(records, name)
    return max(0, target - start)


def timed_searches(
    http: httpx.Client, names: dict[str, str], uploads: list[bytes], count: int
) -> dict[str, Any]:
    """``count`` searches by image on each collection, alternating query by query (so both
    see the same load), after 5 untimed ones each: p50/p99 and each stage's."""
    for image in uploads[:5]:
        for name in names.values():
            search_image(http, image, name, SCALE_TOP_K)
    answers: dict[str, list[Hits]] = {kind: [] for kind in names}
    for n in range(count):
        image = uploads[n % len(uploads)]
        for kind, name in names.items():
            answers[kind].append(search_image(http, image, name, SCALE_TOP_K))
    out: dict[str, Any] = {}
    for kind, each in answers.items():
        ms = [a.ms for a in each]
        out[kind] = {
            "queries": len(ms),
            "p50_ms": round(benchlib.percentile(ms, 50), 1),
            "p99_ms": round(benchlib.percentile(ms, 99), 1),
            "stages": stage_summary(ms, [StagedAnswer([], a.stages) for a in each]),
        }
    return out


def index_state(client: MilvusClient, milvus: MilvusSettings, name: str) -> dict[str, int]:
    """Rows of ``name`` that its index covers, and that the query nodes serve (in all, and from
    segments loaded with their index)."""
    index = client.describe_index(name, client.list_indexes(name)[0])
    # The served segments are only in pymilvus's ORM API.
    connections.connect(alias="bench-region-search", uri=milvus.uri, token=milvus.token)
    segments = utility.get_query_segment_info(name, using="bench-region-search")
    return {
        "indexed_rows": int(index.get("indexed_rows", 0)),
        "served_rows": sum(s.num_rows for s in segments),
        "served_from_index_rows": sum(s.num_rows for s in segments if s.index_name),
    }


def index_states(milvus: MilvusSettings, names: Sequence[str]) -> dict[str, dict[str, int]]:
    """:func:`index_state` of each of ``names``."""
    client = MilvusClient(uri=milvus.uri, token=milvus.token)
    try:
        return {name: index_state(client, milvus, name) for name in names}
    finally:
        client.close()


def settle_one(
    client: MilvusClient,
    milvus: MilvusSettings,
    name: str,
    rows: int,
    deadline: float,
    *,
    compact: bool,
) -> dict[str, Any]:
    """Flush (and ``compact``) ``name``, then wait (until ``deadline``, monotonic) for its index
    to cover ``rows`` and the query nodes to serve them; what it reached, and whether in time.

    ``bench_search.settle`` also waits for ``pending_index_rows`` to reach 0, which Milvus
    2.3.5 goes on reporting at the total for collections written in many small upserts. The
    segments that the compaction merges are indexed again afterwards, behind the rows counted
    here: :func:`wait_quiet` (Milvus's CPU) waits for that.
    """
    client.flush(name)
    job = client.compact(name) if compact else None
    while True:
        state = index_state(client, milvus, name)
        done = (job is None or client.get_compaction_state(job) == "Completed") and min(
            state["indexed_rows"], state["served_rows"]
        ) >= rows
        if done or time.monotonic() >= deadline:
            return {**state, "rows": rows, "settled": done}
        time.sleep(2.0)


def settle_all(
    settings: Settings, pieces: Sequence[tuple[str, int]], timeout: float, *, compact: bool
) -> dict[str, Any]:
    """:func:`settle_one` for each ``(collection, rows)``, up to ``timeout`` in all: each one's
    state, and ``settled`` (all of them in time). Compact only after writing: each compaction
    of a settled collection merges segments that Milvus then indexes again (minutes)."""
    deadline = time.monotonic() + timeout
    client = MilvusClient(uri=settings.milvus.uri, token=settings.milvus.token)
    try:
        states = {
            name: settle_one(client, settings.milvus, name, rows, deadline, compact=compact)
            for name, rows in pieces
        }
    finally:
        client.close()
    return {"settled": all(s["settled"] for s in states.values()), "collections": states}


def _tree_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


def collection_storage(milvus: MilvusSettings, data: Path, name: str) -> dict[str, int]:
    """Bytes on disk and in the query nodes' memory of the segments ``name`` is served from:
    their binlogs (insert, stats, delta) and index files under the Milvus data folder ``data``
    (local storage), and their ``mem_size``. Files of segments compacted away or dropped and not
    yet collected, and the message log, are not counted."""
    connections.connect(alias="bench-region-search", uri=milvus.uri, token=milvus.token)
    segments = utility.get_query_segment_info(name, using="bench-region-search")
    storage, disk = data / "storage", 0
    for segment in segments:
        parts = (str(segment.collectionID), str(segment.partitionID), str(segment.segmentID))
        for kind in ("insert_log", "stats_log", "delta_log"):
            disk += _tree_bytes(storage.joinpath(kind, *parts))
        for index in storage.glob(f"index_files/*/*/{parts[1]}/{parts[2]}"):
            disk += _tree_bytes(index)
    return {
        "rows": sum(s.num_rows for s in segments),
        "disk_bytes": disk,
        "memory_bytes": sum(s.mem_size for s in segments),
    }


def storage_per_image(run: ScaleRun) -> dict[str, Any]:
    """:func:`collection_storage` of each collection of the pair (with the region companion),
    and per image."""
    data = run.stack.config.folder("milvus") / "data"
    milvus = run.settings.milvus
    out: dict[str, Any] = {}
    for kind, name in run.names.items():
        parts = [name, region_collection(name)] if kind == "regions" else [name]
        each = {part: collection_storage(milvus, data, part) for part in parts}
        images = each[name]["rows"] or 1
        out[kind] = {
            "collections": each,
            "disk_bytes_per_image": round(sum(e["disk_bytes"] for e in each.values()) / images),
        }
    return out


def pieces_of(name: str, *, regions: bool, rows: int) -> list[tuple[str, int]]:
    """What a collection's settling waits for: its rows, and its region companion's."""
    own = [(name, rows)]
    return [*own, (region_collection(name), rows * len(BOXES))] if regions else own


def realism(sources: Sources, seed: int, noise: float) -> dict[str, float]:
    """How the filler sits among the gallery: the mean cosine of a filler item's global vector
    to its source's, and the gallery's own mean nearest-neighbour cosine."""
    made, _ = filler(sources, 0, len(sources.globals), seed=seed, noise=noise)
    to_source = np.einsum("nd,nd->n", made, sources.globals)
    cosines = sources.globals @ sources.globals.T
    np.fill_diagonal(cosines, -1.0)
    return {
        "filler_cosine_to_source": round(float(to_source.mean()), 3),
        "gallery_nearest_neighbour_cosine": round(float(cosines.max(axis=1).mean()), 3),
    }


@dataclass
class ScaleRun:
    """What the scale phase works with."""

    args: argparse.Namespace
    settings: Settings
    stack: LocalStack
    store: VectorStore
    names: dict[str, str]  # "plain" / "regions" -> collection


def fill_and_measure(run: ScaleRun, gallery: Gallery) -> dict[str, Any]:
    """Fill each collection in turn, settle it, and measure the Milvus data folder's growth
    over it: bytes per image of each."""
    args = run.args
    sources = embed_sources(gallery, args.threads, args.cache, gallery.signature())
    data = run.stack.config.folder("milvus") / "data"
    out: dict[str, Any] = {"filled_at": benchlib._now(), "noise": args.noise}
    out.update(realism(sources, args.seed, args.noise))
    for kind in ("regions", "plain"):
        name = run.names[kind]
        before, began = folder_bytes(data), time.monotonic()
        written = fill(
            run.store, name, sources, args.scale_images, seed=args.seed, noise=args.noise
        )
        out[f"{kind}_fill_s"] = round(time.monotonic() - began, 1)
        pieces = pieces_of(name, regions=kind == "regions", rows=args.scale_images)
        settled = settle_all(run.settings, pieces, args.settle_timeout, compact=True)
        out[f"{kind}_settled"] = settled["settled"]
        out[f"{kind}_settle_s"] = round(time.monotonic() - began - out[f"{kind}_fill_s"], 1)
        time.sleep(5)  # the flushed segments' files land
        # The whole data folder: the message log too, and what Milvus's garbage collection
        # removed meanwhile (files of dropped collections), so only a rough figure.
        out[f"{kind}_data_folder_growth_per_image"] = round(
            (folder_bytes(data) - before) / max(1, written)
        )
        logger.info("filled %s with %d items in %.0f s", name, written, out[f"{kind}_fill_s"])
    return out


def scale(
    run: ScaleRun, http: httpx.Client, meter: CpuMeter, gallery: Gallery, uploads: list[bytes]
) -> dict[str, Any]:
    """Fill the pair up to ``--scale-images`` (or reuse it), settle, time searches by image."""
    args = run.args
    record = args.results.parent / SCALE_RECORD
    out: dict[str, Any] = {"images": args.scale_images, "collections": run.names}
    for kind, name in run.names.items():
        # A pair kept by an earlier run (--keep-scale) is reused as it is.
        if not run.store.collection_exists(name):
            create_through_api(http, name, regions=kind == "regions")
    counts = [run.store.count(name) for name in run.names.values()]
    if min(counts) < args.scale_images:
        out["fill"] = fill_and_measure(run, gallery)
        if args.keep_scale:
            record.write_text(json.dumps(out["fill"], indent=2))
    else:
        with contextlib.suppress(OSError, ValueError):
            out["fill"] = {**json.loads(record.read_text()), "reused": True}
    pieces = [
        piece
        for kind, name in run.names.items()
        for piece in pieces_of(name, regions=kind == "regions", rows=args.scale_images)
    ]
    logger.info("settling %s (up to %.0f s)", list(run.names.values()), args.settle_timeout)
    out["settle"] = settle_all(run.settings, pieces, args.settle_timeout, compact=False)
    out["settled"] = out["settle"]["settled"]
    logger.info("settled: %s; waiting for Milvus to go idle", out["settle"])
    out["storage"] = storage_per_image(run)
    out["milvus_idle"], out["milvus_cores_before"] = wait_quiet(
        meter, "milvus", below=0.15, window=5.0, timeout=args.idle_timeout
    )
    # What the searches below meet: rows served, and served from an index (handed off).
    out["served"] = index_states(run.settings.milvus, [name for name, _ in pieces])
    out["top_before"] = top_snapshot()
    with benchlib.LoadSampler() as sampler:
        meter.start()
        out["search"] = timed_searches(http, run.names, uploads, args.scale_queries)
        spent, wall = meter.stop()
    out["cores_while_searching"] = {k: round(v / wall, 3) for k, v in spent.items()}
    out["load_while_searching"] = sampler.summary()
    return out


# --- the run -----------------------------------------------------------------------------


@contextlib.contextmanager
def collections_dropped(store: VectorStore, names: Sequence[str]) -> Iterator[None]:
    """Drop ``names`` on exit, whatever happened."""
    try:
        yield
    finally:
        for name in names:
            with contextlib.suppress(Exception):
                store.drop_collection(name)


def quality_phase(
    run: ScaleRun,
    http: httpx.Client,
    meter: CpuMeter,
    gallery: Gallery,
    *,
    queries: dict[str, list[Query]],
    folder: Path,
) -> dict[str, Any]:
    """Create the pair through the API, ingest the gallery through the worker, search every
    query on both."""
    files = write_gallery(gallery, folder / "images")
    out: dict[str, Any] = {}
    for kind, name in run.names.items():
        out[f"{kind}_stats"] = create_through_api(http, name, regions=kind == "regions")
    config = write_app_settings(run.settings, folder / "bench.yaml")
    worker = AppProcess.worker(config, "worker-1", folder)
    meter.roots["worker"] = worker.process.pid
    with running([worker]):
        out["ingest"] = ingest(run.settings, run.store, worker, meter, files=files, names=run.names)
    for kind, name in run.names.items():
        out[kind] = quality(http, name, queries, gallery.labels)
        logger.info("quality of %s: %s", kind, out[kind])
    return out


def measure(args: argparse.Namespace, stack: LocalStack, folder: Path) -> dict[str, Any]:
    """Both phases, with the API (and, for ingest, a worker) of this run."""
    config = stack.config
    settings = bench_settings(
        kafka=config.kafka_bootstrap,
        triton_grpc=config.triton_grpc_url,
        milvus=config.milvus_uri,
        milvus_token=stack.milvus.token,
        image_root=folder / "images",
        quick=args.quick,
        api={"port": args.api_port},
    )
    base = settings.milvus.collection
    names = {"plain": base, "regions": f"{base}_regions"}
    ensure_topics(settings.kafka)
    serve_region_model(stack)
    gallery = build_gallery(args.stamps, args.per_class, args.min_side)
    sets = build_queries(gallery, args.crops, args.seed)
    queries = query_sets(gallery, sets, args.max_queries)
    logger.info(
        "set: %d images, queries %s", len(gallery.images), {k: len(v) for k, v in queries.items()}
    )
    meter = CpuMeter({"milvus": stack.milvus.process.pid(), "triton": stack.triton.process.pid()})
    api = AppProcess.api(write_app_settings(settings, folder / "api.yaml"), args.api_port, folder)
    meter.roots["query-api"] = api.process.pid
    store = VectorStore(settings.milvus)
    out: dict[str, Any] = {"gallery": len(gallery.images), "regions_per_image": len(BOXES)}
    try:
        with (
            running([api]),
            httpx.Client(base_url=f"http://127.0.0.1:{args.api_port}", timeout=120) as http,
        ):
            wait_http(f"http://127.0.0.1:{args.api_port}/health", api)
            if "quality" in args.phases:
                with collections_dropped(store, list(names.values())):
                    run = ScaleRun(args, settings, stack, store, names)
                    out.update(
                        quality_phase(run, http, meter, gallery, queries=queries, folder=folder)
                    )
            if "scale" not in args.phases:
                return out
            scale_names = {
                "plain": f"{args.scale_collection}_plain",
                "regions": args.scale_collection,
            }
            kept = [] if args.keep_scale else list(scale_names.values())
            with collections_dropped(store, kept):
                uploads = [q.image for q in queries["small"]]
                run = ScaleRun(args, settings, stack, store, scale_names)
                out["scale"] = scale(run, http, meter, gallery, uploads)
    finally:
        with contextlib.suppress(Exception):
            delete_consumer_group(settings.kafka, settings.kafka.group_id, timeout_s=30)
        store.close()
    return out


def headline(figures: dict[str, Any]) -> dict[str, Any]:
    """The ``regions_*`` keys of ``latest.json``."""
    out: dict[str, Any] = {}
    for suffix, kind in (("", "regions"), ("_without", "plain")):
        q = figures.get(kind)
        if q is not None:
            out[f"regions_detail_r1{suffix}"] = q["small"]["r_at_1"]
            out[f"regions_detail_r5{suffix}"] = q["small"]["r_at_5"]
            out[f"regions_large_r1{suffix}"] = q["large"]["r_at_1"]
            out[f"regions_large_r5{suffix}"] = q["large"]["r_at_5"]
            out[f"regions_class_p1{suffix}"] = q["class_p_at_1"]
            out[f"regions_dup_r1{suffix}"] = q["near_duplicate_r_at_1"]
        if "ingest" in figures:
            out[f"regions_ingest_ips{suffix}"] = figures["ingest"][kind]["images_per_s"]
        if "scale" in figures:
            search = figures["scale"]["search"][kind]
            out[f"regions_search_image_p50_ms_20k{suffix}"] = search["p50_ms"]
            out[f"regions_search_image_p99_ms_20k{suffix}"] = search["p99_ms"]
    if "ingest" in figures:
        out["regions_ingest_cost_ratio"] = round(
            out["regions_ingest_ips_without"] / out["regions_ingest_ips"], 2
        )
    storage = figures.get("scale", {}).get("storage")
    if storage:
        out["regions_bytes_per_image"] = storage["regions"]["disk_bytes_per_image"]
        out["regions_bytes_per_image_without"] = storage["plain"]["disk_bytes_per_image"]
    out["regions_raw_bytes_per_image"] = RAW_BYTES_PER_IMAGE
    out["regions_raw_bytes_per_image_without"] = SPEC.output_dim * 4
    return out


def table(figures: dict[str, Any], head: dict[str, Any]) -> str:
    """A markdown table: each figure without and with regions."""
    rows = [
        ("detail 8-20 % R@1 / R@5", "regions_detail_r1", "regions_detail_r5"),
        ("25-60 % R@1 / R@5", "regions_large_r1", "regions_large_r5"),
        ("class P@1", "regions_class_p1", None),
        ("near-duplicate R@1", "regions_dup_r1", None),
        ("ingest images/s", "regions_ingest_ips", None),
        (
            f"search by image p50 / p99 ms at {figures.get('scale', {}).get('images')}",
            "regions_search_image_p50_ms_20k",
            "regions_search_image_p99_ms_20k",
        ),
        (
            "Milvus disk bytes per image (raw floats)",
            "regions_bytes_per_image",
            "regions_raw_bytes_per_image",
        ),
    ]
    lines = ["| figure | without regions | with regions |", "|---|---|---|"]
    for title, first, second in rows:
        cells = []
        for suffix in ("_without", ""):
            values = [head.get(f"{first}{suffix}")]
            if second:
                values.append(head.get(f"{second}{suffix}"))
            cells.append(" / ".join("-" if v is None else str(v) for v in values))
        lines.append(f"| {title} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Parse, run, print, record; returns the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    parser.add_argument("--stack-root", type=Path, default=Path(".stack"))
    parser.add_argument("--port-offset", type=int, default=None, help="test-stack ports + N")
    parser.add_argument("--api-port", type=int, default=18190)
    parser.add_argument("--stamps", type=Path, default=STAMPS)
    parser.add_argument("--per-class", type=int, default=8)
    parser.add_argument("--min-side", type=int, default=128)
    parser.add_argument("--crops", type=int, default=2, help="queries per image and crop set")
    parser.add_argument("--max-queries", type=int, default=None, help="per query set")
    parser.add_argument("--seed", type=int, default=24)
    parser.add_argument("--scale-images", type=int, default=20_000)
    parser.add_argument("--scale-queries", type=int, default=300)
    parser.add_argument("--scale-collection", default="bench_region_search_scale")
    parser.add_argument("--keep-scale", action="store_true", help="keep (and reuse) the pair")
    parser.add_argument("--noise", type=float, default=1.2, help="the filler's noise")
    parser.add_argument("--settle-timeout", type=float, default=3600.0)
    parser.add_argument("--idle-timeout", type=float, default=1800.0)
    parser.add_argument("--threads", type=int, default=2, help="in-process embedding threads")
    parser.add_argument("--cache", type=Path, default=None, help="keep the filler's sources")
    parser.add_argument(
        "--phases",
        nargs="+",
        choices=("quality", "scale"),
        default=["quality", "scale"],
        help="quality: ingest and search the set; scale: search by image at --scale-images",
    )
    parser.add_argument("--quick", action="store_true", help="small sizes: checks the script")
    parser.add_argument("--results", type=Path, default=benchlib.DEFAULT_RESULTS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per search otherwise
    if args.quick:
        args.per_class, args.crops, args.max_queries = 2, 1, args.max_queries or 25
        args.scale_images, args.scale_queries = min(args.scale_images, 500), 20
        # Segments of a few hundred rows are never indexed (Milvus's index threshold): the
        # quick run does not wait for indexes it will not get.
        args.settle_timeout, args.idle_timeout = min(args.settle_timeout, 10), 10
        args.scale_collection += "_quick"  # never a full-size pair kept by --keep-scale
    benchlib.exit_on_sigterm()
    stack = stack_of(args.stack_root, args.port_offset)
    folder = Path(tempfile.mkdtemp(prefix="bench-region-search-"))
    top_before = top_snapshot()
    try:
        with benchlib.LoadSampler() as sampler:
            figures = measure(args, stack, folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    figures["top_before"] = top_before
    head = headline(figures)
    print(table(figures, head))
    print(sampler.describe())
    path = benchlib.record(
        "region_search",
        figures,
        headline=head,
        sampler=sampler,
        quick=args.quick,
        path=args.results,
    )
    print(f"results merged into {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
