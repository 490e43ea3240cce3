"""``reembed.compare`` with a fake store and fake embedders: how the answers of two collections
differ (overlap, first hit, rank changes of a seeded sample of shared ids), each model's figures
on a labelled set (class folders, near-duplicates, query/expected pairs), the verdict against
the margin, and a labelled set that cannot be read."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Any, cast

import numpy as np
import numpy.typing as npt
import pytest
from PIL import Image

from engine.errors import ConfigurationError, UnknownCollectionError
from engine.indexes import IndexSpec
from engine.models import LITE2_MODEL_SPEC, UINT8_MODEL_SPEC
from engine.records import CollectionInfo, Hit
from engine.settings import Settings
from reembed.compare import (
    PAIRS_FILE,
    TOP,
    WORSE_MARGIN,
    CompareReport,
    compare_collections,
    load_labelled,
    near_duplicate,
)

LITE0, LITE2 = UINT8_MODEL_SPEC, LITE2_MODEL_SPEC
Matrix = npt.NDArray[np.float32]


class FakeStore:
    """Two collections of stored vectors, searched exactly (cosine); ``first_hits`` overrides
    the first hit of every search of a collection (for the pairs)."""

    def __init__(self, vectors: dict[str, dict[str, Matrix]]) -> None:
        self.vectors = vectors
        self.models = {"x_v1": LITE0, "x_v2": LITE2}
        self.first_hits: dict[str, str] = {}

    def describe_collection(self, name: str) -> CollectionInfo:
        if name not in self.vectors:
            raise UnknownCollectionError(f"no collection named {name!r}")
        spec = self.models[name]
        return CollectionInfo(
            name=name,
            dimension=spec.output_dim,
            index=IndexSpec(index_type="FLAT"),
            model_tag=spec.model_version_tag,
            model_name=spec.name,
        )

    def ids_matching(self, expression: str, collection: str, *, limit: int) -> list[str]:
        return list(self.vectors[collection])[:limit]

    def get(
        self, ids: list[str], collection: str, *, with_vectors: bool = False
    ) -> list[dict[str, Any]]:
        stored = self.vectors[collection]
        return [{"id": i, "embedding": stored[i]} for i in ids if i in stored]

    def search(self, vector: Matrix, *, top_k: int, collection: str) -> list[Hit]:
        if collection in self.first_hits:
            return [Hit(id=self.first_hits[collection], score=1.0, metadata={}, fields={})]
        stored = self.vectors[collection]
        ids = list(stored)
        scores = np.stack([stored[i] for i in ids]) @ vector
        order = np.argsort(-scores, kind="stable")[:top_k]
        return [Hit(id=ids[i], score=float(scores[i]), metadata={}, fields={}) for i in order]


def _unit_rows(rng: np.random.Generator, count: int, dim: int = 16) -> Matrix:
    rows = rng.standard_normal((count, dim)).astype(np.float32)
    unit: Matrix = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    return unit


def _store(old: Matrix, new: Matrix, ids: list[str]) -> FakeStore:
    return FakeStore(
        {
            "x_v1": dict(zip(ids, old, strict=True)),
            "x_v2": dict(zip(ids, new, strict=True)),
        }
    )


def _compare(store: FakeStore, **kwargs: Any) -> CompareReport:
    return compare_collections(
        Settings(), cast(Any, store), alias="x", old="x_v1", new="x_v2", **kwargs
    )


def test_the_same_vectors_answer_the_same() -> None:
    ids = [f"id{n:02d}" for n in range(30)]
    vectors = _unit_rows(np.random.default_rng(1), 30)
    report = _compare(_store(vectors, vectors.copy(), ids), sample=12)
    assert (report.sample, report.old_model, report.new_model) == (12, LITE0.name, LITE2.name)
    assert report.top10_overlap_mean == 1.0 and report.top1_same == 1.0
    assert (report.rank_change_mean, report.rank_change_max) == (0.0, 0)
    assert report.labelled is None and not report.new_is_worse
    text = "\n".join(report.lines())
    assert "x: x_v1 (" in text and "top-10 overlap 1.000" in text and "--labelled" in text


def test_other_vectors_answer_otherwise_and_only_shared_ids_are_sampled() -> None:
    rng = np.random.default_rng(2)
    ids = [f"id{n:02d}" for n in range(40)]
    old, new = _unit_rows(rng, 40), _unit_rows(rng, 40)
    store = _store(old, new, ids)
    for gone in ids[:25]:  # not rebuilt yet
        del store.vectors["x_v2"][gone]
    report = _compare(store, sample=100)
    assert report.sample == 15  # only ids stored in both
    assert report.top10_overlap_mean is not None and report.top10_overlap_mean < 1.0
    assert report.top1_same is not None and report.top1_same < 1.0
    # The same seed draws the same sample, another seed another one.
    again = _compare(store, sample=5, seed=3)
    assert again == _compare(store, sample=5, seed=3) and again.sample == 5


def test_a_rank_change_is_how_far_a_shared_hit_moved() -> None:
    # One query's neighbours in the same order in old, reversed in new.
    dim, count = 16, TOP + 1
    ids = [f"n{i:02d}" for i in range(count)]
    query = np.zeros(dim, np.float32)
    query[0] = 1.0
    old = np.zeros((count, dim), np.float32)
    new = np.zeros((count, dim), np.float32)
    old[0], new[0] = query, query
    for i in range(1, count):
        old[i, 0], old[i, i] = 1.0 - i * 0.05, 0.5
        new[i, 0], new[i, i] = 1.0 - (count - i) * 0.05, 0.5
    old /= np.linalg.norm(old, axis=1, keepdims=True)
    new /= np.linalg.norm(new, axis=1, keepdims=True)
    store = _store(old, new, ids)
    store.vectors = {name: {"n00": v["n00"], **v} for name, v in store.vectors.items()}
    report = compare_collections(
        Settings(), cast(Any, store), alias="x", old="x_v1", new="x_v2", sample=count
    )
    assert report.top10_overlap_mean == 1.0  # every query finds the other ten
    assert report.rank_change_max is not None and report.rank_change_max > 0


def _image(colour: tuple[int, int, int], mark: int) -> bytes:
    """A class colour with a bright square at one of 16 places (which image of the class)."""
    pixels = np.full((64, 64, 3), colour, np.uint8)
    row, col = divmod(mark, 4)
    pixels[row * 16 + 2 : row * 16 + 14, col * 16 + 2 : col * 16 + 14] = 255
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


class GoodEmbedder:
    """Sees the image: its 4 x 4 mean colours (a near-duplicate stays near)."""

    def embed(self, images: list[bytes]) -> Matrix:
        rows = []
        for data in images:
            with Image.open(io.BytesIO(data)) as image:
                small = np.asarray(image.convert("RGB").resize((4, 4)), np.float32).ravel()
            rows.append(small - small.mean())
        found = np.stack(rows)
        unit: Matrix = found / np.linalg.norm(found, axis=1, keepdims=True)
        return unit

    def close(self) -> None: ...


class BlindEmbedder:
    """Sees only the bytes: a vector of their hash (nothing near anything)."""

    def embed(self, images: list[bytes]) -> Matrix:
        seeds = [int(hashlib.sha256(d).hexdigest()[:8], 16) for d in images]
        return np.stack([_unit_rows(np.random.default_rng(s), 1, 48)[0] for s in seeds])

    def close(self) -> None: ...


def _labelled(root: Path) -> Path:
    colours = {"red": (200, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 200)}
    for name, colour in colours.items():
        (root / name).mkdir(parents=True)
        for mark in range(4):
            (root / name / f"{mark}.png").write_bytes(_image(colour, mark))
    return root


def _factory(made: list[str]) -> Any:
    def factory(settings: Settings) -> Any:
        made.append(settings.model.name)
        return GoodEmbedder() if settings.model.name == LITE0.name else BlindEmbedder()

    return factory


def test_a_model_that_finds_worse_on_the_labelled_set_is_called_worse(tmp_path: Path) -> None:
    ids = [f"id{n}" for n in range(12)]
    vectors = _unit_rows(np.random.default_rng(4), 12)
    made: list[str] = []
    report = _compare(
        _store(vectors, vectors, ids),
        sample=4,
        labelled=_labelled(tmp_path / "set"),
        embedder_factory=_factory(made),
    )
    assert made == [LITE0.name, LITE2.name]  # each collection's model embeds the set
    assert report.labelled is not None
    old, new = report.labelled[LITE0.name], report.labelled[LITE2.name]
    assert (old.images, old.classes) == (12, 3)
    assert old.class_p_at_1 == 1.0 and old.r_at_1 == 1.0
    assert new.class_p_at_1 is not None and new.class_p_at_1 < old.class_p_at_1 - WORSE_MARGIN
    assert report.new_is_worse and any(w.startswith("class_p_at_1") for w in report.worse)
    assert "switch asks for --force" in "\n".join(report.lines())
    # The other way round, the new model is not worse.
    made.clear()
    store = _store(vectors, vectors, ids)
    store.models = {"x_v1": LITE2, "x_v2": LITE0}
    better = _compare(store, sample=4, labelled=tmp_path / "set", embedder_factory=_factory(made))
    assert not better.new_is_worse and better.worse == []
    assert "not worse" in "\n".join(better.lines())


def test_pairs_are_searched_in_each_models_own_collection(tmp_path: Path) -> None:
    root = tmp_path / "pairs"
    (root / "q").mkdir(parents=True)
    (root / "q" / "a.png").write_bytes(_image((10, 10, 10), 0))
    (root / PAIRS_FILE).write_text("query,expected\nq/a.png,wanted\n\n", encoding="utf-8")
    vectors = _unit_rows(np.random.default_rng(5), 3)
    store = _store(vectors, vectors, ["a", "b", "c"])
    store.first_hits = {"x_v1": "wanted", "x_v2": "other"}
    report = _compare(store, sample=0, labelled=root, embedder_factory=_factory([]))
    assert report.labelled is not None
    old, new = report.labelled[LITE0.name], report.labelled[LITE2.name]
    assert (old.pairs, old.pairs_r_at_1, new.pairs_r_at_1) == (1, 1.0, 0.0)
    assert old.images == 0 and old.class_p_at_1 is None
    assert report.new_is_worse and report.worse == ["pairs_r_at_1 1.000 -> 0.000"]
    # The pairs file alone, named as the set.
    assert len(load_labelled(root / PAIRS_FILE).pair_queries) == 1


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "does not exist"),
        ("", "header query,expected"),
        ("query,expected\nq.png\n", "line 2: expected query,expected"),
        ("query,expected\nmissing.png,x\n", "line 2: no image at"),
    ],
)
def test_a_labelled_set_that_cannot_be_read_says_why(
    tmp_path: Path, content: str | None, message: str
) -> None:
    path = tmp_path / PAIRS_FILE
    if content is not None:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(ConfigurationError, match=message):
        load_labelled(path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigurationError, match="no class folder of images"):
        load_labelled(tmp_path / "empty")


def test_the_near_duplicate_is_fixed_and_near() -> None:
    original = _image((120, 60, 30), 5)
    copy = near_duplicate(original)
    assert copy == near_duplicate(original) and copy != original
    embedder = GoodEmbedder()
    others = embedder.embed([_image((120, 60, 30), mark) for mark in range(16)])
    found = int(np.argmax(others @ embedder.embed([copy])[0]))
    assert found == 5
