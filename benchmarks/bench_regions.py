"""Region vectors: finding an image by a detail of it, method by method (issue 24, item 1).

Research, in-process: which region vectors per image find the source of a detail crop, at what
ingest cost, and without hurting whole-image search.

**The set** (offline images only, deterministic for ``--seed``):

- gallery: the photo-like PNG stamps of Debian's ``tuxpaint-stamps-default`` as
  ``bench_int8.py`` builds them (composited on white, one class per leaf folder), kept when both
  sides are >= ``--min-side`` px, at most ``--per-class`` a class, classes of >= 3 such images;
  plus scikit-image's photographs (``devstack.samples.skimage_images``) of that size.
- queries: ``--crops`` seeded random crops per gallery image of 8-20 % of its area (aspect
  3:4 to 4:3), and as many of 25-60 %; a crop whose grey levels barely vary (a patch of the
  stamps' white background, which nobody searches by) is drawn again, up to 20 times.
- whole-image checks, as ``bench_int8.py``: class P@1 (leave-one-out, labelled images only) and
  near-duplicate R@1 (seeded shift, brightness, JPEG), gallery with its regions.

**Embedding**: EfficientNet-Lite0 uint8 (``UINT8_MODEL_SPEC``, the service's model) converted in
this run from its packaged weights, onnxruntime, ``--threads`` threads. Every crop (query or
region) is embedded like a whole image: the service's preprocessing (``reference_pixels``:
shorter side to ``resize_short_side``, centre crop), at 224 px or, for regions at a smaller
input, the same graph built for that size with the spec's resize ratio. Cost is counted in
224-px model runs, area-proportional (a 112-px region costs 0.25).

**Scoring**: an image's score is the best cosine of any query vector against its global vector
and its region vectors; R@1 and R@5 of the source image. Optional per method: PCA or PCA
whitening of all vectors, learned on the gallery's own vectors; a re-ranking stage that scores
the first stage's top K images with dense regions computed at query time (its cost per query is
stated in the table, not added to ingest).

From the repository root (``--cache`` keeps the embeddings between runs)::

    .venv/bin/python benchmarks/bench_regions.py [--quick] [--cache /tmp/regions-cache]
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import math
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
from bench_int8 import STAMPS, labelled_set, near_duplicate
from PIL import Image

import benchlib
from devstack.samples import skimage_images
from engine.models import UINT8_MODEL_SPEC, ModelSpec
from engine.resampling import reference_pixels
from model_build.efficientnet_lite import build_embedding_model, load_packaged_weights

logger = logging.getLogger(__name__)

SPEC = UINT8_MODEL_SPEC
BASE_SIZE = SPEC.image_size
RESULTS = Path("bench/results/regions.json")
Box = tuple[float, float, float, float]  # normalised x0, y0, x1, y1
WHOLE: Box = (0.0, 0.0, 1.0, 1.0)
Matrix = npt.NDArray[np.float32]
Pixels = npt.NDArray[np.uint8]
SMALL_AREA = (0.08, 0.20)
LARGE_AREA = (0.25, 0.60)
# A crop whose grey levels vary less than this (std, 0-255) is background: drawn again.
MIN_CROP_STD = 12.0
PHOTO_PREFIX = "skimage/"  # a photo's label: a class of its own, never a class P@1 query
TARGET = {"r1": 0.90, "r5": 0.97, "cost": 8.0, "whole_drop": 0.01}


# --- the set -----------------------------------------------------------------------------


@dataclass
class Gallery:
    images: list[Image.Image]
    labels: list[str]  # a stamp's folder; a photo is a class of its own ("skimage/<name>")

    def signature(self) -> str:
        """A short digest of the images' sizes and labels: part of every cache key."""
        text = repr([(im.size, lab) for im, lab in zip(self.images, self.labels, strict=True)])
        return hashlib.sha256(text.encode()).hexdigest()[:12]


def is_photo(label: str) -> bool:
    return label.startswith(PHOTO_PREFIX)


def _on_white(image: Image.Image) -> Image.Image:
    rgba = image.convert("RGBA")
    canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(canvas, rgba).convert("RGB")


def build_gallery(stamps: Path, per_class: int, min_side: int) -> Gallery:
    """Stamps of >= ``min_side`` px (classes of >= 3 of them) plus scikit-image's photos.

    Raises:
        SystemExit: the stamps are not installed.
        ModuleNotFoundError: scikit-image is not installed.
    """
    images, labels = labelled_set(stamps, per_class=1 << 20, limit=1 << 20)
    by_class: dict[str, list[Image.Image]] = {}
    for image, label in zip(images, labels, strict=True):
        if min(image.size) >= min_side:
            by_class.setdefault(label, []).append(image)
    gallery = Gallery([], [])
    for label, members in sorted(by_class.items()):
        if len(members) >= 3:
            gallery.images += members[:per_class]
            gallery.labels += [label] * len(members[:per_class])
    for path in skimage_images():
        with Image.open(path) as img:
            photo = _on_white(img)
        if min(photo.size) >= min_side:
            gallery.images.append(photo)
            gallery.labels.append(f"{PHOTO_PREFIX}{path.stem}")
    return gallery


def _random_crop(
    rng: np.random.Generator, image: Image.Image, area: tuple[float, float]
) -> tuple[Image.Image, Box]:
    """A seeded crop of ``image`` and where it was, normalised."""
    width, height = image.size
    crop, box = image, WHOLE
    for _ in range(20):
        fraction = rng.uniform(*area)
        aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        w = min(width, max(8, round(math.sqrt(fraction * width * height * aspect))))
        h = min(height, max(8, round(fraction * width * height / w)))
        x0, y0 = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
        crop = image.crop((x0, y0, x0 + w, y0 + h))
        box = (x0 / width, y0 / height, (x0 + w) / width, (y0 + h) / height)
        if float(np.asarray(crop.convert("L"), np.float32).std()) >= MIN_CROP_STD:
            break
    return crop, box


def detail_crops(
    gallery: Gallery, area: tuple[float, float], per_image: int, seed: int
) -> tuple[list[Image.Image], npt.NDArray[np.int64], list[Box]]:
    """``per_image`` seeded crops of each gallery image, the index of each one's source and
    where in it each crop was (normalised)."""
    rng = np.random.default_rng(seed)
    crops, truth, boxes = [], [], []
    for index, image in enumerate(gallery.images):
        for _ in range(per_image):
            crop, box = _random_crop(rng, image, area)
            crops.append(crop)
            boxes.append(box)
            truth.append(index)
    return crops, np.asarray(truth, np.int64), boxes


# --- regions -----------------------------------------------------------------------------


def windows(side: float, stride: float) -> tuple[Box, ...]:
    """Square-in-normalised-units windows of ``side`` at ``stride`` steps, row-major."""
    count = round((1 - side) / stride) + 1
    starts = [round(min(i * stride, 1 - side), 6) for i in range(count)]
    return tuple((x, y, round(x + side, 6), round(y + side, 6)) for y in starts for x in starts)


def grid(n: int) -> tuple[Box, ...]:
    """The n x n grid's cells."""
    return windows(1 / n, 1 / n)


FAMILIES: dict[str, tuple[Box, ...]] = {
    "2x2": grid(2),
    "3x3": grid(3),
    # windows of a ninth of the image at half steps (5 x 5; includes the 3 x 3 grid)
    "w3": windows(1 / 3, 1 / 6),
    # windows of 0.4 x 0.4 at 0.2 steps (4 x 4)
    "w4": windows(0.4, 0.2),
    # windows of a quarter at quarter steps (3 x 3; includes the 2 x 2 grid)
    "w2": windows(0.5, 0.25),
}


def pixels_for(image: Image.Image, box: Box, size: int) -> Pixels:
    """``box`` of ``image`` preprocessed as the service does a whole image, at ``size`` px."""
    width, height = image.size
    x0, y0, x1, y1 = box
    left, top = round(x0 * width), round(y0 * height)
    right, bottom = max(left + 1, round(x1 * width)), max(top + 1, round(y1 * height))
    crop = image if box == WHOLE else image.crop((left, top, right, bottom))
    pixels: Pixels = reference_pixels(
        np.asarray(crop), image_size=size, resize_short_side=SPEC.resize_short_side_for(size)
    )
    return pixels


class Embedder:
    """Lite0 uint8 sessions per input size; embeds boxes of images, cached on disk if asked."""

    def __init__(self, threads: int, cache: Path | None) -> None:
        self.threads = threads
        self.cache = cache
        self.weights = load_packaged_weights(SPEC)
        self.sessions: dict[int, ort.InferenceSession] = {}

    def session(self, size: int) -> ort.InferenceSession:
        if size not in self.sessions:
            spec: ModelSpec = SPEC.model_copy(
                update={"image_size": size, "resize_short_side": SPEC.resize_short_side_for(size)}
            )
            options = ort.SessionOptions()
            options.intra_op_num_threads = self.threads
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            model = build_embedding_model(self.weights, spec)
            self.sessions[size] = ort.InferenceSession(
                model.SerializeToString(), options, providers=["CPUExecutionProvider"]
            )
        return self.sessions[size]

    def embed(
        self, key: str, images: Sequence[Image.Image], boxes: Sequence[Box], size: int
    ) -> Matrix:
        """Vectors ``[len(images), len(boxes), dims]``; ``key`` names the image set."""

        def pixels(image: Image.Image) -> Pixels:
            return np.stack([pixels_for(image, box, size) for box in boxes])

        return self._cached((key, list(boxes), size), images, pixels, size)

    def embed_mosaics(
        self, key: str, images: Sequence[Image.Image], boxes: Sequence[Box]
    ) -> Matrix:
        """One vector per 2 x 2 mosaic of four boxes at half the input size:
        ``[len(images), ceil(len(boxes) / 4), dims]`` (the last mosaic's free tiles repeat its
        last box)."""
        half = BASE_SIZE // 2

        def pixels(image: Image.Image) -> Pixels:
            tiles = [pixels_for(image, box, half) for box in boxes]
            tiles += [tiles[-1]] * (-len(tiles) % 4)
            quads = np.stack(tiles).reshape(-1, 2, 2, half, half, 3)
            mosaics: Pixels = quads.transpose(0, 1, 3, 2, 4, 5).reshape(-1, BASE_SIZE, BASE_SIZE, 3)
            return mosaics

        return self._cached((key, "mosaic", list(boxes)), images, pixels, BASE_SIZE)

    def _cached(
        self,
        what: object,
        images: Sequence[Image.Image],
        pixels: Callable[[Image.Image], Pixels],
        size: int,
    ) -> Matrix:
        """``pixels`` of each image embedded at ``size``: ``[len(images), per image, dims]``,
        from the cache when it holds ``what``."""
        digest = hashlib.sha256(repr(what).encode()).hexdigest()[:16]
        path = self.cache / f"{digest}.npy" if self.cache else None
        if path is not None and path.exists():
            cached: Matrix = np.load(path)
            return cached
        began, out = time.perf_counter(), []
        for start in range(0, len(images), 8):
            batch = np.concatenate([pixels(im) for im in images[start : start + 8]])
            out.append(self._run(batch, size))
        vectors = np.concatenate(out).reshape(len(images), -1, SPEC.output_dim)
        logger.info(
            "%s: %s at %d px in %.0f s",
            str(what)[:60],
            vectors.shape,
            size,
            time.perf_counter() - began,
        )
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            np.save(path, vectors)
        return vectors

    def cpu_cost(self, sizes: Iterable[int], batch: int = 32, rounds: int = 5) -> dict[int, float]:
        """Measured CPU time of one run at each size over one at 224 px (median of ``rounds``,
        sizes interleaved): the cost the area rule estimates, with the per-run overheads."""
        rng = np.random.default_rng(0)
        ready = {s: rng.integers(0, 256, (batch, s, s, 3), dtype=np.uint8) for s in sizes}
        ready.setdefault(BASE_SIZE, rng.integers(0, 256, (batch, *SPEC.input_dims), np.uint8))
        times: dict[int, list[float]] = {s: [] for s in ready}
        for round_ in range(rounds + 1):
            for size, pixels in ready.items():
                began = time.process_time()
                self._run(pixels, size)
                if round_:  # the first round warms up
                    times[size].append(time.process_time() - began)
        base = statistics.median(times[BASE_SIZE])
        return {s: round(statistics.median(t) / base, 3) for s, t in sorted(times.items())}

    def _run(self, pixels: Pixels, size: int) -> Matrix:
        parts = [
            self.session(size).run([SPEC.output_name], {SPEC.input_name: pixels[i : i + 64]})[0]
            for i in range(0, len(pixels), 64)
        ]
        out: Matrix = np.concatenate(parts).astype(np.float32)
        return out


# --- methods -----------------------------------------------------------------------------

Regions = tuple[tuple[str, int], ...]  # (family, input size) pairs


def distinct_boxes(regions: Regions) -> list[tuple[Box, int]]:
    """The distinct (box, size) pairs of ``regions``, in order."""
    seen: dict[tuple[Box, int], None] = {}
    for family, size in regions:
        for box in FAMILIES[family]:
            seen.setdefault((box, size), None)
    return list(seen)


def runs_of(boxes: Iterable[tuple[Box, int]]) -> float:
    """Model runs in 224-px equivalents: a run's cost is proportional to its input's area."""
    return sum((size / BASE_SIZE) ** 2 for _, size in boxes)


@dataclass(frozen=True)
class Method:
    """Which regions an image stores, how queries are embedded, and what scoring adds.

    ``regions``: (family, input size) pairs; ``query_sizes``: the query is embedded at each
    (the first is the service's path); ``transform``: ``pca<D>`` or ``white<D>`` (PCA, or PCA
    whitening, to D dims, learned on the gallery's vectors); ``rerank``: (K, regions),
    the first stage's top K images scored with those regions computed at query time.
    """

    name: str
    regions: Regions = ()
    query_sizes: tuple[int, ...] = (BASE_SIZE,)
    transform: str | None = None
    rerank: tuple[int, tuple[tuple[str, int], ...]] | None = None
    mosaic: bool = False  # regions tiled 2 x 2 at half size into one model input each
    margin: float = 0.0  # subtracted from region scores: whole images rank by their global
    paired: bool = False  # the global vector is matched by the query's 224-px vector only

    def vectors(self) -> int:
        """Region vectors stored per image."""
        count = len(self.boxes())
        return math.ceil(count / 4) if self.mosaic else count

    def boxes(self) -> list[tuple[Box, int]]:
        """The distinct (box, size) regions, in order."""
        return distinct_boxes(self.regions)

    def cost(self) -> float:
        """Model runs per image at ingest, in 224-px equivalents (area-proportional)."""
        return 1 + (self.vectors() if self.mosaic else runs_of(self.boxes()))

    def measured_cost(self, cpu: dict[int, float]) -> float:
        """Model runs per image at ingest, in 224-px runs' measured CPU time."""
        if self.mosaic:
            return self.cost()
        return 1 + sum(cpu[size] for _, size in self.boxes())

    def query_cost(self) -> float:
        """Model runs per query, in 224-px equivalents, re-ranking included."""
        runs = sum((size / BASE_SIZE) ** 2 for size in self.query_sizes)
        if self.rerank is not None:
            k, regions = self.rerank
            runs += k * runs_of(distinct_boxes(regions))
        return runs

    def dims(self) -> int:
        return int(self.transform.lstrip("pcawhite")) if self.transform else SPEC.output_dim


def _grid_methods() -> list[Method]:
    """The issue's baseline rows, then the cheaper region sets."""
    base = [
        Method("none"),
        Method("2x2 @224", (("2x2", 224),)),
        Method("3x3 @224", (("3x3", 224),)),
        Method("2x2+3x3 @224", (("2x2", 224), ("3x3", 224))),
        Method("2x2+3x3+25 w @224", (("2x2", 224), ("w3", 224))),
        Method("2x2+3x3 @160", (("2x2", 160), ("3x3", 160))),
    ]
    small = [
        Method("25 w @112", (("w3", 112),)),
        Method("2x2+25 w @112", (("2x2", 112), ("w3", 112))),
        Method("25 w @96", (("w3", 96),)),
        Method("2x2+25 w @96", (("2x2", 96), ("w3", 96))),
        Method("9 w2+25 w @96", (("w2", 96), ("w3", 96))),
        Method("16 w4 @128", (("w4", 128),)),
        Method("2x2+16 w4 @128", (("2x2", 128), ("w4", 128))),
        Method("9 w2+16 w4 @112", (("w2", 112), ("w4", 112))),
        Method("2x2 @128+25 w @96", (("2x2", 128), ("w3", 96))),
        Method("9 w2 @112+25 w @96", (("w2", 112), ("w3", 96))),
        Method("16 w4 @112", (("w4", 112),)),
        Method("2x2 @96+25 w @112", (("2x2", 96), ("w3", 112))),
    ]
    return base + small


# The region sets whose PCA / whitening variants are measured.
WHITENED = ("25 w @112, query +112", "16 w4 @128, query +128")


# The methods whose aggregation variants (margin, paired) are measured.
AGGREGATED = ("25 w @112, query +112", "16 w4 @128, query +128")
PROJECTIONS = ("pca256", "white256", "white512")


def _query_variants(found: Sequence[Method]) -> list[Method]:
    """Each small-input region set that fits the cost target, with the query also embedded at
    the regions' size; then the mosaics."""
    extra = [
        Method(f"{m.name}, query +{m.regions[-1][1]}", m.regions, (BASE_SIZE, m.regions[-1][1]))
        for m in found
        if m.regions and m.cost() <= TARGET["cost"] and m.regions[-1][1] != BASE_SIZE
    ]
    extra.append(Method("25 w @112, query +160 +112", (("w3", 112),), (BASE_SIZE, 160, 112)))
    extra.append(Method("25 w @112 as 7 mosaics", (("w3", 112),), mosaic=True))
    extra.append(
        Method("25 w @112 as 7 mosaics, query +112", (("w3", 112),), (BASE_SIZE, 112), mosaic=True)
    )
    return extra


def _scoring_variants(found: Sequence[Method]) -> list[Method]:
    """Margins and paired matching for :data:`AGGREGATED`; PCA and whitening for
    :data:`WHITENED`."""
    extra: list[Method] = []
    for m in [m for m in found if m.name in AGGREGATED]:
        extra.append(replace(m, name=f"{m.name}, paired", paired=True))
        for margin in (0.02, 0.05):
            extra.append(replace(m, name=f"{m.name}, margin {margin}", margin=margin))
            extra.append(
                replace(m, name=f"{m.name}, paired, margin {margin}", margin=margin, paired=True)
            )
    for m in [m for m in found if m.name in WHITENED]:
        extra += [replace(m, name=f"{m.name}, {t}", transform=t) for t in PROJECTIONS]
    return extra


def _rerank_methods() -> list[Method]:
    """A cheap first stage, its top K scored with dense regions computed at query time."""
    dense: Regions = (("2x2", 224), ("w3", 224))
    return [
        Method(
            f"2x2+3x3 @160, rerank top {k} by 2x2+25 w @224",
            (("2x2", 160), ("3x3", 160)),
            rerank=(k, dense),
        )
        for k in (5, 10)
    ]


def methods(quick: bool) -> list[Method]:
    """Every method measured, the issue's baseline rows first."""
    found = _grid_methods()
    if quick:
        found = found[:8]
    found += _query_variants(found)
    return found + _scoring_variants(found) + _rerank_methods()


# --- embedding the set once --------------------------------------------------------------


@dataclass
class Bank:
    """Every vector the methods need, each embedded once: the gallery's boxes per input size and
    each query set at each query size."""

    gallery: dict[tuple[Box, int], Matrix] = field(default_factory=dict)  # [N, dims] each
    queries: dict[tuple[str, int], Matrix] = field(default_factory=dict)  # [Q, dims] each
    mosaics: dict[Regions, Matrix] = field(default_factory=dict)  # [N, mosaics, dims] each

    def regions(self, boxes: Sequence[tuple[Box, int]], count: int) -> Matrix:
        """The gallery's vectors of ``boxes``: ``[count, len(boxes), dims]``."""
        if not boxes:
            return np.zeros((count, 0, SPEC.output_dim), np.float32)
        return np.stack([self.gallery[b] for b in boxes], axis=1)


@dataclass
class QuerySets:
    crops: dict[str, list[Image.Image]]  # "small", "large", "dup"
    truth: dict[str, npt.NDArray[np.int64]]
    # Where each crop of "small" and "large" is in its source image, normalised.
    boxes: dict[str, list[Box]] = field(default_factory=dict)


def build_queries(gallery: Gallery, per_image: int, seed: int) -> QuerySets:
    """The two crop sets and the near-duplicates, seeded."""
    small, small_truth, small_boxes = detail_crops(gallery, SMALL_AREA, per_image, seed)
    large, large_truth, large_boxes = detail_crops(gallery, LARGE_AREA, per_image, seed + 1)
    dups = [near_duplicate(image, n) for n, image in enumerate(gallery.images)]
    everyone = np.arange(len(gallery.images))
    return QuerySets(
        {"small": small, "large": large, "dup": dups},
        {"small": small_truth, "large": large_truth, "dup": everyone, "whole": everyone},
        {"small": small_boxes, "large": large_boxes},
    )


def fill_bank(
    embedder: Embedder, gallery: Gallery, queries: QuerySets, found: Sequence[Method], key: str
) -> Bank:
    """Embed every (family, size) and query set the methods use, once each."""
    bank = Bank()
    units: dict[tuple[str, int], None] = {}
    query_sizes: dict[int, None] = {BASE_SIZE: None}
    for m in found:
        units.update(dict.fromkeys(m.regions + (m.rerank[1] if m.rerank else ())))
        query_sizes.update(dict.fromkeys(m.query_sizes))
    for m in found:
        if m.mosaic:
            boxes = [box for box, _ in m.boxes()]
            bank.mosaics[m.regions] = embedder.embed_mosaics(
                f"gallery-{key}", gallery.images, boxes
            )
    for family, size in units:
        # Families overlap (the 3 x 3 grid is in the 25 windows): embed each box once.
        boxes = [b for b in FAMILIES[family] if (b, size) not in bank.gallery]
        if boxes:
            vectors = embedder.embed(f"gallery-{key}", gallery.images, boxes, size)
            for n, box in enumerate(boxes):
                bank.gallery[(box, size)] = vectors[:, n]
    for size in query_sizes:
        whole = embedder.embed(f"gallery-{key}", gallery.images, [WHOLE], size)[:, 0]
        bank.gallery[(WHOLE, size)] = bank.queries[("whole", size)] = whole
        for name, crops in queries.crops.items():
            bank.queries[(name, size)] = embedder.embed(f"{name}-{key}", crops, [WHOLE], size)[:, 0]
    return bank


# --- scoring -----------------------------------------------------------------------------


def _normalised(x: Matrix) -> Matrix:
    out: Matrix = x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
    return out


class Projection:
    """PCA (``pca<D>``) or PCA whitening (``white<D>``) learned on a gallery's vectors, then
    L2 normalisation."""

    def __init__(self, kind: str, vectors: Matrix) -> None:
        self.mean = vectors.mean(axis=0)
        values, basis = np.linalg.eigh(np.cov((vectors - self.mean).T))
        order = np.argsort(values)[::-1][: int(kind.lstrip("pcawhite"))]
        scale = 1 / np.sqrt(values[order] + 1e-6) if kind.startswith("white") else 1.0
        self.matrix = (basis[:, order] * scale).astype(np.float32)

    def __call__(self, x: Matrix) -> Matrix:
        return _normalised((x - self.mean) @ self.matrix)


def image_scores(queries: Matrix, stored: Matrix) -> Matrix:
    """``[Q, N]``: per image, the best cosine of any query vector (``[Q, m, d]``) with any of
    its stored vectors (``[N, k, d]``)."""
    q, m, d = queries.shape
    n, k, _ = stored.shape
    cosines = queries.reshape(q * m, d) @ stored.reshape(n * k, d).T
    out: Matrix = cosines.reshape(q, m, n, k).max(axis=(1, 3))
    return out


def ranks(scores: Matrix, truth: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
    """0-based rank of each query's source image (ties counted against it)."""
    own = scores[np.arange(len(truth)), truth]
    out: npt.NDArray[np.int64] = np.sum(scores > own[:, None], axis=1)
    return out


def class_p_at_1(scores: Matrix, labels: list[str]) -> float:
    """Leave-one-out class P@1 over the labelled (stamp) images."""
    scores = scores.copy()
    np.fill_diagonal(scores, -np.inf)
    nearest = np.argmax(scores, axis=1)
    hits = [labels[j] == labels[i] for i, j in enumerate(nearest) if not is_photo(labels[i])]
    return float(np.mean(hits, dtype=np.float64))


def _rerank(first: Matrix, second: Matrix, k: int) -> Matrix:
    """The first stage's top ``k`` per query, reordered by the better of both scores, above
    every other image (which keeps its first-stage order)."""
    top = np.argsort(-first, axis=1)[:, :k]
    rows = np.arange(len(first))[:, None]
    out = first.copy()
    lift = float(first.max() - first.min()) + 1.0
    out[rows, top] = np.maximum(first[rows, top], second[rows, top]) + lift
    return out


def evaluate(
    m: Method, bank: Bank, sets: QuerySets, labels: list[str], cpu: dict[int, float]
) -> dict[str, Any]:
    """The method's figures: R@1/R@5 of both crop sets, class P@1, near-duplicate R@1, costs."""
    count = len(labels)
    glob = bank.gallery[(WHOLE, BASE_SIZE)][:, None]
    regions = bank.mosaics[m.regions] if m.mosaic else bank.regions(m.boxes(), count)
    dense = bank.regions(distinct_boxes(m.rerank[1]), count) if m.rerank else regions
    if m.transform:
        project = Projection(
            m.transform, np.concatenate([glob, regions], axis=1).reshape(-1, SPEC.output_dim)
        )
        glob, regions, dense = project(glob), project(regions), project(dense)
    figures: dict[str, Any] = {
        "regions": len(m.boxes()),
        "runs_per_image": round(m.cost(), 2),
        "cpu_runs_per_image": round(m.measured_cost(cpu), 2),
        "query_runs": round(m.query_cost(), 2),
        "floats_per_image": (m.vectors() + 1) * m.dims(),
    }
    for name in ("small", "large", "dup", "whole"):
        queries = np.stack([bank.queries[(name, s)] for s in m.query_sizes], axis=1)
        if m.transform:
            queries = project(queries)
        scores = image_scores(queries[:, :1] if m.paired else queries, glob)
        if regions.shape[1]:
            scores = np.maximum(scores, image_scores(queries, regions) - m.margin)
        if m.rerank:
            scores = _rerank(scores, image_scores(queries, dense), m.rerank[0])
        if name == "whole":
            figures["class_p_at_1"] = round(class_p_at_1(scores, labels), 3)
            continue
        found = ranks(scores, sets.truth[name])
        if name == "dup":
            figures["near_duplicate_r_at_1"] = round(float(np.mean(found < 1)), 3)
            continue
        for k in (1, 5):
            figures[f"{name}_r_at_{k}"] = round(float(np.mean(found < k)), 3)
    return figures


def mosaic_check(bank: Bank, m: Method) -> dict[str, float]:
    """What the model makes of a 2 x 2 mosaic: the mean cosine of a mosaic's vector with each of
    its tiles embedded alone (at the tile's size), and with the normalised mean of those."""
    boxes = m.boxes()
    tiles = bank.regions(boxes, len(bank.gallery[(WHOLE, BASE_SIZE)]))
    tiles = np.concatenate([tiles, np.repeat(tiles[:, -1:], -len(boxes) % 4, axis=1)], axis=1)
    groups = tiles.reshape(tiles.shape[0], -1, 4, tiles.shape[-1])
    mosaics = bank.mosaics[m.regions]
    each = np.einsum("nmd,nmtd->nmt", mosaics, groups)
    mean = np.einsum("nmd,nmd->nm", mosaics, _normalised(groups.mean(axis=2)))
    return {
        "cosine_to_each_tile": round(float(each.mean()), 3),
        "cosine_to_tiles_mean": round(float(mean.mean()), 3),
    }


# --- report ------------------------------------------------------------------------------

COLUMNS = (
    ("regions", "regions"),
    ("runs_per_image", "runs/img"),
    ("cpu_runs_per_image", "CPU runs/img"),
    ("small_r_at_1", "R@1 8-20%"),
    ("small_r_at_5", "R@5 8-20%"),
    ("large_r_at_1", "R@1 25-60%"),
    ("large_r_at_5", "R@5 25-60%"),
    ("class_p_at_1", "class P@1"),
    ("near_duplicate_r_at_1", "dup R@1"),
    ("floats_per_image", "floats/img"),
    ("query_runs", "query runs"),
)


def table(results: dict[str, dict[str, Any]]) -> str:
    """A markdown table of every method's figures."""
    head = "| method | " + " | ".join(title for _, title in COLUMNS) + " |"
    lines = [head, "|---" * (len(COLUMNS) + 1) + "|"]
    for name, figures in results.items():
        lines.append(f"| {name} | " + " | ".join(str(figures[k]) for k, _ in COLUMNS) + " |")
    return "\n".join(lines)


def meets(figures: dict[str, Any], base: dict[str, Any]) -> bool:
    """Whether a method meets every target of the issue."""
    return bool(
        figures["small_r_at_1"] >= TARGET["r1"]
        and figures["small_r_at_5"] >= TARGET["r5"]
        and figures["runs_per_image"] <= TARGET["cost"]
        and base["class_p_at_1"] - figures["class_p_at_1"] <= TARGET["whole_drop"]
        and base["near_duplicate_r_at_1"] - figures["near_duplicate_r_at_1"] <= TARGET["whole_drop"]
    )


def main() -> int:
    """Build the set, embed it, score every method, print and record; returns the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--stamps", type=Path, default=STAMPS)
    parser.add_argument("--per-class", type=int, default=8)
    parser.add_argument("--min-side", type=int, default=128, help="smallest gallery image side")
    parser.add_argument("--crops", type=int, default=2, help="queries per image and crop set")
    parser.add_argument("--seed", type=int, default=24)
    parser.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads")
    parser.add_argument("--cache", type=Path, default=None, help="keep embeddings here")
    parser.add_argument("--quick", action="store_true", help="3 images a class, fewer methods")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.quick:
        args.per_class = 3

    with benchlib.LoadSampler() as sampler:
        began = time.perf_counter()
        gallery = build_gallery(args.stamps, args.per_class, args.min_side)
        sets = build_queries(gallery, args.crops, args.seed)
        found = methods(args.quick)
        key = f"{gallery.signature()}-{args.seed}-{args.crops}"
        embedder = Embedder(args.threads, args.cache)
        bank = fill_bank(embedder, gallery, sets, found, key)
        cpu = embedder.cpu_cost({size for m in found for _, size in m.regions})
        results = {m.name: evaluate(m, bank, sets, gallery.labels, cpu) for m in found}
        elapsed = time.perf_counter() - began

    photos = sum(map(is_photo, gallery.labels))
    classes = len({lab for lab in gallery.labels if not is_photo(lab)})
    make_up = {
        "gallery": len(gallery.images),
        "stamps": len(gallery.images) - photos,
        "stamp_classes": classes,
        "photos": photos,
        "queries_per_crop_set": len(sets.truth["small"]),
        "min_side": args.min_side,
        "seed": args.seed,
    }
    print(f"set: {make_up}; {elapsed:.0f} s")
    print(f"CPU time of a run against one at {BASE_SIZE} px: {cpu}")
    print(table(results))
    base = results["none"]
    passing = [n for n, f in results.items() if meets(f, base)]
    print("meets every target:", ", ".join(passing) or "none")
    mosaic = next(m for m in found if m.mosaic)
    check = mosaic_check(bank, mosaic)
    print(f"mosaic ({mosaic.name}): {check}")
    print(sampler.describe())
    benchlib.record(
        "regions",
        {
            "set": make_up,
            "methods": results,
            "meets_targets": passing,
            "target": TARGET,
            "mosaic_check": check,
            "cpu_time_per_run_over_224": {str(k): v for k, v in cpu.items()},
        },
        sampler=sampler,
        quick=args.quick,
        path=args.results,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
