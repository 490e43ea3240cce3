"""The local stack's Milvus configuration: the settings adopted for search under load (issue 25)
reach the rendered milvus.yaml and the server's environment, and a benchmark's variant goes over
them; the deployment files carry the same choices."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from devstack import milvus as milvus_module
from devstack.config import StackConfig
from devstack.milvus import SEARCH_UNDER_LOAD, SERVER_ENVIRONMENT, MilvusService
from tests.unit.deployment_support import REPO, kustomize

# The wheel's template syntax, {{ key(type): default }}, in a few of its real lines.
TEMPLATE = """\
proxy:
  port: {{ proxy_port(int): 19530 }}
queryNode:
  segcore:
    interimIndex:
      enableIndex: true
      nlist: 128
dataCoord:
  segment:
    maxSize: 512
    sealProportion: 0.23
common:
  security:
    authorizationEnabled: {{ authorization_enabled(bool): false }}
"""


def _service(tmp_path: Path, **kwargs: Any) -> MilvusService:
    config = StackConfig(root=tmp_path / "stack", cache=tmp_path / "cache", milvus_port=19930)
    service = MilvusService(config, **kwargs)
    service.server_dir.mkdir(parents=True, exist_ok=True)
    (service.server_dir / "config.yaml.template").write_text(TEMPLATE)
    (service.server_dir / "glog.conf").write_text("--log_dir=/tmp/x\n")
    return service


def _rendered(service: MilvusService) -> dict[str, Any]:
    service._write_configs()
    loaded: dict[str, Any] = yaml.safe_load((service.configs / "milvus.yaml").read_text())
    return loaded


def _get(tree: dict[str, Any], dotted: str) -> Any:
    node: Any = tree
    for key in dotted.split("."):
        node = node[key]
    return node


def test_the_adopted_search_settings_are_rendered(tmp_path: Path) -> None:
    rendered = _rendered(_service(tmp_path))
    assert SEARCH_UNDER_LOAD, "issue 25 adopted settings; an empty set means they were lost"
    for dotted, value in SEARCH_UNDER_LOAD.items():
        assert _get(rendered, dotted) == value, dotted
    # The stack's own infrastructure keys are still there beside them.
    assert _get(rendered, "proxy.port") == 19930
    assert _get(rendered, "common.security.authorizationEnabled") is True


def test_the_server_gets_the_adopted_environment(tmp_path: Path) -> None:
    env = _service(tmp_path)._env()
    for name, value in SERVER_ENVIRONMENT.items():
        assert env[name] == value


def test_a_benchmark_variant_goes_over_the_stack_settings(tmp_path: Path) -> None:
    key = "queryNode.segcore.interimIndex.enableIndex"
    opposite = not SEARCH_UNDER_LOAD.get(key, True)
    service = _service(
        tmp_path,
        settings={key: opposite, "dataCoord.segment.maxSize": 1024},
        environment={"GOMAXPROCS": "2"},
    )
    rendered = _rendered(service)
    assert _get(rendered, key) is opposite
    assert _get(rendered, "dataCoord.segment.maxSize") == 1024
    assert service._env()["GOMAXPROCS"] == "2"


def test_the_stack_passes_no_variant(tmp_path: Path) -> None:
    service = _service(tmp_path)
    assert service.extra_settings == {}
    assert service.extra_environment == {}


@pytest.mark.parametrize("path", ["compose.yaml"])
def test_compose_mounts_the_milvus_settings_file(path: str) -> None:
    compose = yaml.safe_load((REPO / path).read_text())
    milvus = compose["services"]["milvus"]
    mounts = [v for v in milvus["volumes"] if isinstance(v, str) and "user.yaml" in v]
    assert mounts, "the Milvus service must mount docker/milvus/user.yaml"
    source = mounts[0].split(":")[0]
    user = yaml.safe_load((REPO / source).read_text())
    assert _get(user, "queryNode.segcore.interimIndex.enableIndex") is True


def test_module_documents_why() -> None:
    # Each adopted key is explained where it is set (a comment naming the measurement).
    source = Path(milvus_module.__file__).read_text()
    assert "bench_growing.py" in source


# ------------------------------------------------------------------ the cluster-mode overlay

OVERLAY = "overlays/milvus-cluster"


@pytest.fixture(scope="module")
def cluster_objects(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """The overlay built as a user would: secrets.env made from its example first."""
    tree = tmp_path_factory.mktemp("deploy") / "kubernetes"
    shutil.copytree(
        REPO / "deploy" / "kubernetes", tree, ignore=shutil.ignore_patterns("secrets.env")
    )
    shutil.copy(tree / "base" / "secrets.env.example", tree / "base" / "secrets.env")
    result = subprocess.run(
        [str(kustomize()), "build", str(tree / OVERLAY)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, f"kustomize build {OVERLAY}:\n{result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def _milvus(objects: list[dict[str, Any]]) -> dict[str, Any]:
    (found,) = [o for o in objects if o["kind"] == "Milvus"]
    return found


def test_the_overlay_runs_milvus_in_cluster_mode(cluster_objects: list[dict[str, Any]]) -> None:
    milvus = _milvus(cluster_objects)
    assert milvus["apiVersion"] == "milvus.io/v1beta1"
    assert milvus["spec"]["mode"] == "cluster"
    assert milvus["metadata"]["namespace"] == "embedding-trident"
    compose = yaml.safe_load((REPO / "compose.yaml").read_text())
    assert milvus["spec"]["components"]["image"] == compose["services"]["milvus"]["image"]


def test_index_building_runs_off_the_query_nodes(cluster_objects: list[dict[str, Any]]) -> None:
    components = _milvus(cluster_objects)["spec"]["components"]
    query_pool = components["queryNode"]["nodeSelector"]
    # 2.6 builds indexes and compacts in the data node; the streaming node takes the writes.
    for builder in ("dataNode", "streamingNode"):
        pool = components[builder]["nodeSelector"]
        assert pool.keys() == query_pool.keys(), builder
        assert pool != query_pool, f"{builder} shares the query nodes' pool"
    assert "indexNode" not in components  # merged into the data node in 2.6
    anti = components["queryNode"]["affinity"]["podAntiAffinity"]
    (term,) = anti["requiredDuringSchedulingIgnoredDuringExecution"]
    assert term["labelSelector"]["matchLabels"]["app.kubernetes.io/component"] == "querynode"


def test_query_nodes_hold_what_they_serve(cluster_objects: list[dict[str, Any]]) -> None:
    query = _milvus(cluster_objects)["spec"]["components"]["queryNode"]
    limits = query["resources"]["limits"]["memory"]
    assert limits == query["resources"]["requests"]["memory"]  # no overcommit of the index


def test_the_cluster_carries_the_adopted_settings(cluster_objects: list[dict[str, Any]]) -> None:
    config = _milvus(cluster_objects)["spec"]["config"]
    user = yaml.safe_load((REPO / "docker" / "milvus" / "user.yaml").read_text())
    assert config == user, "the overlay and compose must run Milvus with the same settings"
    for dotted, value in SEARCH_UNDER_LOAD.items():
        assert _get(config, dotted) == value, dotted


def test_the_service_points_at_the_cluster_proxy(cluster_objects: list[dict[str, Any]]) -> None:
    (settings,) = [
        o
        for o in cluster_objects
        if o["kind"] == "ConfigMap" and o["metadata"]["name"].startswith("trident-settings")
    ]
    name = _milvus(cluster_objects)["metadata"]["name"]
    # The operator's proxy Service is <name>-milvus.
    expected = f"http://{name}-milvus.embedding-trident.svc:19530"
    assert settings["data"]["TRIDENT_MILVUS__URI"] == expected


def test_built_in_objects_of_the_overlay_are_valid(cluster_objects: list[dict[str, Any]]) -> None:
    version = kubernetes_validate.utils.latest_version()
    errors = []
    for document in cluster_objects:
        if document["kind"] in {"Milvus", "ScaledObject"}:
            continue  # custom resources: not in Kubernetes' schemas
        try:
            kubernetes_validate.validate(document, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            errors.append(f"{document['kind']}/{document['metadata']['name']}: {exc}")
    assert not errors
