"""deploy/kubernetes/: rendered with kustomize, valid for Kubernetes and KEDA, consistent.

No cluster runs here. Each kustomization is rendered with a pinned kustomize (built from its
Go module, see tests/unit/deployment_support.py), every built-in object is validated strictly
(unknown fields rejected) against the Kubernetes OpenAPI schemas of the oldest and newest
versions `kubernetes-validate` ships offline, and the ScaledObject against KEDA's CRD schema
(vendored). Then the objects are checked against each other and against the settings: probes
on the worker's health port, grace period above the worker's, autoscaling bounded by the
partitions the topics Job creates, selectors that select, and the Triton image and arguments
of docker/triton.Dockerfile.
"""

from __future__ import annotations

import copy
import itertools
import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from devstack.config import StackConfig
from engine.kafka import consumer_config
from engine.models import UINT8_MODEL_SPEC
from engine.settings import Settings
from engine.store import version_collection
from reembed.plan import rebuild_group
from tests.unit.deployment_support import (
    REPO,
    SCHEMAS,
    assert_environment_arrives,
    check_variable_names,
    dockerfile_instructions,
    kustomize,
    read_env_file,
)

DEPLOY = REPO / "deploy" / "kubernetes"
BASE = DEPLOY / "base"
KUSTOMIZATIONS = ("base", "overlays/gpu", "overlays/reembed")
# The oldest Kubernetes still commonly run (managed clusters' extended support) and the newest
# that kubernetes-validate knows.
KUBERNETES_VERSIONS = ("1.31.0", kubernetes_validate.utils.latest_version())
CUSTOM_KINDS = {("keda.sh/v1alpha1", "ScaledObject")}
# Trigger metadata the KEDA 2.20 kafka scaler reads (pkg/scalers/kafka_scaler.go); anything
# else in `metadata` would be ignored silently, so a typo must fail here.
KEDA_KAFKA_METADATA = {
    "bootstrapServers",
    "consumerGroup",
    "topic",
    "partitionLimitation",
    "lagThreshold",
    "activationLagThreshold",
    "offsetResetPolicy",
    "allowIdleConsumers",
    "excludePersistentLag",
    "scaleToZeroOnInvalidOffset",
    "limitToPartitionsWithLag",
    "ensureEvenDistributionOfPartitions",
    "version",
    "tls",
    "unsafeSsl",
    "sasl",
    "saslTokenProvider",
    "awsRegion",
}
KEDA_FROM_ENV = {"bootstrapServers", "consumerGroup", "topic"}
TOPICS = (
    "TRIDENT_KAFKA__TOPIC",
    "TRIDENT_KAFKA__RETRY_TOPIC",
    "TRIDENT_KAFKA__DEAD_LETTER_TOPIC",
)

Objects = list[dict[str, Any]]


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Objects]:
    """Every kustomization built as a user would: secrets.env made from its example first."""
    tree = tmp_path_factory.mktemp("deploy") / "kubernetes"
    shutil.copytree(DEPLOY, tree, ignore=shutil.ignore_patterns("secrets.env"))
    shutil.copy(tree / "base" / "secrets.env.example", tree / "base" / "secrets.env")
    binary = kustomize()
    built: dict[str, Objects] = {}
    for name in KUSTOMIZATIONS:
        result = subprocess.run(
            [str(binary), "build", str(tree / name)],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert result.returncode == 0, f"kustomize build {name}:\n{result.stderr}"
        built[name] = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    return built


@pytest.fixture(scope="module")
def base(rendered: dict[str, Objects]) -> Objects:
    return rendered["base"]


@pytest.fixture(scope="module")
def scaled_object_validator() -> jsonschema.protocols.Validator:
    crd = yaml.safe_load((SCHEMAS / "keda.sh_scaledobjects.yaml").read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1alpha1"]
    schema = _reject_unknown_fields(version["schema"]["openAPIV3Schema"])
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def _reject_unknown_fields(schema: dict[str, Any]) -> dict[str, Any]:
    """The CRD schema with unknown fields rejected, as `kubectl apply --validate=strict` does.

    A structural CRD schema allows any field it does not name (the API server prunes them);
    here they are errors, except where the CRD preserves unknown fields on purpose.
    """
    strict = copy.deepcopy(schema)

    def visit(node: Any) -> None:
        if isinstance(node, dict):
            if (
                "properties" in node
                and "additionalProperties" not in node
                and not node.get("x-kubernetes-preserve-unknown-fields")
            ):
                node["additionalProperties"] = False
            for value in node.values():
                visit(value)
        elif isinstance(node, list):
            for value in node:
                visit(value)

    visit(strict)
    # Every object has metadata; the CRD schema leaves it to the API server.
    strict["properties"]["metadata"] = {"type": "object"}
    return strict


def _kubernetes_errors(document: dict[str, Any], version: str) -> list[str]:
    try:
        kubernetes_validate.validate(document, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        return [str(exc)]
    return []


def _one(objects: Objects, kind: str, name: str) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def _generated(objects: Objects, kind: str, name: str) -> dict[str, Any]:
    """An object of a kustomize generator: its name has a content hash appended."""
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"].startswith(name)]
    assert len(found) == 1, f"{kind}/{name}-<hash>: {len(found)} found"
    return found[0]


def _pod_templates(objects: Objects) -> Iterator[tuple[str, dict[str, Any]]]:
    for o in objects:
        if o["kind"] in {"Deployment", "Job", "StatefulSet", "DaemonSet"}:
            yield f"{o['kind']}/{o['metadata']['name']}", o["spec"]["template"]


def _container(objects: Objects, deployment: str) -> dict[str, Any]:
    (container,) = _one(objects, "Deployment", deployment)["spec"]["template"]["spec"]["containers"]
    return container


def _port(container: dict[str, Any], port: int | str) -> int:
    """A container port by number or by name."""
    numbers = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
    if isinstance(port, int):
        assert port in numbers.values(), f"{container['name']}: no port {port}"
        return port
    assert port in numbers, f"{container['name']}: no port named {port!r}"
    return numbers[port]


def _settings_data(objects: Objects) -> dict[str, str]:
    data: dict[str, str] = _generated(objects, "ConfigMap", "trident-settings")["data"]
    return data


@pytest.fixture(scope="module")
def settings_env() -> dict[str, str]:
    return read_env_file(BASE / "settings.env")


@pytest.fixture(scope="module")
def deployed_settings(settings_env: dict[str, str]) -> Iterator[Settings]:
    """Settings as the apps load them from the ConfigMap and the example Secret."""
    environment = {**settings_env, **read_env_file(BASE / "secrets.env.example")}
    with pytest.MonkeyPatch.context() as monkeypatch:
        yield assert_environment_arrives(monkeypatch, environment, "deploy/kubernetes")


# --- schemas -----------------------------------------------------------------------------------


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_manifests_follow_the_kubernetes_and_keda_schemas(
    rendered: dict[str, Objects],
    kustomization: str,
    version: str,
    scaled_object_validator: jsonschema.protocols.Validator,
) -> None:
    errors: list[str] = []
    for document in rendered[kustomization]:
        where = f"{document['kind']}/{document['metadata']['name']}"
        if (document["apiVersion"], document["kind"]) in CUSTOM_KINDS:
            errors += [
                f"{where}: {e.message}" for e in scaled_object_validator.iter_errors(document)
            ]
        else:
            errors += [f"{where}: {e}" for e in _kubernetes_errors(document, version)]
    assert errors == []


def test_the_schema_checks_catch_mistakes(
    base: Objects, scaled_object_validator: jsonschema.protocols.Validator
) -> None:
    version = KUBERNETES_VERSIONS[-1]
    worker = _one(base, "Deployment", "trident-worker")
    mistakes = {
        "misspelt pod field": ("terminationGracePeriod", 45),
        "port as text": ("containers", [{**_container(base, "trident-worker"), "ports": "9400"}]),
        "unknown probe handler": (
            "containers",
            [{**_container(base, "trident-worker"), "livenessProbe": {"http": {"path": "/"}}}],
        ),
    }
    for what, (key, value) in mistakes.items():
        broken = copy.deepcopy(worker)
        broken["spec"]["template"]["spec"][key] = value
        assert _kubernetes_errors(broken, version), f"not caught: {what}"
    scaled = _one(base, "ScaledObject", "trident-worker")
    for key, value in {"maxReplicas": 4, "minReplicaCount": "one", "triggers": {}}.items():
        broken = copy.deepcopy(scaled)
        broken["spec"][key] = value
        assert list(scaled_object_validator.iter_errors(broken)), f"not caught: {key}"
    with pytest.raises(kubernetes_validate.SchemaNotFoundError):
        kubernetes_validate.validate({**worker, "kind": "Deploymnet"}, version, strict=True)


def test_only_known_kinds_are_rendered(rendered: dict[str, Objects]) -> None:
    for objects in rendered.values():
        custom = {(o["apiVersion"], o["kind"]) for o in objects} & {*CUSTOM_KINDS}
        assert custom == CUSTOM_KINDS
        assert {o["metadata"].get("namespace") for o in objects if o["kind"] != "Namespace"} == {
            "embedding-trident"
        }


# --- settings ----------------------------------------------------------------------------------


def test_deployment_settings_are_settings_fields(settings_env: dict[str, str]) -> None:
    secrets = read_env_file(BASE / "secrets.env.example")
    names = set(settings_env) | set(secrets)
    assert all(name.startswith("TRIDENT_") for name in names)
    assert "TRIDENT_MILVUS__TOKEN" in secrets
    check_variable_names(names)
    for path in sorted(DEPLOY.rglob("*.yaml")):
        check_variable_names(
            set(re.findall(r"\bTRIDENT_[A-Z0-9_]+__[A-Z0-9_]+\b", path.read_text()))
        )


def test_the_configmap_holds_settings_env(base: Objects, settings_env: dict[str, str]) -> None:
    assert _settings_data(base) == settings_env
    secret = _generated(base, "Secret", "trident-secrets")
    assert set(secret["data"]) == set(read_env_file(BASE / "secrets.env.example"))


def test_the_apps_read_the_settings_and_secrets(base: Objects) -> None:
    config_map = _generated(base, "ConfigMap", "trident-settings")["metadata"]["name"]
    secret = _generated(base, "Secret", "trident-secrets")["metadata"]["name"]
    for deployment in ("trident-worker", "trident-api"):
        sources = _container(base, deployment)["envFrom"]
        assert sources == [
            {"configMapRef": {"name": config_map}},
            {"secretRef": {"name": secret}},
        ], deployment


# --- the worker --------------------------------------------------------------------------------


def test_the_worker_stops_within_its_grace_period(
    base: Objects, deployed_settings: Settings
) -> None:
    pod = _one(base, "Deployment", "trident-worker")["spec"]["template"]["spec"]
    # Room for the batch in hand to finish, commit and leave the group after SIGTERM.
    assert pod["terminationGracePeriodSeconds"] >= deployed_settings.worker.shutdown_grace_s + 10


def test_the_worker_probes_its_health_port(base: Objects, deployed_settings: Settings) -> None:
    container = _container(base, "trident-worker")
    assert container["command"] == ["trident-worker"]
    assert deployed_settings.worker.health_host == "0.0.0.0"
    probes = {
        kind: container[kind]["httpGet"]
        for kind in ("startupProbe", "livenessProbe", "readinessProbe")
    }
    assert {kind: probe["path"] for kind, probe in probes.items()} == {
        "startupProbe": "/livez",
        "livenessProbe": "/livez",
        "readinessProbe": "/readyz",
    }
    for probe in probes.values():
        assert _port(container, probe["port"]) == deployed_settings.worker.health_port


def test_the_worker_count_belongs_to_the_autoscaler(base: Objects) -> None:
    worker = _one(base, "Deployment", "trident-worker")
    assert "replicas" not in worker["spec"]  # `kubectl apply` would reset KEDA's count
    assert worker["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}


def test_autoscaling_follows_the_workers_consumer_group(
    base: Objects, deployed_settings: Settings
) -> None:
    scaled = _one(base, "ScaledObject", "trident-worker")["spec"]
    assert scaled["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "trident-worker",
    }
    (trigger,) = scaled["triggers"]
    assert trigger["type"] == "kafka"
    metadata: dict[str, str] = trigger["metadata"]
    names = {key.removesuffix("FromEnv") for key in metadata}
    assert names <= KEDA_KAFKA_METADATA, sorted(names - KEDA_KAFKA_METADATA)
    # KEDA resolves *FromEnv in the target container's environment: the workers' own settings.
    worker_env = _settings_data(base)
    kafka = deployed_settings.kafka
    resolved = {
        name: worker_env[metadata[f"{name}FromEnv"]]
        for name in KEDA_FROM_ENV
        if f"{name}FromEnv" in metadata
    }
    assert resolved == {
        "bootstrapServers": kafka.bootstrap_servers,
        "consumerGroup": kafka.group_id,
        "topic": kafka.topic,
    }
    assert metadata["offsetResetPolicy"] == consumer_config(kafka)["auto.offset.reset"]
    assert metadata["allowIdleConsumers"] == "false"
    assert int(metadata["lagThreshold"]) > 0


def test_autoscaling_stays_within_the_partitions(
    base: Objects, deployed_settings: Settings
) -> None:
    scaled = _one(base, "ScaledObject", "trident-worker")["spec"]
    partitions = deployed_settings.kafka.topic_partitions
    assert 1 <= scaled["minReplicaCount"] <= scaled["maxReplicaCount"] <= partitions
    # The workers' PodDisruptionBudget must let a drain proceed at the minimum count.
    budget = _one(base, "PodDisruptionBudget", "trident-worker")["spec"]
    assert budget == {
        "maxUnavailable": 1,
        "selector": {"matchLabels": {"app.kubernetes.io/name": "trident-worker"}},
    }


def _kafka_script(base: Objects, container: dict[str, Any], *variables: str) -> str:
    """A Kafka CLI container's script: settings from the ConfigMap, valid bash, which quotes
    each of ``variables``."""
    config_map = _generated(base, "ConfigMap", "trident-settings")["metadata"]["name"]
    assert container["envFrom"] == [{"configMapRef": {"name": config_map}}]
    assert container["image"].startswith("apache/kafka:4.")
    script: str = container["args"][0]
    for variable in ("TRIDENT_KAFKA__BOOTSTRAP_SERVERS", *variables):
        assert f'"${variable}"' in script
    syntax = subprocess.run(
        ["bash", "-n", "-c", script], capture_output=True, text=True, check=False
    )
    assert syntax.returncode == 0, syntax.stderr
    return script


def _run_with_stub_kafka_cli(
    script: str, environment: dict[str, str], folder: Path, *, ingest_partitions: int
) -> list[list[str]]:
    """Run a Kafka CLI container's script with a stub ``kafka-topics.sh`` that records its
    arguments (one call a list) and describes the ingest topic with ``ingest_partitions``."""
    calls = folder / "calls"
    stub = folder / "kafka-topics.sh"
    stub.write_text(
        "#!/bin/bash\n"
        f'printf "%s\\n" "$@" --END-- >> "{calls}"\n'
        'if [[ " $* " == *" --describe "* ]]; then\n'
        f'  printf "Topic: t\\tTopicId: x\\tPartitionCount: {ingest_partitions}\\t'
        'ReplicationFactor: 3\\tConfigs: \\n"\n'
        "fi\n"
    )
    stub.chmod(0o755)
    result = subprocess.run(
        ["bash", "-ceu", script.replace("/opt/kafka/bin/", f"{folder}/")],
        env={"PATH": "/usr/bin:/bin", **environment},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    found: list[list[str]] = [[]]
    for line in calls.read_text().splitlines():
        if line == "--END--":
            found.append([])
        else:
            found[-1].append(line)
    return [call for call in found if call]


def _created(calls: list[list[str]]) -> dict[str, tuple[int, dict[str, str]]]:
    """Each created topic's partitions and configs, from kafka-topics.sh calls."""
    created = {}
    for call in calls:
        if "--create" not in call:
            continue
        assert "--if-not-exists" in call, call  # idempotent: never fails on a topic that exists
        options = list(itertools.pairwise(call))
        (topic,) = [value for flag, value in options if flag == "--topic"]
        (partitions,) = [value for flag, value in options if flag == "--partitions"]
        configs = dict(value.split("=", 1) for flag, value in options if flag == "--config")
        created[topic] = (int(partitions), configs)
    return created


def test_the_topics_job_creates_the_workers_topics_as_the_worker_would(
    base: Objects, deployed_settings: Settings, tmp_path: Path
) -> None:
    """The Job's script, run with a stub Kafka CLI on the ConfigMap's values, creates exactly
    the three topics with the configs the worker's own creation uses (KafkaSettings), plus the
    replication settings, and the retry topic with the ingest topic's real partition count."""
    (job,) = _one(base, "Job", "trident-create-topics")["spec"]["template"]["spec"]["containers"]
    script = _kafka_script(base, job, *TOPICS, "TRIDENT_KAFKA__TOPIC_PARTITIONS")
    environment = {
        **_settings_data(base),
        **{variable["name"]: variable["value"] for variable in job["env"]},
    }
    kafka = deployed_settings.kafka
    topics = kafka.topics()
    assert (topics.retry, kafka.retry_topic) == ("trident.ingest.retry", "trident.ingest.retry")
    wanted = {
        topic: {**config, "min.insync.replicas": environment["MIN_INSYNC_REPLICAS"]}
        for topic, config in kafka.topic_configs().items()
    }
    assert wanted[topics.ingest]["cleanup.policy"] == "compact"
    for ingest_partitions in (kafka.topic_partitions, 24):  # new, or an older topic with more
        folder = tmp_path / str(ingest_partitions)
        folder.mkdir()
        calls = _run_with_stub_kafka_cli(
            script, environment, folder, ingest_partitions=ingest_partitions
        )
        created = _created(calls)
        assert created == {
            topics.ingest: (kafka.topic_partitions, wanted[topics.ingest]),
            topics.retry: (ingest_partitions, wanted[topics.retry]),
            topics.dead_letter: (kafka.topic_partitions, wanted[topics.dead_letter]),
        }
        for call in calls:
            assert call[:2] == ["--bootstrap-server", kafka.bootstrap_servers]
            if "--create" in call:
                assert call[call.index("--replication-factor") + 1] == "3"


def test_workers_wait_for_the_topics_the_job_creates(base: Objects) -> None:
    pod = _one(base, "Deployment", "trident-worker")["spec"]["template"]["spec"]
    (wait,) = pod["initContainers"]
    script = _kafka_script(base, wait, *TOPICS)
    assert "--describe" in script and "--create" not in script


def test_workers_write_the_collection_the_alias_job_points_searches_at(
    base: Objects, deployed_settings: Settings
) -> None:
    def overrides(container: dict[str, Any]) -> dict[str, Any]:
        return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}

    worker = overrides(_container(base, "trident-worker"))
    (job,) = _one(base, "Job", "trident-milvus-alias")["spec"]["template"]["spec"]["containers"]
    setup = overrides(job)
    collection = worker["TRIDENT_MILVUS__COLLECTION"]
    assert setup["TRIDENT_MILVUS__COLLECTION"] == collection
    config_map = _generated(base, "ConfigMap", "trident-settings")["metadata"]["name"]
    assert setup["SEARCH_ALIAS"] == {
        "configMapKeyRef": {"name": config_map, "key": "TRIDENT_MILVUS__COLLECTION"}
    }
    # The API (no override) searches the alias, which must differ from the collection.
    assert "env" not in _container(base, "trident-api")
    assert deployed_settings.milvus.collection != collection
    scripts = _generated(base, "ConfigMap", "trident-scripts")
    assert scripts["data"] == {"milvus_alias.py": (BASE / "milvus_alias.py").read_text()}
    assert job["command"] == ["python", "/opt/trident/milvus_alias.py"]


# --- Triton, the API, the plumbing between them ------------------------------------------------


def test_triton_runs_the_image_and_arguments_of_its_dockerfile(
    base: Objects, deployed_settings: Settings
) -> None:
    container = _container(base, "trident-triton")
    assert container["image"].split(":")[0] == "embedding-trident-triton"
    instructions = dockerfile_instructions(REPO / "docker" / "triton.Dockerfile")
    (cmd,) = [arguments for kind, arguments in instructions if kind == "CMD"]
    assert container["args"] == json.loads(cmd)
    assert deployed_settings.triton.model_name == UINT8_MODEL_SPEC.name
    ready = container["readinessProbe"]["httpGet"]
    assert ready["path"] == "/v2/health/ready"
    assert _port(container, ready["port"]) == 8000
    # The workers and the API reach Triton's gRPC port through its Service.
    assert deployed_settings.triton.protocol == "grpc"
    host, port = deployed_settings.triton.url.rsplit(":", 1)
    service = _one(base, "Service", host)
    (grpc,) = [p for p in service["spec"]["ports"] if p["port"] == int(port)]
    assert _port(container, grpc["targetPort"]) == 8001


def test_the_api_serves_on_its_port_behind_service_and_ingress(
    base: Objects, deployed_settings: Settings
) -> None:
    container = _container(base, "trident-api")
    assert container["command"] == ["trident-api", "--host", "0.0.0.0"]
    assert _port(container, "http") == deployed_settings.api.port
    assert container["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    ingress = _one(base, "Ingress", "trident-api")
    (rule,) = ingress["spec"]["rules"]
    backend = rule["http"]["paths"][0]["backend"]["service"]
    service = _one(base, "Service", backend["name"])
    assert backend["port"]["name"] in {p["name"] for p in service["spec"]["ports"]}


def test_app_containers_share_the_app_image(base: Objects) -> None:
    compose = yaml.safe_load((REPO / "compose.yaml").read_text())
    compose_image = compose["services"]["worker"]["image"].split(":")[0]
    images = {_container(base, d)["image"] for d in ("trident-worker", "trident-api")}
    assert len(images) == 1
    assert images.pop().split(":")[0] == compose_image


def test_services_budgets_and_scrape_annotations_point_at_real_pods(base: Objects) -> None:
    templates = dict(_pod_templates(base))

    def selected(selector: dict[str, str]) -> list[dict[str, Any]]:
        return [
            t
            for t in templates.values()
            if selector.items() <= t["metadata"].get("labels", {}).items()
        ]

    for service in (o for o in base if o["kind"] == "Service"):
        (pod,) = selected(service["spec"]["selector"])
        (container,) = pod["spec"]["containers"]
        for port in service["spec"]["ports"]:
            _port(container, port["targetPort"])
    for budget in (o for o in base if o["kind"] == "PodDisruptionBudget"):
        assert len(selected(budget["spec"]["selector"]["matchLabels"])) == 1
    scraped = 0
    for where, template in templates.items():
        annotations = template["metadata"].get("annotations", {})
        if annotations.get("prometheus.io/scrape") == "true":
            scraped += 1
            (container,) = template["spec"]["containers"]
            _port(container, int(annotations["prometheus.io/port"]))
            assert annotations["prometheus.io/path"] == "/metrics", where
    assert scraped == 3  # worker, API, Triton


def test_every_pod_is_bounded_and_unprivileged(rendered: dict[str, Objects]) -> None:
    for objects in rendered.values():
        for where, template in _pod_templates(objects):
            pod = template["spec"]
            assert pod["securityContext"]["runAsNonRoot"] is True, where
            for container in [*pod.get("initContainers", []), *pod["containers"]]:
                resources = container["resources"]
                assert {"cpu", "memory"} <= set(resources["requests"]), where
                assert "memory" in resources["limits"], where
                assert container["securityContext"]["allowPrivilegeEscalation"] is False, where


def test_long_running_pods_spread_over_nodes(base: Objects) -> None:
    for name in ("trident-worker", "trident-api", "trident-triton"):
        pod = _one(base, "Deployment", name)["spec"]["template"]
        (term,) = pod["spec"]["affinity"]["podAntiAffinity"][
            "preferredDuringSchedulingIgnoredDuringExecution"
        ]
        assert term["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
        selector = term["podAffinityTerm"]["labelSelector"]["matchLabels"]
        assert selector.items() <= pod["metadata"]["labels"].items(), name


def test_the_gpu_overlay_only_gives_triton_a_gpu(rendered: dict[str, Objects]) -> None:
    base, gpu = rendered["base"], rendered["overlays/gpu"]

    def key(o: dict[str, Any]) -> tuple[str, str]:
        return o["kind"], o["metadata"]["name"]

    changed = {key(o) for o in gpu} ^ {key(o) for o in base}
    assert changed == set()
    differing = [key(o) for o in gpu if o != next(b for b in base if key(b) == key(o))]
    assert differing == [("Deployment", "trident-triton")]
    assert "nvidia.com/gpu" not in _container(base, "trident-triton")["resources"]["limits"]
    assert _container(gpu, "trident-triton")["resources"]["limits"]["nvidia.com/gpu"] == 1


def _env_overrides(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


def test_the_reembed_overlay_adds_a_rebuild_worker_of_the_new_model_and_its_scaler(
    rendered: dict[str, Objects], settings_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    base, reembed = rendered["base"], rendered["overlays/reembed"]

    def key(o: dict[str, Any]) -> tuple[str, str]:
        return o["kind"], o["metadata"]["name"]

    # Everything of the base stays as it is; three objects are added.
    assert [o for o in reembed if key(o) in {key(b) for b in base}] == base
    added = {key(o) for o in reembed} - {key(o) for o in base}
    name = "trident-reembed-worker"
    assert added == {("Deployment", name), ("PodDisruptionBudget", name), ("ScaledObject", name)}
    rebuild, ingest = _container(reembed, name), _container(base, "trident-worker")
    assert rebuild["image"] == ingest["image"] and rebuild["command"] == ingest["command"]
    assert "replicas" not in _one(reembed, "Deployment", name)["spec"]  # KEDA's
    # Its settings as the pod loads them: the base's, then its own overrides.
    environment = {**settings_env, **read_env_file(BASE / "secrets.env.example")}
    served = assert_environment_arrives(
        monkeypatch, {**environment, **_env_overrides(rebuild)}, name
    )
    ingesting = assert_environment_arrives(
        monkeypatch, {**environment, **_env_overrides(ingest)}, "trident-worker"
    )
    alias = assert_environment_arrives(monkeypatch, environment, "base").milvus.collection
    assert served.model.name != ingesting.model.name  # what the API searches: the alias
    # The ingest workers fill version 1; the rebuild writes version 2 in its own group.
    old = ingesting.milvus.collection
    assert old == version_collection(alias, 1)
    assert served.worker.rebuild is not None
    assert served.worker.rebuild.sources == [alias, old]
    assert served.worker.rebuild.target == version_collection(alias, 2)
    assert served.kafka.group_id == rebuild_group(alias, 2) != ingesting.kafka.group_id
    assert (served.kafka.topic, served.milvus.uri) == (ingesting.kafka.topic, ingesting.milvus.uri)
    # KEDA watches that group's lag, on the same topic, within the partitions.
    scaled = _one(reembed, "ScaledObject", name)["spec"]
    assert scaled["scaleTargetRef"]["name"] == name
    (trigger,) = scaled["triggers"]
    metadata: dict[str, str] = trigger["metadata"]
    resolved = {**_settings_data(reembed), **_env_overrides(rebuild)}
    assert resolved[metadata["consumerGroupFromEnv"]] == served.kafka.group_id
    assert resolved[metadata["topicFromEnv"]] == served.kafka.topic
    assert {k.removesuffix("FromEnv") for k in metadata} <= KEDA_KAFKA_METADATA
    assert 1 <= scaled["minReplicaCount"] <= scaled["maxReplicaCount"]
    assert scaled["maxReplicaCount"] <= served.kafka.topic_partitions
    assert _port(rebuild, "health") == served.worker.health_port


def test_one_kafka_version_everywhere(base: Objects) -> None:
    compose = yaml.safe_load((REPO / "compose.yaml").read_text())
    (job,) = _one(base, "Job", "trident-create-topics")["spec"]["template"]["spec"]["containers"]
    (wait,) = _one(base, "Deployment", "trident-worker")["spec"]["template"]["spec"][
        "initContainers"
    ]
    version = StackConfig().kafka_version  # what the local and the test stacks run
    assert compose["services"]["kafka"]["image"] == f"apache/kafka:{version}"
    assert job["image"] == wait["image"] == f"apache/kafka:{version}"


def test_every_object_and_pod_says_what_it_is_part_of(base: Objects) -> None:
    part_of = {"app.kubernetes.io/part-of": "embedding-trident"}
    for o in base:
        assert part_of.items() <= o["metadata"]["labels"].items(), o["metadata"]["name"]
    for where, template in _pod_templates(base):
        assert part_of.items() <= template["metadata"]["labels"].items(), where
    # Selectors are immutable once applied: the common label stays out of them.
    for o in base:
        selector = o.get("spec", {}).get("selector", {})
        assert "app.kubernetes.io/part-of" not in selector.get("matchLabels", selector)
