"""How a rebuilt collection answers beside the one it replaces: ``trident-reembed compare``.

:func:`compare_collections` measures two things before a switch:

- **How the answers differ.** A seeded sample of ids stored in both collections; each is
  searched in each collection by its own stored vector there (a search by id: the old
  model's vector in the old collection, the new model's in the new), the id itself left out,
  and the two top 10s compared: their overlap, whether the first hit is the same, and how far
  the hits both found moved (mean and largest absolute rank change). These say how much the
  switch changes what users see, not which answers are better.
- **Which model finds better**, given a labelled set (:func:`load_labelled`), each collection's
  model embedding it through Triton as the query API embeds a query (the model's preprocessing,
  ``TritonEmbedder``):

  - *class P@1*: leave-one-out over the images of the class folders: is the nearest other
    image of the same class?
  - *near-duplicate R@1*: each image, changed by :func:`near_duplicate` (a fixed crop,
    brightness change and JPEG re-encode), searched among the originals: is it found first?
  - *pairs R@1*: each query image of the pairs file searched in the model's own collection: is
    the expected id the first hit?

  The new model is worse when any of these drops by more than :data:`WORSE_MARGIN` (absolute)
  against the old: ``trident-reembed switch`` then asks for ``--force``.

The labelled set is a folder with one sub-folder of images per class (classes of one image
count for near-duplicates only), and/or a pairs file, :data:`PAIRS_FILE` in that folder or
given as the path itself: CSV with the header ``query,expected``, one row per query, ``query``
an image path (relative to the file's folder, or absolute) and ``expected`` the id of the item
it should find first (an id stored in both collections). A sub-folder holding query images
of the pairs is no class::

    query,expected
    queries/red-shoe.jpg,catalogue/shoes/0412.jpg
"""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import numpy.typing as npt
from PIL import Image
from pydantic import BaseModel, Field

from engine.errors import ConfigurationError
from engine.images import decode_image
from engine.inference import TritonEmbedder
from engine.models import ModelSpec
from engine.preprocess import build_preprocessor
from engine.settings import Settings
from engine.store import QUERY_LIMIT_MAX, VectorStore
from producer.publisher import IMAGE_SUFFIXES

logger = logging.getLogger(__name__)

TOP = 10
"""Hits compared per query."""
WORSE_MARGIN = 0.02
"""How far (absolute) a labelled figure of the new model may fall below the old's before the
new model counts as worse: about the spread of class P@1 between EfficientNet-Lite0, 1 and 2 on
the project's labelled photo set (0.774 to 0.791), so a real drop, not noise, asks for
``--force``."""
PAIRS_FILE = "pairs.csv"
PAIRS_HEADER = ("query", "expected")
# Ids read from the old collection to draw the sample from, per id wanted: more than enough
# when the new collection has caught up, and a bounded read when it has not.
_POOL_PER_SAMPLE = 20
# Images per request to Triton when embedding the labelled set.
EMBED_BATCH = 8
# The fixed near-duplicate change: crop fractions (left/top, right/bottom), brightness, JPEG.
_CROP_NEAR, _CROP_FAR, _BRIGHTNESS, _JPEG_QUALITY = 0.03, 0.015, 1.1, 80

Matrix = npt.NDArray[np.float32]


class Embedder(Protocol):
    """Encoded images in, unit vectors ``[N, D]`` out, by one model."""

    def embed(self, images: Sequence[bytes]) -> Matrix: ...

    def close(self) -> None: ...


class LabelledFigures(BaseModel):
    """One model's figures on the labelled set (None: that part of the set is missing)."""

    model: str
    images: int = Field(description="Images of the class folders.")
    classes: int = Field(description="Class folders with images.")
    class_p_at_1: float | None = Field(description="Leave-one-out nearest is of the same class.")
    r_at_1: float | None = Field(description="Near-duplicate found first among the originals.")
    pairs: int = 0
    pairs_r_at_1: float | None = Field(
        default=None, description="The expected id is the first hit in the model's collection."
    )


class CompareReport(BaseModel):
    """How ``new`` answers beside ``old`` (both behind ``alias``), and whether it is worse."""

    alias: str
    old: str
    new: str
    old_model: str
    new_model: str
    sample: int = Field(description="Ids searched in both collections.")
    top10_overlap_mean: float | None = Field(description="Shared share of the two top 10s.")
    top1_same: float | None = Field(description="Share of queries with the same first hit.")
    rank_change_mean: float | None = Field(description="Mean |rank change| of shared hits.")
    rank_change_max: int | None = Field(description="Largest |rank change| of a shared hit.")
    labelled: dict[str, LabelledFigures] | None = Field(
        default=None, description="Per model name; None without a labelled set."
    )
    worse: list[str] = Field(
        default_factory=list, description="The labelled figures that dropped past the margin."
    )
    new_is_worse: bool = False

    def lines(self) -> list[str]:
        """A human-readable summary, one finding a line."""
        lines = [
            f"{self.alias}: {self.old} ({self.old_model}) -> {self.new} ({self.new_model})",
        ]
        if self.sample:
            lines += [
                f"  {self.sample} sample queries (by id, each collection with its own vectors):",
                f"    top-{TOP} overlap {_num(self.top10_overlap_mean)}, same first hit "
                f"{_num(self.top1_same)}",
                f"    rank change of shared hits: mean {_num(self.rank_change_mean)}, "
                f"largest {self.rank_change_max}",
            ]
        else:
            lines.append("  no id is stored in both collections yet: no sample to compare")
        if self.labelled is None:
            lines.append("  no labelled set given: search quality not measured (--labelled)")
        else:
            for role, model in (("old", self.old_model), ("new", self.new_model)):
                lines.append(f"  {role} {_labelled_line(self.labelled[model])}")
        if self.new_is_worse:
            lines.append(
                f"  the new model measured worse ({'; '.join(self.worse)}; margin "
                f"{WORSE_MARGIN}): switch asks for --force"
            )
        elif self.labelled is not None:
            lines.append(f"  the new model is not worse (margin {WORSE_MARGIN})")
        return lines


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _labelled_line(figures: LabelledFigures) -> str:
    line = (
        f"{figures.model}: class P@1 {_num(figures.class_p_at_1)}, near-duplicate R@1 "
        f"{_num(figures.r_at_1)} ({figures.images} images, {figures.classes} classes)"
    )
    if figures.pairs:
        line += f", pairs R@1 {_num(figures.pairs_r_at_1)} ({figures.pairs} pairs)"
    return line


@dataclass
class LabelledSet:
    """Images by class and query/expected pairs, as encoded bytes."""

    images: list[bytes] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    pair_queries: list[bytes] = field(default_factory=list)
    pair_expected: list[str] = field(default_factory=list)


def load_labelled(path: Path) -> LabelledSet:
    """The labelled set at ``path`` (module docstring: class folders and/or a pairs file).

    Raises:
        ConfigurationError: the path is missing, holds neither class folders with images nor a
            pairs file, or the pairs file is malformed or names a missing image (the message
            says which).
    """
    if not path.exists():
        raise ConfigurationError(f"labelled set {path} does not exist")
    found = LabelledSet()
    pairs = path if path.is_file() else path / PAIRS_FILE
    queries = _read_pairs(pairs, found) if pairs.is_file() else []
    if path.is_dir():
        for folder in sorted(p.resolve() for p in path.iterdir() if p.is_dir()):
            if any(query.is_relative_to(folder) for query in queries):
                continue  # the pairs' queries: not a class
            for image in sorted(folder.rglob("*")):
                if image.is_file() and image.suffix.lower() in IMAGE_SUFFIXES:
                    found.images.append(image.read_bytes())
                    found.labels.append(folder.name)
    if not found.images and not found.pair_queries:
        raise ConfigurationError(
            f"labelled set {path} holds no class folder of images and no {PAIRS_FILE}: give a "
            f"folder with a sub-folder of images per class, and/or a {PAIRS_FILE} "
            f"({','.join(PAIRS_HEADER)})"
        )
    return found


def _read_pairs(pairs: Path, found: LabelledSet) -> list[Path]:
    """Add the pairs of the file to ``found``; the query images' paths."""
    with pairs.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    if not rows or tuple(cell.strip() for cell in rows[0]) != PAIRS_HEADER:
        raise ConfigurationError(
            f"{pairs}: the first line must be the header {','.join(PAIRS_HEADER)}"
        )
    images = []
    for number, row in enumerate(rows[1:], start=2):
        if not row:
            continue
        if len(row) != len(PAIRS_HEADER) or not all(cell.strip() for cell in row):
            raise ConfigurationError(f"{pairs} line {number}: expected query,expected")
        query = Path(row[0].strip())
        image = query if query.is_absolute() else pairs.parent / query
        if not image.is_file():
            raise ConfigurationError(f"{pairs} line {number}: no image at {image}")
        found.pair_queries.append(image.read_bytes())
        found.pair_expected.append(row[1].strip())
        images.append(image.resolve())
    return images


def near_duplicate(data: bytes) -> bytes:
    """The fixed near-duplicate of an encoded image: a small uneven crop, 10 % brighter,
    re-encoded as JPEG (quality 80); deterministic.

    Raises:
        PIL.UnidentifiedImageError, OSError: the bytes are not an image PIL reads.
    """
    with Image.open(io.BytesIO(data)) as opened:
        image = opened.convert("RGB")
    width, height = image.size
    box = (
        int(width * _CROP_NEAR),
        int(height * _CROP_NEAR),
        width - int(width * _CROP_FAR),
        height - int(height * _CROP_FAR),
    )
    pixels = np.asarray(image.crop(box), dtype=np.float32) * _BRIGHTNESS
    out = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(
        out, format="JPEG", quality=_JPEG_QUALITY
    )
    return out.getvalue()


class TritonQueryEmbedder:
    """Embeds encoded images with one model as the query API does: decoded, the model's
    preprocessing, its Triton model (``settings.model``)."""

    def __init__(self, settings: Settings) -> None:
        """Raises:
        ConfigurationError: the preprocessing cannot be built for the model.
        """
        self._settings = settings
        self._preprocessor = build_preprocessor(settings.preprocess, batch_sizes=(EMBED_BATCH,))
        self._embedder = TritonEmbedder(settings.triton, model=settings.model)
        self._ready = False

    def embed(self, images: Sequence[bytes]) -> Matrix:
        """Unit embeddings ``[N, D]`` of the images, in order.

        Raises:
            InferenceConfigurationError: Triton does not serve the model (as its spec says).
            InferenceUnavailableError: Triton is unavailable, or the model not ready in time.
            ImageContentError: an image cannot be decoded.
        """
        if not self._ready:
            self._embedder.wait_until_ready(self._settings.triton.ready_timeout_s)
            self._ready = True
        parts = []
        for start in range(0, len(images), EMBED_BATCH):
            pixels = [
                decode_image(
                    data,
                    max_pixels=self._settings.fetch.max_pixels,
                    target_short_side=self._preprocessor.decode_short_side,
                ).pixels
                for data in images[start : start + EMBED_BATCH]
            ]
            parts.append(self._embedder.embed(self._preprocessor.preprocess(pixels)))
        return _unit(np.concatenate(parts).astype(np.float32))

    def close(self) -> None:
        self._embedder.close()


def compare_collections(
    settings: Settings,
    store: VectorStore,
    *,
    alias: str,
    old: str,
    new: str,
    sample: int = 100,
    labelled: Path | None = None,
    seed: int = 0,
    embedder_factory: Callable[[Settings], Embedder] = TritonQueryEmbedder,
) -> CompareReport:
    """Compare ``new`` with ``old`` (module docstring): ``sample`` ids stored in both, drawn
    with ``seed``, and, given ``labelled``, each model's figures on that set.

    ``embedder_factory`` makes one model's embedder from settings serving it (tests pass
    fakes).

    Raises:
        UnknownCollectionError: ``old`` or ``new`` does not exist.
        UnknownModelError: a collection's model is not in the registry.
        ConfigurationError: the labelled set cannot be read (see :func:`load_labelled`).
        InferenceConfigurationError, InferenceUnavailableError: Triton cannot embed with a
            collection's model.
        StoreUnavailableError: Milvus is unavailable.
    """
    registry = settings.triton.registry()
    old_spec = store.describe_collection(old).bound_model(registry, settings.model)
    new_spec = store.describe_collection(new).bound_model(registry, settings.model)
    labelled_set = load_labelled(labelled) if labelled is not None else None
    ids = _sample_ids(store, old, new, sample, seed)
    overlap = _answer_changes(store, old, new, ids)
    report = CompareReport(
        alias=alias,
        old=old,
        new=new,
        old_model=old_spec.name,
        new_model=new_spec.name,
        sample=len(ids),
        **overlap,
    )
    if labelled_set is None:
        return report
    figures = {}
    for spec, collection in ((old_spec, old), (new_spec, new)):
        embedder = embedder_factory(settings.for_model(spec.name))
        try:
            figures[spec.name] = _labelled_figures(
                embedder, store, spec, collection=collection, labelled=labelled_set
            )
        finally:
            embedder.close()
    worse = _worse(figures[old_spec.name], figures[new_spec.name])
    return report.model_copy(
        update={"labelled": figures, "worse": worse, "new_is_worse": bool(worse)}
    )


def _sample_ids(store: VectorStore, old: str, new: str, sample: int, seed: int) -> list[str]:
    """Up to ``sample`` ids stored in both collections, drawn with ``seed`` (sorted first:
    Milvus answers in no set order)."""
    if sample < 1:
        return []
    limit = min(QUERY_LIMIT_MAX, sample * _POOL_PER_SAMPLE)
    pool = sorted(store.ids_matching('id != ""', old, limit=limit))
    order = np.random.default_rng(seed).permutation(len(pool))
    drawn = [pool[i] for i in order]
    chosen: list[str] = []
    for start in range(0, len(drawn), sample):
        chunk = drawn[start : start + sample]
        present = {str(row["id"]) for row in store.get(chunk, new)}
        chosen += [item for item in chunk if item in present]
        if len(chosen) >= sample:
            break
    return chosen[:sample]


def _answer_changes(
    store: VectorStore, old: str, new: str, ids: list[str]
) -> dict[str, float | int | None]:
    """Overlap, first-hit agreement and rank changes of the top 10s of ``ids`` (by id)."""
    if not ids:
        return {
            "top10_overlap_mean": None,
            "top1_same": None,
            "rank_change_mean": None,
            "rank_change_max": None,
        }
    old_vectors, new_vectors = _vectors(store, old, ids), _vectors(store, new, ids)
    overlaps, same_first, changes = [], [], []
    for item in ids:
        before = _neighbours(store, old, old_vectors[item], item)
        after = _neighbours(store, new, new_vectors[item], item)
        shared = set(before) & set(after)
        overlaps.append(len(shared) / max(len(before), len(after), 1))
        same_first.append(bool(before) and bool(after) and before[0] == after[0])
        changes += [abs(before.index(hit) - after.index(hit)) for hit in shared]
    return {
        "top10_overlap_mean": round(float(np.mean(overlaps)), 4),
        "top1_same": round(float(np.mean(same_first)), 4),
        "rank_change_mean": round(float(np.mean(changes)), 3) if changes else None,
        "rank_change_max": max(changes) if changes else None,
    }


def _vectors(store: VectorStore, collection: str, ids: list[str]) -> dict[str, Matrix]:
    rows = store.get(ids, collection, with_vectors=True)
    return {str(row["id"]): np.asarray(row["embedding"], dtype=np.float32) for row in rows}


def _neighbours(store: VectorStore, collection: str, vector: Matrix, item: str) -> list[str]:
    """The top 10 of ``vector`` in ``collection``, the id itself left out."""
    hits = store.search(vector, top_k=TOP + 1, collection=collection)
    return [hit.id for hit in hits if hit.id != item][:TOP]


def _labelled_figures(
    embedder: Embedder,
    store: VectorStore,
    spec: ModelSpec,
    *,
    collection: str,
    labelled: LabelledSet,
) -> LabelledFigures:
    """``spec``'s figures on the labelled set (embedded by ``embedder``, that model's), its
    pairs searched in ``collection``."""
    figures = LabelledFigures(
        model=spec.name,
        images=len(labelled.images),
        classes=len(set(labelled.labels)),
        class_p_at_1=None,
        r_at_1=None,
    )
    if labelled.images:
        originals = embedder.embed(labelled.images)
        copies = embedder.embed([near_duplicate(data) for data in labelled.images])
        figures.class_p_at_1 = _class_p_at_1(originals, labelled.labels)
        figures.r_at_1 = _near_duplicate_r_at_1(originals, copies)
    if labelled.pair_queries:
        queries = embedder.embed(labelled.pair_queries)
        found = [
            _first_hit(store, collection, vector) == expected
            for vector, expected in zip(queries, labelled.pair_expected, strict=True)
        ]
        figures.pairs = len(found)
        figures.pairs_r_at_1 = round(float(np.mean(found)), 4)
    logger.info("labelled set, %s: %s", spec.name, _labelled_line(figures))
    return figures


def _class_p_at_1(vectors: Matrix, labels: list[str]) -> float | None:
    """Leave-one-out: the share of images (of classes with another image) whose nearest other
    image is of their class; None when no class has two images."""
    counts = {label: labels.count(label) for label in set(labels)}
    asked = [i for i, label in enumerate(labels) if counts[label] > 1]
    if not asked:
        return None
    scores = vectors @ vectors.T
    np.fill_diagonal(scores, -np.inf)
    nearest = np.argmax(scores, axis=1)
    return round(float(np.mean([labels[int(nearest[i])] == labels[i] for i in asked])), 4)


def _near_duplicate_r_at_1(originals: Matrix, copies: Matrix) -> float:
    found = np.argmax(copies @ originals.T, axis=1)
    return round(float(np.mean(found == np.arange(len(originals)))), 4)


def _first_hit(store: VectorStore, collection: str, vector: Matrix) -> str | None:
    hits = store.search(vector, top_k=1, collection=collection)
    return hits[0].id if hits else None


def _worse(old: LabelledFigures, new: LabelledFigures) -> list[str]:
    """The figures the new model dropped by more than the margin, as "name old -> new"."""
    dropped = []
    for name in ("class_p_at_1", "r_at_1", "pairs_r_at_1"):
        before, after = getattr(old, name), getattr(new, name)
        if before is not None and after is not None and after < before - WORSE_MARGIN:
            dropped.append(f"{name} {before:.3f} -> {after:.3f}")
    return dropped


def _unit(vectors: Matrix) -> Matrix:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    unit: Matrix = vectors / np.maximum(norms, np.finfo(np.float32).tiny)
    return unit
