"""compose.yaml and docker/: valid, consistent with the settings, the model spec and the package.

No Docker engine runs on these machines, so nothing here builds or starts a container. What is
checked: compose.yaml (and the GPU overlay) against the Compose Specification's JSON schema
(vendored in tests/unit/schemas/), the TRIDENT_* variables against the settings model, the
Dockerfiles with hadolint and against the package layout, the two Triton configs the model spec
generates (parsed with Triton's own protobuf schema), and that the Milvus the deployment runs
and the pymilvus the package pins are of one minor version.
"""

from __future__ import annotations

import ast
import copy
import json
import re
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from engine.models import DEFAULT_MODEL_SPEC
from model_build.triton_repository import render_config
from tests.unit.deployment_support import (
    ENV_PREFIX,
    REPO,
    SCHEMAS,
    assert_environment_arrives,
    check_variable_names,
    dockerfile_instructions,
    executable,
    field_annotation,
)

COMPOSE = REPO / "compose.yaml"
GPU_OVERLAY = REPO / "docker" / "compose.gpu.yaml"
COMPOSE_FILES = (COMPOSE, GPU_OVERLAY)
APP_DOCKERFILE = REPO / "docker" / "app.Dockerfile"
TRITON_DOCKERFILE = REPO / "docker" / "triton.Dockerfile"
DOCKERFILES = (APP_DOCKERFILE, TRITON_DOCKERFILE)
APP_SERVICES = ("worker", "api", "producer")
LOCAL_STACK_PACKAGE = "devstack"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    loaded = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(loaded, dict)
    return loaded


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = compose["services"]
    return found


@pytest.fixture(scope="module")
def compose_validator() -> jsonschema.protocols.Validator:
    schema = json.loads((SCHEMAS / "compose-spec.json").read_text())
    # The schema names draft 7 (as "https://json-schema.org/draft-07/schema", which the
    # library's lookup does not resolve): say it outright rather than fall back to the newest.
    assert "draft-07" in schema["$schema"]
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


# Variables compose requires from the user's shell (``${NAME:?message}``), as a user sets them.
REQUIRED_VARIABLES = {"TRIDENT_API_KEYS": '["a-long-random-key"]'}
_INTERPOLATION = re.compile(r"\$\{(\w+)(?::([?-])([^}]*))?\}")


def _interpolate(value: str) -> str:
    """Compose's ``${NAME:-default}`` and ``${NAME:?message}``, as ``docker compose`` fills them."""

    def fill(match: re.Match[str]) -> str:
        name, kind, rest = match[1], match[2], match[3]
        if kind == "?":
            assert name in REQUIRED_VARIABLES, f"compose requires ${name}: add it to the test"
            return REQUIRED_VARIABLES[name]
        return rest if kind == "-" else ""

    return _INTERPOLATION.sub(fill, value)


def _environment(service: dict[str, Any]) -> dict[str, str]:
    """A service's environment as a mapping, whichever of compose's two forms it uses."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {str(key): _interpolate(str(value)) for key, value in env.items()}


def _trident_environment(services: dict[str, dict[str, Any]]) -> dict[str, str]:
    merged: dict[str, str] = {}
    for name, service in services.items():
        for key, value in _environment(service).items():
            if key.startswith(ENV_PREFIX):
                assert merged.get(key, value) == value, f"{key} differs between services ({name})"
                merged[key] = value
    return merged


def _schema_errors(validator: jsonschema.protocols.Validator, document: Any) -> list[str]:
    return [
        f"{'/'.join(map(str, error.absolute_path)) or '<root>'}: {error.message}"
        for error in validator.iter_errors(document)
    ]


# --- compose.yaml ------------------------------------------------------------------------------


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_compose_files_follow_the_compose_specification(
    path: Path, compose_validator: jsonschema.protocols.Validator
) -> None:
    # YAML anchors and merge keys (x-app, <<:) are resolved by the loader, as compose does.
    document = yaml.safe_load(path.read_text())
    assert _schema_errors(compose_validator, document) == []


def test_the_compose_schema_check_catches_mistakes(
    compose: dict[str, Any], compose_validator: jsonschema.protocols.Validator
) -> None:
    mistakes: dict[str, Any] = {
        "misspelt service key": ("worker", "enviroment", {"A": "1"}),
        "misspelt deploy key": ("worker", "deploy", {"replica": 2}),
        "grace period as a list": ("kafka", "stop_grace_period", ["40s"]),
        "healthcheck test as a number": ("api", "healthcheck", {"test": 1}),
    }
    for what, (service, key, value) in mistakes.items():
        broken = copy.deepcopy(compose)
        broken["services"][service][key] = value
        assert _schema_errors(compose_validator, broken), f"not caught: {what}"
    broken = copy.deepcopy(compose)
    broken["volume"] = broken.pop("volumes")  # a top-level typo
    assert _schema_errors(compose_validator, broken)


def test_the_vendored_compose_schema_is_the_specification() -> None:
    schema = json.loads((SCHEMAS / "compose-spec.json").read_text())
    assert schema["title"] == "Compose Specification"
    assert {"services", "volumes", "networks", "name", "include"} <= set(schema["properties"])
    # Extension fields (x-app) are allowed only through this pattern.
    assert "^x-" in schema["patternProperties"]
    assert schema["additionalProperties"] is False


def test_compose_has_the_expected_services(services: dict[str, dict[str, Any]]) -> None:
    assert set(services) >= {
        "kafka",
        "milvus-etcd",
        "milvus-minio",
        "milvus",
        "triton",
        *APP_SERVICES,
    }
    assert services["producer"].get("profiles") == ["tools"]
    assert services["worker"]["deploy"]["replicas"] == 2
    # The worker uses the image's HEALTHCHECK (/livez); every other long-running one has its own.
    for name, service in services.items():
        if name not in {"producer", "worker"}:
            assert service.get("healthcheck", {}).get("test"), f"{name} has no healthcheck"
    assert "healthcheck" not in services["worker"]


def test_trident_variable_names_are_settings_fields() -> None:
    names: set[str] = set()
    for path in (COMPOSE, *DOCKERFILES):
        names |= set(re.findall(r"\bTRIDENT_[A-Z0-9_]+__[A-Z0-9_]+\b", path.read_text()))
    assert "TRIDENT_KAFKA__BOOTSTRAP_SERVERS" in names
    check_variable_names(names)


def test_the_name_check_catches_typos() -> None:
    for typo in (
        "TRIDENT_KAFKA__BOOTSTRAP_SERVRS",
        "TRIDENT_KAFAK__TOPIC",
        "TRIDENT_WORKER__HEALTHPORT",
    ):
        with pytest.raises(AssertionError):
            field_annotation(typo)


def test_compose_environment_arrives_in_settings(
    services: dict[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    for service in APP_SERVICES:
        assert_environment_arrives(monkeypatch, _environment(services[service]), service)


def test_compose_runs_the_milvus_minor_that_pymilvus_is_pinned_to(
    services: dict[str, dict[str, Any]],
) -> None:
    # pymilvus follows the server's minor versions; the pin also works with the local 2.3.5
    # (the end-to-end tests run it), see docs/OPERATIONS.md "Versions".
    match = re.fullmatch(r"milvusdb/milvus:v(\d+)\.(\d+)\.\d+", services["milvus"]["image"])
    assert match, services["milvus"]["image"]
    server = (int(match[1]), int(match[2]))
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    (pin,) = [d for d in pyproject["project"]["dependencies"] if d.startswith("pymilvus")]
    lower = re.search(r">=(\d+)\.(\d+)", pin)
    upper = re.search(r"<(\d+)\.(\d+)", pin)
    assert lower and upper, pin
    assert (int(lower[1]), int(lower[2])) == server, f"{pin} vs Milvus {server}"
    assert (int(upper[1]), int(upper[2])) == (server[0], server[1] + 1), pin


def test_compose_stops_workers_within_their_grace_period(
    services: dict[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    worker = services["worker"]
    settings = assert_environment_arrives(monkeypatch, _environment(worker), "worker")
    match = re.fullmatch(r"(\d+)s", worker["stop_grace_period"])
    assert match, worker["stop_grace_period"]
    assert int(match[1]) >= settings.worker.shutdown_grace_s + 10


def test_app_services_point_at_the_compose_services(services: dict[str, dict[str, Any]]) -> None:
    env = _trident_environment(services)
    assert env["TRIDENT_KAFKA__BOOTSTRAP_SERVERS"] == "kafka:9092"
    assert env["TRIDENT_TRITON__URL"] == "triton:8001"
    assert env["TRIDENT_TRITON__PROTOCOL"] == "grpc"
    assert env["TRIDENT_MILVUS__URI"] == "http://milvus:19530"
    assert env["TRIDENT_WORKER__HEALTH_HOST"] == "0.0.0.0"
    roots = json.loads(env["TRIDENT_FETCH__ALLOWED_ROOTS"])
    for service in ("worker", "producer"):
        mounts = [str(v) for v in services[service]["volumes"]]
        for root in roots:
            assert any(m.endswith(f":{root}:ro") for m in mounts), f"{service}: {root} not ro"
    dependencies = services["worker"]["depends_on"]
    assert {name: dep["condition"] for name, dep in dependencies.items()} == {
        "kafka": "service_healthy",
        "milvus": "service_healthy",
        "triton": "service_healthy",
    }


def test_compose_topics_are_made_by_the_workers_compacted_never_by_a_first_write(
    services: dict[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A producer publishing before any worker ran would otherwise auto-create an uncompacted
    # ingest topic (and no retry topic).
    assert _environment(services["kafka"])["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false"
    settings = assert_environment_arrives(monkeypatch, _environment(services["worker"]), "worker")
    topics = settings.kafka.topics()
    assert topics.all == ("trident.ingest", "trident.ingest.retry", "trident.ingest.dlq")
    configs = settings.kafka.topic_configs()
    assert configs[topics.ingest]["cleanup.policy"] == "compact"
    assert configs[topics.retry]["cleanup.policy"] == "delete"


def test_app_services_share_the_app_image(services: dict[str, dict[str, Any]]) -> None:
    images = set()
    for name in APP_SERVICES:
        build = services[name]["build"]
        assert (REPO / build["context"]).resolve() == REPO, name
        assert (REPO / build["context"] / build["dockerfile"]).resolve() == APP_DOCKERFILE
        images.add(services[name]["image"])
    assert len(images) == 1
    assert services["worker"]["command"] == ["trident-worker"]
    assert services["api"]["command"][:3] == ["trident-api", "--host", "0.0.0.0"]
    assert services["producer"]["command"][0] == "trident-produce"
    triton = services["triton"]["build"]
    assert (REPO / triton["context"] / triton["dockerfile"]).resolve() == TRITON_DOCKERFILE


def test_triton_model_name_matches_the_spec(services: dict[str, dict[str, Any]]) -> None:
    name = DEFAULT_MODEL_SPEC.name
    env = _trident_environment(services)
    assert env.get("TRIDENT_TRITON__MODEL_NAME", name) == name
    for model in re.findall(r"/v2/models/([^/\s\"']+)", COMPOSE.read_text()):
        assert model == name
    assert f"/v2/models/{name}/ready" in str(services["triton"]["healthcheck"]["test"])


def test_published_ports_are_loopback_only(services: dict[str, dict[str, Any]]) -> None:
    published = 0
    for name, service in services.items():
        for port in service.get("ports", []):
            published += 1
            if isinstance(port, dict):
                assert port.get("host_ip") == "127.0.0.1", f"{name}: {port}"
            else:
                assert str(port).startswith("127.0.0.1:"), f"{name}: {port}"
    assert published > 0
    assert "ports" not in services["worker"]  # replicas cannot share a host port


def test_overlay_only_adds_a_gpu_to_triton() -> None:
    overlay = yaml.safe_load(GPU_OVERLAY.read_text())
    assert set(overlay["services"]) == {"triton"}
    devices = overlay["services"]["triton"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]


# --- Dockerfiles -------------------------------------------------------------------------------


def _copy_sources(dockerfile: Path) -> list[str]:
    sources: list[str] = []
    for instruction, arguments in dockerfile_instructions(dockerfile):
        if instruction == "COPY" and "--from=" not in arguments:
            words = [w for w in arguments.split() if not w.startswith("--")]
            sources += words[:-1]
    return sources


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_copy_sources_exist_and_are_not_ignored(dockerfile: Path) -> None:
    ignored = {
        line.strip()
        for line in Path(f"{dockerfile}.dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    sources = _copy_sources(dockerfile)
    assert "pyproject.toml" in sources
    for source in sources:
        if any(c in source for c in "*?["):
            continue  # an optional file (BuildKit allows a wildcard that matches nothing)
        assert (REPO / source).exists(), f"{dockerfile.name}: COPY {source} does not exist"
        assert source.rstrip("/") not in ignored, f"{dockerfile.name}: {source} is ignored"


def _runtime_packages() -> set[str]:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    packages = {
        p.rstrip("*") for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    }
    assert LOCAL_STACK_PACKAGE in packages  # the source checkout's trident-stack needs it
    return packages - {LOCAL_STACK_PACKAGE}


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_images_hold_every_runtime_package_and_not_the_local_stack(dockerfile: Path) -> None:
    copied = {s.rstrip("/") for s in _copy_sources(dockerfile)}
    missing = _runtime_packages() - copied
    assert not missing, f"{dockerfile.name} misses {sorted(missing)}"
    assert LOCAL_STACK_PACKAGE not in copied
    ignored = Path(f"{dockerfile}.dockerignore").read_text().splitlines()
    assert LOCAL_STACK_PACKAGE in ignored  # nor can a later `COPY . .` bring it in


def test_runtime_packages_never_import_the_local_stack() -> None:
    importers = []
    for package in sorted(_runtime_packages()):
        for path in sorted((REPO / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                if any(n.split(".")[0] == LOCAL_STACK_PACKAGE for n in names):
                    importers.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert importers == []


def test_the_app_image_drops_the_local_stack_command() -> None:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    scripts = pyproject["project"]["scripts"]
    stack_scripts = [n for n, target in scripts.items() if target.startswith(LOCAL_STACK_PACKAGE)]
    assert stack_scripts == ["trident-stack"]
    runs = " ".join(a for k, a in dockerfile_instructions(APP_DOCKERFILE) if k == "RUN")
    assert "rm /opt/venv/bin/trident-stack" in runs


def test_app_dockerfile() -> None:
    instructions = dockerfile_instructions(APP_DOCKERFILE)
    runtime = instructions[max(i for i, (k, _) in enumerate(instructions) if k == "FROM") :]
    kinds = [kind for kind, _ in runtime]
    assert "ENTRYPOINT" not in kinds
    assert ("CMD", '["trident-worker"]') in runtime
    user = next(arguments for kind, arguments in runtime if kind == "USER")
    assert user not in {"root", "0"}
    healthcheck = next(arguments for kind, arguments in runtime if kind == "HEALTHCHECK")
    assert "/livez" in healthcheck and "9400" in healthcheck
    installs = [a for k, a in instructions if k == "RUN" and "pip install" in a]
    assert installs and not any("[dev]" in a or " -e " in a for a in installs)
    text = APP_DOCKERFILE.read_text()
    assert re.search(r"python:3\.11[.\d]*-slim", text)


def test_triton_dockerfile_builds_the_onnxruntime_repository() -> None:
    instructions = dockerfile_instructions(TRITON_DOCKERFILE)
    runs = " ".join(a for k, a in instructions if k == "RUN")
    assert "model_build.triton_repository /models --backend onnxruntime" in runs
    assert re.search(r"nvcr\.io/nvidia/tritonserver:2[56]\.\d\d-py3", TRITON_DOCKERFILE.read_text())
    command = json.loads(next(a for k, a in instructions if k == "CMD"))
    assert command[0] == "tritonserver"
    assert {"--model-repository=/models", "--strict-readiness=true", "--exit-on-error=true"} <= set(
        command
    )


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_finds_nothing(dockerfile: Path) -> None:
    result = subprocess.run(
        [str(executable("hadolint")), "--no-color", str(dockerfile)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == ""


def test_hadolint_catches_what_it_should(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get update && apt-get install -y curl\n")
    result = subprocess.run(
        [str(executable("hadolint")), "--no-color", "--format", "json", str(bad)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode != 0
    codes = {finding["code"] for finding in json.loads(result.stdout)}
    # :latest tag, unpinned apt package, no --no-install-recommends, apt lists left behind.
    assert {"DL3007", "DL3008", "DL3015", "DL3009"} <= codes


# --- the Triton model configs ------------------------------------------------------------------


def _parsed_config(backend: str) -> Any:
    config = model_config_pb2.ModelConfig()  # type: ignore[attr-defined]
    text_format.Parse(render_config(DEFAULT_MODEL_SPEC, backend), config)  # type: ignore[arg-type]
    return config


def test_both_triton_configs_parse_as_triton_model_configs() -> None:
    spec = DEFAULT_MODEL_SPEC
    for backend in ("python", "onnxruntime"):
        config = _parsed_config(backend)
        assert config.name == spec.name
        assert config.max_batch_size == spec.max_batch_size
        assert [(t.name, list(t.dims)) for t in config.input] == [
            (spec.input_name, list(spec.input_dims))
        ]
        assert [(t.name, list(t.dims)) for t in config.output] == [
            (spec.output_name, [spec.output_dim])
        ]
        batching = config.dynamic_batching
        assert list(batching.preferred_batch_size) == list(spec.preferred_batch_sizes)
        assert batching.max_queue_delay_microseconds == spec.max_queue_delay_microseconds


def test_the_triton_configs_differ_only_in_the_runtime() -> None:
    python, onnxruntime = _parsed_config("python"), _parsed_config("onnxruntime")
    assert (python.backend, python.platform) == ("python", "")
    assert (onnxruntime.backend, onnxruntime.platform) == ("", "onnxruntime_onnx")
    kinds = model_config_pb2.ModelInstanceGroup.Kind  # type: ignore[attr-defined]
    assert [g.kind for g in python.instance_group] == [kinds.Value("KIND_CPU")]
    assert [g.kind for g in onnxruntime.instance_group] == [
        kinds.Value(DEFAULT_MODEL_SPEC.onnxruntime_instance_kind)
    ]
    # Spinning is set by the python backend's model.py only: Triton's onnxruntime backend has
    # no model parameter for it.
    assert "session.intra_op.allow_spinning" not in onnxruntime.parameters
    del python.parameters["session.intra_op.allow_spinning"]
    for config in (python, onnxruntime):
        config.ClearField("backend")
        config.ClearField("platform")
        for group in config.instance_group:
            group.ClearField("kind")
    assert text_format.MessageToString(python) == text_format.MessageToString(onnxruntime)
