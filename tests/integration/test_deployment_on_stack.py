"""Parts of the deployment files that can run here, run against the real test stack.

- The Kubernetes topics Job's script and the workers' init container that waits for it, with
  Kafka 4.1's own topic tool (the jars the local broker runs; the manifests run the same
  version's image), against the real broker.
- The Grafana dashboard's Triton queries name series a real Triton exports.
- The Milvus alias Job's script (milvus_alias.py), against the real Milvus.
- The model upgrade of docs/OPERATIONS.md: searches through a Milvus alias move from the old
  collection to the new one (pymilvus as pinned, the local Milvus 2.3.5). Only pymilvus is
  used here, as an operator would.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import yaml
from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient, ConfigResource, ResourceType
from pymilvus import MilvusClient
from pymilvus.exceptions import MilvusException

from devstack.stack import LocalStack
from engine.models import DEFAULT_MODEL_SPEC
from tests.integration.conftest import wait_for
from tests.unit.deployment_support import REPO, read_env_file
from tests.unit.test_dashboard import DASHBOARD, TRITON_PREFIX, series_in

pytestmark = pytest.mark.stack

BASE = REPO / "deploy" / "kubernetes" / "base"
ALIAS_SCRIPT = BASE / "milvus_alias.py"
KAFKA_TOPICS = "/opt/kafka/bin/kafka-topics.sh"  # where the apache/kafka image has the tool
VECTOR = np.ones(8, dtype=np.float32)


def _milvus_uri(stack: LocalStack) -> str:
    return f"http://{stack.config.host}:{stack.config.milvus_port}"


def _container(manifest: str, kind: str = "containers") -> dict[str, Any]:
    """The one container (or init container) of the first object in ``manifest``."""
    workload = next(yaml.safe_load_all((BASE / manifest).read_text()))
    (container,) = workload["spec"]["template"]["spec"][kind]
    assert isinstance(container, dict)
    return container


def _script(container: dict[str, Any], tool: Path) -> str:
    """The container's bash script, with the image's kafka-topics.sh replaced by ``tool``."""
    script = container["args"][0]
    assert isinstance(script, str) and KAFKA_TOPICS in script
    return script.replace(KAFKA_TOPICS, str(tool))


def _topic_tool(stack: LocalStack, folder: Path) -> Path:
    """A kafka-topics.sh that runs Kafka's TopicCommand from the local broker's jars."""
    java = shutil.which("java")
    assert java, "java is needed (the test stack's Kafka runs on it)"
    tool = folder / "kafka-topics.sh"
    tool.write_text(
        "#!/bin/sh\n"
        f"exec {java} -Xmx256m -Dlog4j2.configurationFile={stack.kafka.log4j_file} "
        f"-cp '{stack.kafka.libs}/*' org.apache.kafka.tools.TopicCommand \"$@\"\n"
    )
    tool.chmod(0o755)
    return tool


def _run_script(
    script: str, environment: dict[str, str], timeout: float = 180
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["/bin/bash", "-ceu", script],
        env={"PATH": os.environ["PATH"], **environment},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_workers_wait_for_the_topics_job_which_creates_both_topics_once(
    stack: LocalStack, unique: str, tmp_path: Path
) -> None:
    tool = _topic_tool(stack, tmp_path)
    job = _container("topics-job.yaml")
    job_env = {e["name"]: e["value"] for e in job["env"]}
    settings_env = read_env_file(BASE / "settings.env")
    ingest, dead_letters = f"job-{unique}", f"job-{unique}.dlq"
    retry = f"job-{unique}.retry"
    environment = {
        **settings_env,
        **job_env,
        "TRIDENT_KAFKA__BOOTSTRAP_SERVERS": stack.kafka.bootstrap_servers,
        "TRIDENT_KAFKA__TOPIC": ingest,
        "TRIDENT_KAFKA__RETRY_TOPIC": retry,
        "TRIDENT_KAFKA__DEAD_LETTER_TOPIC": dead_letters,
        # One broker here: the cluster's replication cannot be had.
        "REPLICATION_FACTOR": "1",
        "MIN_INSYNC_REPLICAS": "1",
    }
    wait = _script(_container("worker.yaml", "initContainers"), tool)
    admin = AdminClient({"bootstrap.servers": stack.kafka.bootstrap_servers})
    try:
        # Before the Job, the workers' init container keeps waiting.
        with pytest.raises(subprocess.TimeoutExpired) as waited:
            _run_script(wait, environment, timeout=15)
        assert b"waiting for topic " + ingest.encode() in (waited.value.stdout or b"")
        assert ingest not in admin.list_topics(timeout=10).topics  # waiting creates nothing

        first = _run_script(_script(job, tool), environment)
        assert first.returncode == 0, first.stdout + first.stderr
        again = _run_script(_script(job, tool), environment)  # `kubectl apply` may rerun it
        assert again.returncode == 0, again.stdout + again.stderr
        done = _run_script(wait, environment)  # a JVM per topic: minutes under load
        assert done.returncode == 0, done.stdout + done.stderr

        topics = admin.list_topics(timeout=10).topics
        partitions = int(settings_env["TRIDENT_KAFKA__TOPIC_PARTITIONS"])
        for topic in (ingest, retry, dead_letters):
            assert len(topics[topic].partitions) == partitions, topic
        configs = {
            resource.name: future.result(timeout=10)
            for resource, future in admin.describe_configs(
                [ConfigResource(ResourceType.TOPIC, t) for t in (ingest, retry, dead_letters)]
            ).items()
        }
        assert configs[ingest]["cleanup.policy"].value == "compact"
        assert configs[retry]["cleanup.policy"].value == "delete"
        retention = settings_env["TRIDENT_KAFKA__DEAD_LETTER_RETENTION_MS"]
        assert configs[dead_letters]["retention.ms"].value == retention
        assert configs[ingest]["retention.ms"].value != retention  # the broker's default
        assert configs[ingest]["min.insync.replicas"].value == "1"
    finally:
        for future in admin.delete_topics(
            [ingest, retry, dead_letters], operation_timeout=10
        ).values():
            try:
                future.result(timeout=15)
            except KafkaException:  # a topic the Job failed to create
                continue


def test_the_dashboards_triton_series_are_exported_by_triton(stack: LocalStack) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    queried = {
        name
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
        for name in series_in(target["expr"])
        if name.startswith(TRITON_PREFIX)
    }
    assert queried, "the dashboard queries no Triton series"
    # Triton exports its per-model series once the model has been loaded.
    http = f"http://{stack.config.host}:{stack.config.triton_http_port}"
    ready = httpx.get(f"{http}/v2/models/{DEFAULT_MODEL_SPEC.name}/ready", timeout=10)
    assert ready.status_code == 200
    exposition = httpx.get(stack.triton.metrics_url, timeout=10).text
    exported = {line.split()[2] for line in exposition.splitlines() if line.startswith("# TYPE ")}
    assert queried <= exported, sorted(queried - exported)


def _collection_with_one_row(client: MilvusClient, name: str, row_id: int) -> None:
    """A small collection (pymilvus' quick setup: int64 id, 8-d vector, loaded) with one row."""
    client.create_collection(collection_name=name, dimension=VECTOR.shape[0])
    client.insert(collection_name=name, data=[{"id": row_id, "vector": VECTOR.tolist()}])


def _nearest(client: MilvusClient, name: str) -> list[int]:
    (hits,) = client.search(collection_name=name, data=[VECTOR.tolist()], limit=3)
    return [int(hit["id"]) for hit in hits]


def _drop(client: MilvusClient, alias: str, *collections: str) -> None:
    with contextlib.suppress(MilvusException):  # the alias was never made
        client.drop_alias(alias=alias)
    for name in collections:
        client.drop_collection(name)
    client.close()


def test_a_model_upgrade_switches_searches_behind_an_alias(stack: LocalStack, unique: str) -> None:
    """docs/OPERATIONS.md "Changing the model": re-embed into a new collection, move the alias
    searches go through; they follow at once, with no client reconnecting."""
    old, new, alias = f"images_v1_{unique}", f"images_v2_{unique}", f"images_{unique}"
    client = MilvusClient(uri=_milvus_uri(stack), token=stack.milvus.token)
    try:
        _collection_with_one_row(client, old, 1)
        _collection_with_one_row(client, new, 2)
        client.create_alias(collection_name=old, alias=alias)
        wait_for(lambda: _nearest(client, alias) == [1], timeout=30, what="the old collection")
        client.alter_alias(collection_name=new, alias=alias)
        wait_for(lambda: _nearest(client, alias) == [2], timeout=30, what="the new collection")
        assert client.describe_alias(alias=alias)["collection_name"] == new
    finally:
        _drop(client, alias, old, new)


def test_the_alias_job_sets_up_once_and_never_moves_an_alias(
    stack: LocalStack, unique: str
) -> None:
    collection, alias, upgraded = f"images_v1_{unique}", f"images_{unique}", f"images_v2_{unique}"
    environment = {
        "TRIDENT_MILVUS__URI": _milvus_uri(stack),
        "TRIDENT_MILVUS__TOKEN": stack.milvus.token,
        "TRIDENT_MILVUS__COLLECTION": collection,
        "SEARCH_ALIAS": alias,
        "COLLECTION_WAIT_S": "6",
    }

    def run_job(**changes: str) -> subprocess.CompletedProcess[str]:
        clean = {k: v for k, v in os.environ.items() if not k.startswith("TRIDENT_")}
        return subprocess.run(
            [sys.executable, str(ALIAS_SCRIPT)],
            env={**clean, **environment, **changes},
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    client = MilvusClient(uri=_milvus_uri(stack), token=stack.milvus.token)
    try:
        # Before the workers made their collection, the Job waits, then fails (and the Job's
        # backoff runs it again).
        early = run_job()
        assert early.returncode == 1
        assert f"collection {collection} did not appear" in early.stderr
        _collection_with_one_row(client, collection, 1)
        first = run_job()
        assert first.returncode == 0, first.stderr
        assert client.describe_alias(alias=alias)["collection_name"] == collection
        again = run_job()
        assert again.returncode == 0, again.stderr
        assert "left as it is" in again.stderr
        # After an upgrade moved the alias, running the Job again leaves it there.
        _collection_with_one_row(client, upgraded, 2)
        client.alter_alias(collection_name=upgraded, alias=alias)
        assert run_job().returncode == 0
        assert client.describe_alias(alias=alias)["collection_name"] == upgraded
        # An alias name taken by a collection is refused, loudly.
        taken = run_job(SEARCH_ALIAS=collection, TRIDENT_MILVUS__COLLECTION=upgraded)
        assert taken.returncode == 1
        assert "is a collection, not an alias" in taken.stderr
    finally:
        _drop(client, alias, collection, upgraded)
