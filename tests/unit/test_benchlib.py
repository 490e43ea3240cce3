"""The benchmark suite's shared helpers: the results file, percentiles, CPU shares by role."""

from __future__ import annotations

import json
import sys
import threading
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import bench_e2e  # after the path insert: the scripts' folder is not a package

import benchlib


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


def test_wait_idle_returns_once_a_role_is_quiet_and_times_out_while_it_is_busy() -> None:
    # No process of this made-up role: idle at the first window.
    waited, cores = benchlib.wait_idle("no-such-role", window=0.1, timeout=5)
    assert cores == 0 and waited < 1

    stop = threading.Event()

    def burn() -> None:
        while not stop.is_set():
            pass

    burner = threading.Thread(target=burn)
    burner.start()
    try:  # this process is the "benchmark" role, and it is busy
        with pytest.raises(TimeoutError):
            benchlib.wait_idle("benchmark", below=0.05, window=0.2, timeout=0.5)
    finally:
        stop.set()
        burner.join()


def test_rss_is_read_at_each_quarter_of_the_run() -> None:
    mib = 2**20
    progress = [(0, 100 * mib), (30, 110 * mib), (55, 120 * mib), (80, 130 * mib), (100, 140 * mib)]
    assert bench_e2e.rss_by_quarter(progress, 100) == [110.0, 120.0, 130.0, 140.0]
    # A run cut short reads its last sample for the quarters it never reached.
    assert bench_e2e.rss_by_quarter(progress[:3], 100) == [110.0, 120.0, 120.0, 120.0]
