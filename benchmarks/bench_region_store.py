"""Region vectors in Milvus (issue 24): storage per image and search latency over regions.

Writes ``--images`` items into a collection made with regions (the settings' index, Lite0's
dimension and region recipe): each item its global vector and one vector per region of
:data:`engine.models.UINT8_MODEL_SPEC`'s recipe, through ``VectorStore.upsert`` and
``VectorStore.upsert_regions`` (one call per item, as the worker will). The vectors are
synthetic but clustered like embeddings (unit vectors around ``--clusters`` centres, regions
around their image's vector). Then flushes, waits for both indexes, and reports:

- storage per image: the Milvus data folder's growth (flushed segments and their index files)
  over the images, and the raw floats (17 vectors x 1280 x 4 bytes);
- ``search_regions`` with two query vectors (a query embedded at 224 and at the region size),
  limit 10, p50/p99 over ``--queries`` sequential searches, beside a global ``search``;
- the write time per item of ``upsert_regions_of`` (its upserts and its delete of older
  versions).

From the repository root, against a running stack (its settings, its Milvus data folder)::

    .venv/bin/python benchmarks/bench_region_store.py --root .stack [--images 2000]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import subprocess
import time
import uuid
from pathlib import Path

import numpy as np
import numpy.typing as npt

import benchlib
from devstack.config import StackConfig
from devstack.stack import LocalStack
from engine.models import UINT8_MODEL_SPEC
from engine.records import VectorRecord
from engine.store import ItemRegions, VectorStore, region_collection

logger = logging.getLogger(__name__)

SPEC = UINT8_MODEL_SPEC
RESULTS = Path("bench/results/region_store.json")
Matrix = npt.NDArray[np.float32]


def _unit(x: Matrix) -> Matrix:
    out: Matrix = (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)
    return out


def _folder_bytes(folder: Path) -> int:
    done = subprocess.run(["du", "-sb", str(folder)], capture_output=True, text=True, check=True)
    return int(done.stdout.split()[0])


def _wait_indexed(store: VectorStore, name: str, deadline_s: float) -> None:
    """Flush ``name`` and wait (up to ``deadline_s``) until its index covers every row."""
    client = store._connect()
    client.flush(name)
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        index = client.describe_index(name, index_name=client.list_indexes(name)[0])
        # Milvus 2.3 may go on reporting pending rows of compacted segments: indexed is done.
        if index.get("indexed_rows", 0) >= index.get("total_rows", 1):
            return
        time.sleep(1.0)
    logger.warning("index of %s not finished within %.0f s", name, deadline_s)


def main() -> int:
    """Fill, measure, print, record; returns the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--root", type=Path, default=Path(".stack"), help="the stack's root")
    parser.add_argument("--milvus-port", type=int, default=None)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--clusters", type=int, default=100)
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--batch", type=int, default=32, help="items per upsert_regions_of")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    extra = {} if args.milvus_port is None else {"milvus_port": args.milvus_port}
    local = LocalStack(StackConfig(root=args.root, **extra))
    store = VectorStore(local.settings().milvus)
    assert SPEC.regions is not None
    boxes = SPEC.regions.boxes
    dim = SPEC.output_dim
    rng = np.random.default_rng(24)
    centres = _unit(rng.normal(size=(args.clusters, dim)).astype(np.float32))
    images = _unit(
        centres[rng.integers(0, args.clusters, args.images)]
        + 0.6 * _unit(rng.normal(size=(args.images, dim)).astype(np.float32))
    )
    name = f"bench_regions_{uuid.uuid4().hex[:8]}"
    data = local.config.folder("milvus") / "data"
    before = _folder_bytes(data)
    store.create_collection(name, dimension=dim, model_name=SPEC.name, regions=True)
    try:
        with benchlib.LoadSampler() as sampler:
            began = time.perf_counter()
            store.upsert(
                [
                    VectorRecord(id=f"img{i}", vector=v, event_version=1)
                    for i, v in enumerate(images)
                ],
                name,
            )
            write_s, regions = [], {}
            for first in range(0, args.images, args.batch):
                batch = []
                for i in range(first, min(first + args.batch, args.images)):
                    noise = _unit(rng.normal(size=(len(boxes), dim)).astype(np.float32))
                    regions[i] = _unit(images[i] + 0.8 * noise)
                    batch.append(ItemRegions(f"img{i}", 1, boxes, regions[i]))
                started = time.perf_counter()
                store.upsert_regions_of(batch, name)
                write_s.append((time.perf_counter() - started) / len(batch))
            fill_s = time.perf_counter() - began
            for each in (name, region_collection(name)):
                _wait_indexed(store, each, 600)
            time.sleep(5)  # the flushed segments' files land
            grown = _folder_bytes(data) - before
            picks = rng.integers(0, args.images, args.queries)
            region_ms, global_ms, hit = [], [], 0
            for q, i in enumerate(picks):
                box = int(rng.integers(0, len(boxes)))
                near = regions[int(i)][box]
                q224 = _unit(near + 0.3 * _unit(rng.normal(size=dim).astype(np.float32)))
                q128 = _unit(near + 0.3 * _unit(rng.normal(size=dim).astype(np.float32)))
                started = time.perf_counter()
                found = store.search_regions([q224, q128], 10, name)
                region_ms.append((time.perf_counter() - started) * 1000)
                hit += bool(found) and found[0].id == f"img{i}"
                started = time.perf_counter()
                store.search(q224, top_k=10, collection=name)
                global_ms.append((time.perf_counter() - started) * 1000)
                if q == 0:
                    region_ms.clear()
                    global_ms.clear()  # the first search loads what it needs
        figures = {
            "images": args.images,
            "regions_per_image": len(boxes),
            "index": store.describe_collection(name).index.index_type,
            "raw_vector_bytes_per_image": (len(boxes) + 1) * dim * 4,
            "milvus_data_bytes_per_image": round(grown / args.images),
            "fill_s": round(fill_s, 1),
            "regions_write_batch": args.batch,
            "upsert_regions_ms_per_item_p50": round(statistics.median(write_s) * 1000, 1),
            "upsert_regions_ms_per_item_p99": round(
                benchlib.percentile([w * 1000 for w in write_s], 99), 1
            ),
            "search_regions_ms_p50": round(statistics.median(region_ms), 1),
            "search_regions_ms_p99": round(benchlib.percentile(region_ms, 99), 1),
            "search_global_ms_p50": round(statistics.median(global_ms), 1),
            "search_global_ms_p99": round(benchlib.percentile(global_ms, 99), 1),
            "region_top1_is_source": round(hit / max(1, len(picks)), 3),
        }
        print(figures)
        print(sampler.describe())
        benchlib.record("region_store", figures, sampler=sampler, path=args.results)
    finally:
        store.drop_collection(name)
        store.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
