"""compose.yaml and docker/: consistent with the settings, the model spec and the repository.

Static checks only (no Docker engine, no network); `docker compose config` runs where the
compose plugin exists and is skipped elsewhere.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel, TypeAdapter, ValidationError

from engine.model.spec import DEFAULT_MODEL_SPEC
from engine.settings import Settings, load_settings

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "compose.yaml"
GPU_OVERLAY = REPO / "docker" / "compose.gpu.yaml"
APP_DOCKERFILE = REPO / "docker" / "app.Dockerfile"
TRITON_DOCKERFILE = REPO / "docker" / "triton.Dockerfile"
DOCKERFILES = (APP_DOCKERFILE, TRITON_DOCKERFILE)
APP_SERVICES = ("worker", "api", "producer")
ENV_PREFIX = "TRIDENT_"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    loaded = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(loaded, dict)
    return loaded


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = compose["services"]
    return found


def _environment(service: dict[str, Any]) -> dict[str, str]:
    """A service's environment as a mapping, whichever of compose's two forms it uses."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {str(key): str(value) for key, value in env.items()}


def _trident_environment(services: dict[str, dict[str, Any]]) -> dict[str, str]:
    merged: dict[str, str] = {}
    for name, service in services.items():
        for key, value in _environment(service).items():
            if key.startswith(ENV_PREFIX):
                assert merged.get(key, value) == value, f"{key} differs between services ({name})"
                merged[key] = value
    return merged


def _field_annotation(variable: str) -> Any:
    """The annotation of the settings field ``TRIDENT_<SECTION>__<KEY>`` names.

    pydantic-settings ignores environment variables that match no field (``extra="forbid"``
    covers init values only), so a typo would silently fall back to the default: walk the
    model instead.
    """
    model: type[BaseModel] = Settings
    parts = variable.removeprefix(ENV_PREFIX).lower().split("__")
    for depth, part in enumerate(parts):
        field = model.model_fields.get(part)
        assert field is not None, f"{variable}: {part!r} is not a field of {model.__name__}"
        annotation = field.annotation
        if depth == len(parts) - 1:
            return annotation
        assert isinstance(annotation, type) and issubclass(annotation, BaseModel), (
            f"{variable}: {part!r} has no sub-fields"
        )
        model = annotation
    raise AssertionError(f"{variable}: empty name")


def _expected(annotation: Any, raw: str) -> Any:
    """``raw`` validated as the field's type; complex types arrive as JSON, as in the env."""
    adapter: TypeAdapter[Any] = TypeAdapter(annotation)
    try:
        return adapter.validate_python(raw)
    except ValidationError:
        return adapter.validate_python(json.loads(raw))


def _settings_value(settings: Settings, variable: str) -> Any:
    value: Any = settings
    for part in variable.removeprefix(ENV_PREFIX).lower().split("__"):
        value = getattr(value, part)
    return value


# --- compose.yaml ------------------------------------------------------------------------------


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
    for name in sorted(names):
        _field_annotation(name)


def test_the_name_check_catches_typos() -> None:
    for typo in (
        "TRIDENT_KAFKA__BOOTSTRAP_SERVRS",
        "TRIDENT_KAFAK__TOPIC",
        "TRIDENT_WORKER__HEALTHPORT",
    ):
        with pytest.raises(AssertionError):
            _field_annotation(typo)


def test_compose_environment_arrives_in_settings(
    services: dict[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    for service in APP_SERVICES:
        environment = _environment(services[service])
        for key, value in environment.items():
            if key.startswith(ENV_PREFIX):
                monkeypatch.setenv(key, value)
            else:
                monkeypatch.delenv(key, raising=False)
        settings = load_settings()  # the entry points' loader: the only reader of the environment
        for key, raw in environment.items():
            if key.startswith(ENV_PREFIX):
                expected = _expected(_field_annotation(key), raw)
                assert _settings_value(settings, key) == expected, f"{service}: {key}"
        for key in environment:
            monkeypatch.delenv(key, raising=False)


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


def _instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` with continuation lines joined and comments dropped."""
    lines: list[str] = []
    pending = ""
    for line in dockerfile.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        lines.append(pending + line)
        pending = ""
    assert not pending, f"{dockerfile.name} ends inside a continuation"
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1].strip()) for ln in lines]


def _copy_sources(dockerfile: Path) -> list[str]:
    sources: list[str] = []
    for instruction, arguments in _instructions(dockerfile):
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


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfiles_copy_every_package(dockerfile: Path) -> None:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    packages = {
        p.rstrip("*") for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    }
    copied = {s.rstrip("/") for s in _copy_sources(dockerfile)}
    assert packages <= copied, f"{dockerfile.name} misses {sorted(packages - copied)}"


def test_app_dockerfile() -> None:
    instructions = _instructions(APP_DOCKERFILE)
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
    instructions = _instructions(TRITON_DOCKERFILE)
    runs = " ".join(a for k, a in instructions if k == "RUN")
    assert "engine.model.triton_repository /models --backend onnxruntime" in runs
    assert re.search(r"nvcr\.io/nvidia/tritonserver:2[56]\.\d\d-py3", TRITON_DOCKERFILE.read_text())
    command = json.loads(next(a for k, a in instructions if k == "CMD"))
    assert command[0] == "tritonserver"
    assert {"--model-repository=/models", "--strict-readiness=true", "--exit-on-error=true"} <= set(
        command
    )


# --- docker compose itself, where it exists ----------------------------------------------------


def _compose_cli() -> list[str]:
    docker = shutil.which("docker")
    if docker is not None:
        plugin = subprocess.run([docker, "compose", "version"], capture_output=True, check=False)
        if plugin.returncode == 0:
            return [docker, "compose"]
    standalone = shutil.which("docker-compose")  # v1 (Python) lacks today's compose spec
    if standalone is not None:
        probe = subprocess.run([standalone, "version"], capture_output=True, text=True, check=False)
        if probe.returncode == 0 and re.search(r"version v?[2-9]\.", probe.stdout):
            return [standalone]
    pytest.skip("no docker compose v2+ CLI here")


@pytest.mark.parametrize("files", [(COMPOSE,), (COMPOSE, GPU_OVERLAY)], ids=["base", "gpu"])
def test_docker_compose_config_accepts_the_files(files: tuple[Path, ...]) -> None:
    command = [*_compose_cli(), *(a for f in files for a in ("-f", str(f)))]
    for profile in ((), ("--profile", "tools")):
        result = subprocess.run(
            [*command, *profile, "config", "-q"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        assert not result.stderr.strip(), result.stderr  # warnings too: unset variables, ...
