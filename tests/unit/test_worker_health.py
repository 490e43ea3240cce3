"""Several workers on one host: each health server needs its own port, and a taken one is one
clear line (never a traceback), in-process and from ``trident-worker`` itself."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client import CollectorRegistry

from engine.errors import ConfigurationError
from worker.health import HealthServer, check_port_free

REPO = Path(__file__).resolve().parents[2]


def server(port: int) -> HealthServer:
    return HealthServer(
        "127.0.0.1",
        port,
        registry=CollectorRegistry(),
        is_alive=lambda: True,
        readiness=lambda: {"kafka": True},
    )


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A port some other process listens on (as a first worker's health server would)."""
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        yield listener.getsockname()[1]


def test_a_second_server_on_a_taken_port_says_which_setting_to_change(taken_port: int) -> None:
    with pytest.raises(ConfigurationError) as raised:
        server(taken_port)
    message = str(raised.value)
    assert f"127.0.0.1:{taken_port} is already in use" in message
    assert f"--health-port {taken_port + 1}" in message
    assert f"TRIDENT_WORKER__HEALTH_PORT={taken_port + 1}" in message
    with pytest.raises(ConfigurationError, match="already in use"):
        check_port_free("127.0.0.1", taken_port)


def test_port_0_gives_each_worker_a_free_port_of_its_own() -> None:
    check_port_free("127.0.0.1", 0)
    first, second = server(0), server(0)
    for health in (first, second):
        health.start()
    try:
        assert first.address != second.address
        for health in (first, second):
            assert httpx.get(f"{health.address}/livez", timeout=5).json() == {"alive": True}
    finally:
        first.stop()
        second.stop()


@pytest.mark.parametrize("by_flag", [False, True], ids=["settings", "--health-port"])
def test_trident_worker_on_a_taken_health_port_exits_with_one_line(
    taken_port: int, tmp_path: Path, by_flag: bool
) -> None:
    """What the README's scaling advice ran into: a second worker with the same settings file.
    It fails before it connects to anything (Kafka here is a closed port), in one line. The
    flag wins over the settings file."""
    config = tmp_path / "trident.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "kafka": {"bootstrap_servers": "127.0.0.1:1"},
                "worker": {"health_port": 0 if by_flag else taken_port},
            }
        )
    )
    flag = ["--health-port", str(taken_port)] if by_flag else []
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "worker.cli", "--config", str(config), *flag],
        cwd=REPO,
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    output = (result.stdout + result.stderr).strip().splitlines()
    assert result.returncode == 2, output
    assert len(output) == 1, output
    assert "already in use" in output[0] and "--health-port" in output[0]
    assert time.monotonic() - started < 60  # before any connection attempt
