"""Shared fixtures: the real local stack (own folder and ports) and per-test isolation."""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from devstack.config import StackConfig
from devstack.stack import LocalStack

REPO = Path(__file__).resolve().parents[1]

# The test stack never touches the quick start's stack: its own data folder and ports. A second
# test stack on one machine (fault tests run beside other test runs) moves every port by
# TEST_STACK_PORT_OFFSET and keeps its data in TEST_STACK_ROOT.
PORT_OFFSET = int(os.environ.get("TEST_STACK_PORT_OFFSET", "0"))
TEST_STACK_CONFIG = StackConfig(
    root=Path(os.environ.get("TEST_STACK_ROOT", REPO / ".stack-test")),
    cache=REPO / ".stack" / "cache",
    kafka_port=29092 + PORT_OFFSET,
    kafka_controller_port=29093 + PORT_OFFSET,
    triton_http_port=28000 + PORT_OFFSET,
    triton_grpc_port=28001 + PORT_OFFSET,
    triton_metrics_port=28002 + PORT_OFFSET,
    milvus_port=29530 + PORT_OFFSET,
)


@pytest.fixture(scope="session")
def stack() -> Iterator[LocalStack]:
    """The real stack, started for the session and stopped after it (if it started it).

    A service that cannot be installed or started fails every test that uses it, loudly,
    with the service's name and log in the error.
    """
    logging.getLogger("devstack").setLevel(logging.INFO)
    local = LocalStack(TEST_STACK_CONFIG)
    already_up = all(service.healthy() for service in local.services)
    local.up()
    yield local
    if not already_up:
        local.down()


@pytest.fixture
def unique() -> str:
    """A short unique suffix for topic, group and collection names."""
    return uuid.uuid4().hex[:10]
