"""engine.health: probes run at once under one deadline, at most one in flight per name, and each
service's probe calls a hung service (it accepts connections and never answers) down in time; so
do the earlier pipeline's ``health_check`` and ``jax-embedding health``, which use them."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.errors import StoreUnavailableError
from engine.health import (
    HEALTH_DEADLINE_S,
    Prober,
    kafka_probe,
    milvus_probe,
    probe_all,
    triton_probe,
)
from engine.inference import TritonEmbedder
from engine.settings import KafkaSettings, MilvusSettings, TritonSettings
from engine.store import VectorStore
from jax_embedding import cli as jax_embedding_cli
from jax_embedding.config import ServiceConfig
from jax_embedding.pipeline import ImageEmbeddingPipeline
from tests.support.silent_server import silent_server

# What the machine may add to a deadline (thread start-up, a busy 2-core box).
SLACK_S = 1.5


@pytest.fixture
def prober() -> Iterator[Prober]:
    made = Prober()
    yield made
    made.close()


def test_probes_run_at_once_and_answer_by_the_deadline(prober: Prober) -> None:
    release = threading.Event()

    def down() -> None:
        raise StoreUnavailableError("Milvus refused the connection")

    began = time.monotonic()
    results = prober.probe_all(
        {"hung": release.wait, "slow": lambda: time.sleep(0.2), "down": down}, deadline_s=0.5
    )
    elapsed = time.monotonic() - began
    release.set()
    assert 0.5 <= elapsed < 0.5 + SLACK_S  # not 0.7: the slow one ran beside the hung one
    assert results["slow"].up and results["slow"].state == "up"
    assert (results["down"].state, results["down"].detail) == (
        "down",
        "Milvus refused the connection",
    )
    assert (results["hung"].state, results["hung"].detail) == ("down", "no answer within 0.5 s")


def test_a_probe_still_running_is_joined_not_started_again(prober: Prober) -> None:
    release = threading.Event()
    calls: list[int] = []

    def hung() -> None:
        calls.append(1)
        release.wait()

    assert not prober.probe_all({"milvus": hung}, deadline_s=0.1)["milvus"].up
    assert not prober.probe_all({"milvus": hung}, deadline_s=0.1)["milvus"].up
    assert len(calls) == 1  # the second call waited on the first probe: no thread piles up
    threading.Timer(0.1, release.set).start()
    # The running probe answers within this call's deadline: its answer is this call's.
    assert prober.probe_all({"milvus": hung}, deadline_s=2.0)["milvus"].up
    assert len(calls) == 1
    assert prober.probe_all({"milvus": hung}, deadline_s=2.0)["milvus"].up  # a new probe
    assert len(calls) == 2


def test_probe_threads_are_kept_per_name_and_end_on_close() -> None:
    prober = Prober()

    def probe_threads() -> list[str]:
        names = [t.name for t in threading.enumerate() if t.name.startswith("probe-my-")]
        return sorted(names)

    for _ in range(5):
        prober.probe_all({"my-a": lambda: None, "my-b": lambda: None}, deadline_s=1.0)
    assert probe_threads() == ["probe-my-a", "probe-my-b"]
    prober.close()
    deadline = time.monotonic() + 5
    while probe_threads() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert probe_threads() == []


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_a_hung_triton_is_down_within_the_deadline(protocol: str) -> None:
    with silent_server() as address:
        embedder = TritonEmbedder(TritonSettings(url=address, protocol=protocol))
        began = time.monotonic()
        result = probe_all({"triton": triton_probe(embedder)}, HEALTH_DEADLINE_S)["triton"]
        elapsed = time.monotonic() - began
        embedder.close()
    assert not result.up and elapsed < HEALTH_DEADLINE_S + SLACK_S
    # Its own deadline (below the bound) ended it, so it says where and why.
    assert address in result.detail, result.detail


def test_a_hung_milvus_and_kafka_are_down_within_the_deadline() -> None:
    with silent_server() as milvus, silent_server() as kafka:
        # Its connection attempt outlives the deadline (closing the store waits for it).
        store = VectorStore(MilvusSettings(uri=f"http://{milvus}", timeout_s=5.0))
        began = time.monotonic()
        results = probe_all(
            {
                "milvus": milvus_probe(store),
                "kafka": kafka_probe(KafkaSettings(bootstrap_servers=kafka)),
            },
            HEALTH_DEADLINE_S,
        )
        elapsed = time.monotonic() - began
        store.close()
    assert elapsed < HEALTH_DEADLINE_S + SLACK_S
    assert {name: result.state for name, result in results.items()} == {
        "milvus": "down",
        "kafka": "down",
    }
    assert kafka in results["kafka"].detail


def test_the_earlier_pipeline_and_command_report_hung_services_down_in_time(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with silent_server() as triton, silent_server() as milvus, silent_server() as kafka:
        milvus_host, milvus_port = milvus.split(":")
        config = tmp_path / "config.yaml"
        config.write_text(
            f"triton: {{url: '{triton}', protocol: grpc}}\n"
            f"milvus: {{host: '{milvus_host}', port: {milvus_port}, timeout: 5}}\n"
            f"kafka: {{bootstrap_servers: '{kafka}'}}\n"
            "cache_compiled_functions: false\n"
        )
        began = time.monotonic()
        code = jax_embedding_cli.main(["health", "--config", str(config)])
        elapsed = time.monotonic() - began
        with ImageEmbeddingPipeline(ServiceConfig.from_yaml(config)) as pipeline:
            checked = time.monotonic()
            states = pipeline.health_check()
            checked = time.monotonic() - checked
    assert code == jax_embedding_cli.EXIT_UNAVAILABLE
    assert elapsed < jax_embedding_cli.HEALTH_DEADLINE_S + SLACK_S, elapsed
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[:2] for line in lines] == [
        ["kafka", "DOWN"],
        ["triton", "DOWN"],
        ["milvus", "DOWN"],
    ]
    assert states == {"triton": False, "milvus": False}
    assert checked < HEALTH_DEADLINE_S + SLACK_S, checked
