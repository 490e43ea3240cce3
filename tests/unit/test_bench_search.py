"""bench_search's breakdown: stages read from Server-Timing, the API's overhead, Triton's
per-request phases."""

from __future__ import annotations

import sys
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import bench_search  # after the path insert: the scripts' folder is not a package


def test_stages_come_from_the_server_timing_header() -> None:
    timed = httpx.Response(200, headers={"Server-Timing": "decode;dur=2.5, embed;dur=20.0"})
    assert bench_search.stages_of(timed) == {"decode": 2.5, "embed": 20.0}
    assert bench_search.stages_of(httpx.Response(200)) == {}


def test_overhead_is_what_the_stages_leave_of_the_latency() -> None:
    answers = [
        bench_search.Answer([], {"embed": 20.0, "search": 5.0}),
        bench_search.Answer([], {"embed": 30.0, "search": 5.0}),
    ]
    summary = bench_search.stage_summary([27.0, 41.0], answers)
    assert list(summary) == ["embed", "search", "overhead"]
    assert summary["overhead"]["p50_ms"] == 4.0  # of 2 and 6
    assert summary["embed"]["p99_ms"] == 29.9


def test_triton_phases_are_averaged_over_the_requests_between_two_readings() -> None:
    before = {"requests": 10.0, "queue": 0.0, "compute_input": 0.0, "compute_infer": 0.0}
    after = {"requests": 14.0, "queue": 8e6, "compute_input": 4e6, "compute_infer": 100e6}
    before["compute_output"], after["compute_output"] = 0.0, 2e6
    per = bench_search.triton_per_request(before, after)
    assert per == {
        "queue_ms": 2.0,
        "compute_input_ms": 1.0,
        "compute_infer_ms": 25.0,
        "compute_output_ms": 0.5,
        "requests": 4.0,
    }
