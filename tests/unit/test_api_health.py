"""/health and /readyz with every service hung (each accepts connections and never answers):
the API answers within its stated bound, those services down, instead of waiting for them."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from litestar.testing import TestClient

from engine.health import HEALTH_DEADLINE_S
from engine.settings import Settings
from query_api import create_app
from tests.support.silent_server import silent_server

# What a busy 2-core machine may add to the bound (threads, the test client).
SLACK_S = 1.5


@pytest.fixture(params=["grpc", "http"])
def hung_api(request: pytest.FixtureRequest) -> Iterator[TestClient[Any]]:
    """The API on a Triton (over ``request.param``), a Milvus and a Kafka that never answer."""
    with silent_server() as triton, silent_server() as milvus, silent_server() as kafka:
        settings = Settings(
            triton={"url": triton, "protocol": request.param, "ready_timeout_s": 0},
            # Connecting to a hung Milvus blocks for timeout_s; closing the app waits for it.
            milvus={"uri": f"http://{milvus}", "timeout_s": 5.0},
            kafka={"bootstrap_servers": kafka},
            preprocess={"batch_sizes": (1,)},
        )
        with TestClient(app=create_app(settings)) as client:
            yield client


def timed_get(client: TestClient[Any], path: str) -> tuple[Any, float]:
    began = time.monotonic()
    response = client.get(path)
    return response, time.monotonic() - began


def test_health_answers_within_the_bound_with_hung_services_down(
    hung_api: TestClient[Any],
) -> None:
    for _ in range(2):  # the second call finds the first call's probes still running
        health, elapsed = timed_get(hung_api, "/health")
        assert elapsed < HEALTH_DEADLINE_S + SLACK_S, elapsed
        assert health.status_code == 503 and health.headers["Retry-After"] == "5"
        body = health.json()
        assert body["status"] == "degraded"
        assert {body[name]["state"] for name in ("triton", "milvus", "kafka")} == {"down"}
        assert all(body[name]["detail"] for name in ("triton", "milvus", "kafka")), body
    ready, elapsed = timed_get(hung_api, "/readyz")
    assert elapsed < HEALTH_DEADLINE_S + SLACK_S, elapsed
    assert ready.status_code == 503
    assert ready.json() == {"status": "not_ready", "triton": "down", "milvus": "down"}
