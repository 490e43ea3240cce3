"""The benchmark suite's shared helpers: the results file, percentiles, CPU shares by role."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import benchlib  # after the path insert: the scripts' folder is not a package


def test_record_merges_sections_and_headlines(tmp_path: Path) -> None:
    path = tmp_path / "results" / "latest.json"
    benchlib.record("a", {"x": 1}, headline={"e2e_images_per_s": 10.0}, path=path)
    benchlib.record("b", {"y": 2}, headline={"search_vector_p99_ms": 5.0}, quick=True, path=path)
    data = json.loads(path.read_text())
    assert data["benchmarks"]["a"]["x"] == 1 and data["benchmarks"]["b"]["y"] == 2
    assert data["e2e_images_per_s"] == 10.0 and data["search_vector_p99_ms"] == 5.0
    assert data["machine"]["cores"] >= 1 and data["timestamp"]
    # One quick section makes the whole file a quick run.
    assert data["quick"] is True
    benchlib.record("b", {"y": 3}, path=path)
    assert json.loads(path.read_text())["quick"] is False


def test_record_starts_over_a_corrupt_file(tmp_path: Path) -> None:
    path = tmp_path / "latest.json"
    path.write_text("{not json")
    benchlib.record("a", {"x": 1}, path=path)
    assert list(json.loads(path.read_text())["benchmarks"]) == ["a"]


def test_percentile_interpolates() -> None:
    values = [float(v) for v in range(1, 101)]
    assert benchlib.percentile(values, 50) == pytest.approx(50.5)
    assert benchlib.percentile(values, 99) == pytest.approx(99.01)
    assert benchlib.percentile([3.0], 99) == 3.0


def test_roles_come_from_command_lines() -> None:
    assert benchlib._role("/x/bin/milvus run standalone") == "milvus"
    assert benchlib._role("/venv/bin/python /venv/bin/trident-worker --config f") == "worker"
    assert benchlib._role("java -Xmx512m -cp libs/* kafka.Kafka server.properties") == "kafka"
    assert benchlib._role("tritonserver --model-repository=m") == "triton"
    assert benchlib._role("bash") is None


def test_sampler_counts_this_process_cpu() -> None:
    with benchlib.LoadSampler(every=0.05) as sampler:
        total = 0
        for i in range(3_000_000):  # burn some CPU in this process
            total += i
    summary = sampler.summary()
    assert summary["cpu_cores_by_role"]["benchmark"] > 0
    assert summary["load_avg_mean"] is not None
