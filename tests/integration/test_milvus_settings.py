"""The stack's running Milvus was started with the settings adopted for search under load
(issue 25): its environment names the config folder it read at start, and that config and the
environment carry them; its index builds run at idle CPU priority, its searches do not.

The interim index's effect itself is not asserted here: rows still in a growing segment were
searched exactly with it on (20,000 64-d rows, recall@10 1.0), so it shows only on segments
sealed and not yet indexed, a window of seconds to minutes that depends on the machine's load;
benchmarks/bench_growing.py measures it (docs/PERFORMANCE.md).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from pymilvus import MilvusClient

from devstack.build_priority import BUILD_THREAD_PREFIX
from devstack.milvus import SEARCH_UNDER_LOAD, SERVER_ENVIRONMENT
from devstack.stack import LocalStack
from tests.integration.conftest import wait_for
from tests.support.threads import thread_policies

pytestmark = pytest.mark.stack


def _environment(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    pairs = (item.decode(errors="replace").partition("=") for item in raw if item)
    return {name: value for name, _, value in pairs}


def _get(tree: dict[str, Any], dotted: str) -> Any:
    node: Any = tree
    for key in dotted.split("."):
        node = node[key]
    return node


def test_the_running_server_reads_the_adopted_settings(stack: LocalStack) -> None:
    pid = stack.milvus.process.pid()
    assert pid is not None and stack.milvus.healthy()
    environment = _environment(pid)
    for name, value in SERVER_ENVIRONMENT.items():
        assert environment.get(name) == value, name
    # Rendered only by start() before it launches the server, so what the server read.
    config = Path(environment["MILVUSCONF"]) / "milvus.yaml"
    rendered = yaml.safe_load(config.read_text())
    for dotted, value in SEARCH_UNDER_LOAD.items():
        assert _get(rendered, dotted) == value, dotted
    # The measured settings themselves, written out: docs/PERFORMANCE.md's figures come from
    # them, and a stack started without them would quietly measure (and test) another server.
    assert environment["GOGC"] == "400" and environment["GODEBUG"] == "madvdontneed=0"
    assert rendered["queryNode"]["segcore"]["interimIndex"]["enableIndex"] is True
    assert rendered["rocksmq"]["compressionTypes"] == [0, 0, 0, 0, 0]
    assert rendered["dataNode"]["segment"]["insertBufSize"] == 64 * 1024 * 1024


def test_index_builds_run_at_idle_priority_and_searches_do_not(
    stack: LocalStack, unique: str
) -> None:
    """After an index build on the running server, its build threads are in SCHED_IDLE (the
    watcher the stack starts beside it) and its search threads are not."""
    pid = stack.milvus.process.pid()
    assert pid is not None
    watcher = stack.milvus.build_priority.pid()
    assert watcher is not None, "the stack started no build-priority watcher beside Milvus"
    name, dimension, rows = f"priority_{unique}", 32, 3000
    client = MilvusClient(uri=stack.milvus.uri, token=stack.milvus.token)
    try:
        # pymilvus' quick setup: an index on the vector field, loaded; the flush seals the
        # segment, which Milvus then indexes (over its 1,024-row minimum).
        client.create_collection(collection_name=name, dimension=dimension)
        vectors = np.random.default_rng(0).random((rows, dimension), dtype=np.float32)
        client.insert(name, [{"id": n, "vector": v.tolist()} for n, v in enumerate(vectors)])
        client.flush(name)
        wait_for(
            lambda: client.describe_index(name, "vector").get("indexed_rows") == rows,
            timeout=120,
            what="the index build",
        )
        client.search(collection_name=name, data=[vectors[0].tolist()], limit=3)
        wait_for(  # the watcher looks once a second
            lambda: thread_policies(pid).get("Knowhere_Build0") == {os.SCHED_IDLE},
            timeout=10,
            what="the build threads at idle priority",
        )
        policies = thread_policies(pid)
        builds = {n: p for n, p in policies.items() if n.startswith(BUILD_THREAD_PREFIX)}
        assert builds and all(p == {os.SCHED_IDLE} for p in builds.values()), policies
        assert os.SCHED_IDLE not in policies["Knowhere_Search"], policies
    finally:
        client.drop_collection(name)
        client.close()
