"""bench_region_search's scoring of API answers and its filler vectors."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import bench_region_search as bench  # after the path insert: the scripts' folder is no package


def hits(*ids: str, boxes: list[list[float] | None] | None = None) -> bench.Hits:
    return bench.Hits(list(ids), boxes or [None] * len(ids), ms=1.0)


def test_a_missing_source_ranks_after_every_hit() -> None:
    assert bench.rank_of(["g-0003", "g-0001"], "g-0001") == 1
    assert bench.rank_of(["g-0003", "g-0001"], "g-0007") == 2


def test_a_box_is_a_region_unless_absent_or_the_whole_image() -> None:
    assert bench.is_region([0.2, 0.0, 0.6, 0.4])
    assert not bench.is_region([0.0, 0.0, 1.0, 1.0])
    assert not bench.is_region(None)


def test_a_box_has_the_crop_when_it_holds_the_crops_centre() -> None:
    crop = (0.1, 0.1, 0.3, 0.3)  # centre (0.2, 0.2)
    assert bench.box_has_centre([0.0, 0.0, 0.4, 0.4], crop)
    assert not bench.box_has_centre([0.4, 0.4, 0.8, 0.8], crop)
    assert not bench.box_has_centre(None, crop)


def test_crops_are_scored_by_their_sources_rank_and_the_first_hits_box() -> None:
    queries = [
        bench.Query(b"", truth=1, box=(0.0, 0.0, 0.2, 0.2)),
        bench.Query(b"", truth=2, box=(0.6, 0.6, 0.8, 0.8)),
        bench.Query(b"", truth=3, box=(0.0, 0.0, 0.2, 0.2)),
    ]
    answers = [
        hits("g-0001", "g-0009", boxes=[[0.0, 0.0, 0.4, 0.4], None]),  # first, box on the crop
        hits("g-0002", boxes=[[0.0, 0.0, 1.0, 1.0]]),  # first, the whole image matched
        hits("g-0009", "g-0003", boxes=[None, None]),  # second
        hits("g-0004", boxes=[[0.0, 0.0, 0.4, 0.4]]),  # first, a region off the crop
    ]
    queries.append(bench.Query(b"", truth=4, box=(0.6, 0.6, 0.8, 0.8)))
    scored = bench.score_crops(answers, queries)
    assert scored["r_at_1"] == 0.75
    assert scored["r_at_5"] == 1.0
    assert scored["first_hit_box_is_region"] == round(2 / 3, 3)
    assert scored["region_box_has_crop_centre"] == 0.5


def test_class_p_at_1_skips_the_query_image_itself() -> None:
    labels = ["cats", "cats", "dogs"]
    queries = [bench.Query(b"", truth=0), bench.Query(b"", truth=2)]
    answers = [hits("g-0000", "g-0001"), hits("g-0002", "g-0000")]
    assert bench.class_p_at_1(answers, queries, labels) == 0.5


def test_the_filler_is_seeded_unit_vectors_near_their_source() -> None:
    rng = np.random.default_rng(0)
    sources = bench.Sources(
        bench._unit(rng.standard_normal((3, 64), dtype=np.float32)),
        bench._unit(rng.standard_normal((3, 16, 64), dtype=np.float32)),
    )
    vectors, regions = bench.filler(sources, 4, 5, seed=1, noise=0.5)
    assert vectors.shape == (5, 64) and regions.shape == (5, 16, 64)
    assert np.allclose(np.linalg.norm(regions, axis=-1), 1.0, atol=1e-5)
    # Item 4 is made from source 4 % 3 = 1; noise 0.5 leaves a cosine of about 0.87.
    assert float(vectors[0] @ sources.globals[1]) > 0.7
    again, _ = bench.filler(sources, 4, 5, seed=1, noise=0.5)
    assert np.array_equal(vectors, again)
