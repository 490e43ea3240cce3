"""The worker runtime owns its adapters and closes every one; liveness is the loop's heartbeat."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry

from engine.models import UINT8_MODEL_SPEC
from engine.settings import Settings
from worker import runner
from worker.health import HealthServer, Heartbeat

CLOSED: list[str] = []


class _Adapter:
    """Stands in for every adapter class the runtime builds; records what gets closed."""

    decode_short_side = UINT8_MODEL_SPEC.resize_short_side  # as a preprocessor has

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.name = type(self).__name__

    def close(self, *args: Any) -> None:
        CLOSED.append(self.name)

    # What the runtime calls while assembling.
    def resolve_alias(self, name: str) -> str:
        return name  # a plain collection: the worker creates its default one

    def create_collection(self, *args: Any, **kwargs: Any) -> bool:
        return True

    def warmup(self) -> None:
        pass

    def wait_until_ready(self, *args: Any) -> None:
        pass


def _fake(name: str) -> type[_Adapter]:
    return type(name, (_Adapter,), {})


@pytest.fixture
def fakes(monkeypatch: pytest.MonkeyPatch) -> None:
    CLOSED.clear()
    for name in ("ImageFetcher", "TritonEmbedder", "VectorStore", "RecordPublisher"):
        monkeypatch.setattr(runner, name, _fake(name))
    monkeypatch.setattr(runner, "build_preprocessor", _fake("JaxPreprocessor"))
    monkeypatch.setattr(runner, "Consumer", _fake("Consumer"))


@pytest.mark.usefixtures("fakes")
def test_the_runtime_closes_every_adapter_and_the_decoding_threads() -> None:
    runtime = runner.build_worker(Settings(), worker_id="w")
    pool = runtime.worker._processor._decoders  # type: ignore[attr-defined]
    runtime.close()
    # The loop's and the probes' own Triton and Milvus clients, fetcher, producer, consumer.
    assert sorted(CLOSED) == sorted(
        ["Consumer", "ImageFetcher", "RecordPublisher"] + ["TritonEmbedder", "VectorStore"] * 2
    )
    assert pool._shutdown
    runtime.close()  # a second close closes nothing twice
    assert len(CLOSED) == 7


@pytest.mark.usefixtures("fakes")
def test_a_failing_close_does_not_keep_the_others_open(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(self: _Adapter, *args: Any) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(runner.RecordPublisher, "close", broken)
    runner.build_worker(Settings(), worker_id="w").close()
    assert "Consumer" in CLOSED and CLOSED.count("VectorStore") == 2


def test_livez_fails_once_the_heartbeat_is_older_than_the_bound() -> None:
    now = [0.0]
    heartbeat = Heartbeat(clock=lambda: now[0])
    server = HealthServer(
        "127.0.0.1",
        0,
        registry=CollectorRegistry(),
        is_alive=lambda: heartbeat.fresh(30.0),
        readiness=lambda: {"kafka": True},
    )
    server.start()
    try:
        assert httpx.get(f"{server.address}/livez").status_code == 200
        now[0] = 31.0  # the loop is wedged: no beat for longer than the bound
        response = httpx.get(f"{server.address}/livez")
        assert response.status_code == 503 and response.json() == {"alive": False}
        heartbeat.beat()
        assert httpx.get(f"{server.address}/livez").status_code == 200
    finally:
        server.stop()
