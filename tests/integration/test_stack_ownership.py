"""Stacks own only their processes: a test stack starting and stopping beside a quick start, on
the same install cache (and so the same server binaries), never stops the quick start's servers."""

from __future__ import annotations

from pathlib import Path

import pytest

from devstack.config import StackConfig
from devstack.stack import LocalStack
from tests.conftest import PORT_OFFSET, TEST_STACK_CONFIG

pytestmark = pytest.mark.stack


def _stack(root: Path, base: int) -> LocalStack:
    """A stack in ``root`` on ports base..base+11, sharing the test cache."""
    return LocalStack(
        StackConfig(
            root=root,
            cache=TEST_STACK_CONFIG.cache,
            kafka_port=base,
            kafka_controller_port=base + 1,
            triton_http_port=base + 2,
            triton_grpc_port=base + 3,
            triton_metrics_port=base + 4,
            milvus_port=base + 7,  # Milvus takes its port - 1 .. + 10
        )
    )


def test_a_quick_start_stays_healthy_while_a_test_stack_starts_and_stops(
    stack: LocalStack, tmp_path: Path
) -> None:
    # ``stack`` (the session's) has installed everything into the shared cache.
    # Moved like the test stack's ports, so runs on stacks whose offsets differ by hundreds
    # never share them; 29703-29720 and 29756-29773 miss every port such a stack takes (Kafka
    # x92-x93, Milvus x29-x40) and test_faults.py's failover cluster (29750-29755).
    quick = _stack(tmp_path / "quick", 29703 + PORT_OFFSET)
    tests = _stack(tmp_path / "tests", 29756 + PORT_OFFSET)
    try:
        for service in (quick.kafka, quick.milvus):
            service.start()
        before = {"kafka": quick.kafka.process.pid(), "milvus": quick.milvus.process.pid()}
        for service in (tests.kafka, tests.milvus):
            service.start()
        # The test stack lost its Milvus pid file (e.g. a wiped folder): stop() still finds its
        # own server by working directory, and only its own.
        tests.milvus.process.pid_file.unlink()
        tests.down()
        assert not tests.milvus.healthy() and not tests.kafka.healthy()
        assert tests.milvus._server_pids() == []
        assert quick.kafka.healthy() and quick.milvus.healthy()
        after = {"kafka": quick.kafka.process.pid(), "milvus": quick.milvus.process.pid()}
        assert after == before
    finally:
        tests.down()
        quick.down()
