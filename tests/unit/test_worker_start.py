"""A worker waits for Triton's model at start-up (``triton.ready_timeout_s``) before it joins the
consumer group, and gives up naming the model and the URL; the adapters it opened are closed."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from engine.errors import InferenceUnavailableError
from engine.models import UINT8_MODEL_SPEC, ModelSpec
from engine.settings import Settings
from worker import runner

BUILT: list[str] = []
CLOSED: list[str] = []


class _Adapter:
    """Stands in for every adapter but Triton's; records what is built and closed."""

    decode_short_side = UINT8_MODEL_SPEC.resize_short_side  # as a preprocessor has

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        BUILT.append(type(self).__name__)

    def close(self, *args: Any) -> None:
        CLOSED.append(type(self).__name__)

    def resolve_alias(self, name: str) -> str:
        return name  # a plain collection: the worker creates its default one

    def create_collection(self, *args: Any, **kwargs: Any) -> bool:
        return True

    def warmup(self) -> None:
        pass


@pytest.fixture(autouse=True)
def fakes(monkeypatch: pytest.MonkeyPatch) -> None:
    BUILT.clear()
    CLOSED.clear()
    for name in ("ImageFetcher", "VectorStore", "RecordPublisher", "Consumer"):
        monkeypatch.setattr(runner, name, type(name, (_Adapter,), {}))
    monkeypatch.setattr(runner, "build_preprocessor", type("Preprocessor", (_Adapter,), {}))


def test_a_worker_waits_for_the_model_then_gives_up_naming_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = Settings(triton={"url": "127.0.0.1:9", "ready_timeout_s": 1.5})
    began = time.monotonic()
    with (
        caplog.at_level("INFO", logger="engine.inference"),
        pytest.raises(InferenceUnavailableError) as raised,
    ):
        runner.build_worker(settings, worker_id="w")
    assert 1.0 <= time.monotonic() - began < 10.0
    message = str(raised.value)
    assert f"'{settings.triton.model_name}' at 127.0.0.1:9" in message
    assert "triton.ready_timeout_s" in message
    assert any("waiting up to 1.5 s for Triton model" in r.getMessage() for r in caplog.records)
    assert "Consumer" not in BUILT  # never joined the group
    assert sorted(CLOSED) == ["ImageFetcher", "RecordPublisher", "VectorStore", "VectorStore"]


def test_a_worker_starts_once_the_model_is_ready(monkeypatch: pytest.MonkeyPatch) -> None:
    ready = threading.Event()
    threading.Timer(0.3, ready.set).start()

    def check_ready(self: Any, timeout_s: float | None = None) -> None:
        if not ready.is_set():
            raise InferenceUnavailableError("model loading")

    checked: list[ModelSpec] = []

    def check_model(self: Any, spec: ModelSpec, timeout_s: float | None = None) -> None:
        checked.append(spec)  # the served model's metadata against its spec, once ready

    monkeypatch.setattr(runner.TritonEmbedder, "check_ready", check_ready)
    monkeypatch.setattr(runner.TritonEmbedder, "check_model", check_model)
    settings = Settings(triton={"ready_timeout_s": 30})
    runtime = runner.build_worker(settings, worker_id="w")
    try:
        assert ready.is_set() and "Consumer" in BUILT
        assert checked == [settings.model]
    finally:
        runtime.close()
