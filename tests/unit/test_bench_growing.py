"""bench_growing's summaries and bench_scale's data: the parts whose mistakes would not show as a
crash but as wrong figures."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import bench_growing  # after the path insert: the scripts' folder is not a package
import bench_scale
from bench_growing import Query


def test_summary_splits_kinds_and_averages_recall_over_vector_queries_only() -> None:
    answers = [
        Query(1.0, "vector", 10.0, 1.0, 4.0),
        Query(2.0, "image", 40.0, None, 5.0),
        Query(3.0, "vector", 30.0, 0.5, 20.0),
    ]
    summary = bench_growing.summarise(answers)
    assert summary["vector"]["queries"] == 2
    assert summary["vector"]["p50_ms"] == 20.0
    assert summary["vector"]["recall_at_10"] == 0.75
    assert summary["vector"]["search_stage"]["p99_ms"] == pytest.approx(19.8)
    assert summary["image"]["queries"] == 1
    assert "recall_at_10" not in summary["image"]


def test_buckets_put_each_answer_in_the_window_it_ended_in() -> None:
    class Cores:
        def mean(self, start: float, end: float) -> float:
            return start  # tells which window asked

    answers = [
        Query(100.5, "vector", 5.0, 1.0, 1.0),
        Query(109.0, "vector", 7.0, 1.0, 1.0),
        Query(111.0, "vector", 50.0, 1.0, 1.0),
        Query(112.0, "image", 80.0, None, 1.0),
    ]
    rows = bench_growing.buckets(answers, 100.0, 10.0, Cores())  # type: ignore[arg-type]
    assert [row["from_s"] for row in rows] == [0, 10]
    assert rows[0]["vector"]["p50_ms"] == 6.0
    assert "image" not in rows[0]
    assert rows[1]["vector"]["p99_ms"] == 50.0
    assert rows[1]["image"]["p50_ms"] == 80.0
    assert rows[1]["milvus_cores"] == 110.0


def test_variants_fix_the_keys_they_compare() -> None:
    # The figures of a variant must not change with what the stack adopts: each one but
    # "stack" and the stack with its builds at their own priority states the interim index
    # setting it is about.
    for name, variant in bench_growing.VARIANTS.items():
        if not name.startswith("stack"):
            assert bench_growing.INTERIM in variant.settings, name
    assert not bench_growing.VARIANTS["stack"].settings
    assert bench_growing.VARIANTS["stack"].idle_builds
    unlike = bench_growing.VARIANTS["stack_builds_not_idle"]
    assert not unlike.settings and not unlike.environment and not unlike.idle_builds


def test_scale_vectors_are_the_same_whichever_way_the_rows_are_cut() -> None:
    vectors = bench_scale.Vectors(seed=3)
    whole = np.concatenate([rows for _, rows in vectors.rows(0, 25_000)])
    pieces = [rows for _, rows in vectors.rows(0, 7_000)]
    pieces += [rows for _, rows in vectors.rows(7_000, 25_000)]
    assert np.array_equal(whole, np.concatenate(pieces))
    assert whole.shape == (25_000, bench_scale.DIM)
    assert np.allclose(np.linalg.norm(whole[:100], axis=1), 1.0, atol=1e-5)


def test_running_top_k_equals_brute_force_over_all_rows() -> None:
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((500, 16)).astype(np.float32)
    queries = rng.standard_normal((7, 16)).astype(np.float32)
    exact = bench_scale.ExactTopK(queries, k=5)
    for start in range(0, 500, 130):  # uneven pieces
        exact.add(start, rows[start : start + 130])
    expected = [set(np.argsort(-row)[:5].tolist()) for row in queries @ rows.T]
    assert exact.sets() == expected


def test_the_headline_comes_from_a_variant_that_runs_milvus_as_the_stack_does() -> None:
    assert bench_growing.runs_as_stack("stack")
    stacked = {
        name
        for name, variant in bench_growing.VARIANTS.items()
        if bench_growing.runs_as_stack(name)
    }
    for name in stacked - {"stack"}:
        variant = bench_growing.VARIANTS[name]
        assert not variant.environment
        for key, value in variant.settings.items():
            assert bench_growing.SEARCH_UNDER_LOAD[key] == value
    assert "interim_on_gomaxprocs1" not in stacked  # an environment of its own
    assert "stack_builds_not_idle" not in stacked  # its builds not at idle priority
