"""``trident-api`` refusing to start says why in one line and exits 2 (configuration) or 1 (a
service it needs is unavailable), as the worker and the producer do: never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from devstack.stack import LocalStack
from query_api.cli import EXIT_CONFIGURATION, EXIT_UNAVAILABLE

REPO = Path(__file__).resolve().parents[2]


def trident_api(*args: str, env: dict[str, str] | None = None) -> tuple[int, list[str]]:
    """Run ``python -m query_api`` with ``args``; its exit code and its ERROR lines."""
    environment = {
        key: value for key, value in os.environ.items() if not key.startswith("TRIDENT_")
    }
    done = subprocess.run(
        [sys.executable, "-m", "query_api", "--log-level", "WARNING", *args],
        check=False,
        cwd=REPO,
        env={**environment, "JAX_PLATFORMS": "cpu", **(env or {})},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert "Traceback" not in done.stderr, done.stderr
    errors = [line for line in done.stderr.splitlines() if " ERROR " in line]
    return done.returncode, errors


def test_an_exposed_api_without_keys_is_a_configuration_error() -> None:
    code, errors = trident_api("--host", "0.0.0.0")
    assert code == EXIT_CONFIGURATION
    assert len(errors) == 1 and "requires API keys: set api.api_keys" in errors[0], errors


@pytest.mark.parametrize("where", ["file", "environment"])
def test_an_unknown_setting_is_a_configuration_error(tmp_path: Path, where: str) -> None:
    config = tmp_path / "settings.yaml"
    config.write_text("api:\n  bogus: 1\n" if where == "file" else "{}\n")
    env = {"TRIDENT_API__BOGUS": "1"} if where == "environment" else {}
    code, errors = trident_api("--config", str(config), env=env)
    assert code == EXIT_CONFIGURATION
    assert len(errors) == 1 and "api.bogus: unknown key" in errors[0], errors


def test_a_triton_that_never_gets_ready_ends_the_start_in_one_line() -> None:
    env = {
        "TRIDENT_TRITON__URL": "127.0.0.1:9",  # nothing listens there
        "TRIDENT_TRITON__READY_TIMEOUT_S": "1",
        "TRIDENT_PREPROCESS__BATCH_SIZES": "[1]",
    }
    code, errors = trident_api(env=env)
    assert code == EXIT_UNAVAILABLE
    assert len(errors) == 1, errors
    assert "cannot start the query API: Triton model" in errors[0]
    assert "127.0.0.1:9" in errors[0] and "triton.ready_timeout_s" in errors[0]


@pytest.mark.stack
def test_a_model_triton_does_not_serve_is_a_configuration_error(stack: LocalStack) -> None:
    env = {
        "TRIDENT_TRITON__URL": stack.config.triton_grpc_url,
        "TRIDENT_TRITON__PROTOCOL": "grpc",
        "TRIDENT_TRITON__MODEL_NAME": "nope",
        "TRIDENT_PREPROCESS__BATCH_SIZES": "[1]",
    }
    code, errors = trident_api(env=env)
    assert code == EXIT_CONFIGURATION
    assert len(errors) == 1 and "does not serve model 'nope' (it serves: " in errors[0], errors
