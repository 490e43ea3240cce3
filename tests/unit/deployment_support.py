"""Helpers shared by the deployment-file tests: settings variables, vendored schemas, tools.

The deployment files (compose.yaml, docker/, deploy/) configure the apps only through
``TRIDENT_<SECTION>__<KEY>`` environment variables; these helpers check such a name against the
settings model and load values the way the entry points do.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, TypeAdapter, ValidationError

from engine.settings import Settings, load_settings

REPO = Path(__file__).resolve().parents[2]
SCHEMAS = Path(__file__).resolve().parent / "schemas"
ENV_PREFIX = "TRIDENT_"


# The pinned kustomize, built from its Go module once per machine (a ~30 MB binary, ~2 minutes).
KUSTOMIZE_MODULE = "sigs.k8s.io/kustomize/kustomize/v5"
KUSTOMIZE_VERSION = "v5.7.1"


def field_annotation(variable: str) -> Any:
    """The annotation of the settings field ``TRIDENT_<SECTION>__<KEY>`` names.

    pydantic-settings ignores environment variables that match no field, so a typo would
    silently fall back to the default: walk the model instead.

    Raises:
        AssertionError: no such field.
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


def check_variable_names(names: set[str]) -> None:
    """Every name is a settings field.

    Raises:
        AssertionError: a name that is neither.
    """
    for name in sorted(names):
        field_annotation(name)


def expected_value(variable: str, raw: str) -> Any:
    """``raw`` validated as the field's type; complex types arrive as JSON, as in the env."""
    adapter: TypeAdapter[Any] = TypeAdapter(field_annotation(variable))
    try:
        return adapter.validate_python(raw)
    except ValidationError:
        return adapter.validate_python(json.loads(raw))


def settings_value(settings: Settings, variable: str) -> Any:
    value: Any = settings
    for part in variable.removeprefix(ENV_PREFIX).lower().split("__"):
        value = getattr(value, part)
    return value


@contextmanager
def only_these_trident_variables(
    monkeypatch: pytest.MonkeyPatch, environment: Mapping[str, str]
) -> Iterator[None]:
    """The process environment holds exactly ``environment``'s TRIDENT_ variables inside."""
    with monkeypatch.context() as patch:
        for key in [k for k in os.environ if k.startswith(ENV_PREFIX)]:
            patch.delenv(key)
        for key, value in environment.items():
            if key.startswith(ENV_PREFIX):
                patch.setenv(key, value)
        yield


def assert_environment_arrives(
    monkeypatch: pytest.MonkeyPatch, environment: Mapping[str, str], where: str
) -> Settings:
    """Load settings as an entry point does from ``environment``; each value must arrive.

    Raises:
        AssertionError: a variable that is no field, or whose value does not arrive as given.
    """
    variables = {k: v for k, v in environment.items() if k.startswith(ENV_PREFIX)}
    with only_these_trident_variables(monkeypatch, variables):
        settings = load_settings()
    for key, raw in variables.items():
        assert settings_value(settings, key) == expected_value(key, raw), f"{where}: {key}"
    return settings


def read_env_file(path: Path) -> dict[str, str]:
    """``KEY=VALUE`` lines as kustomize's ``envs:`` reads them (``#`` comments, no quoting)."""
    values: dict[str, str] = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        key, separator, value = line.partition("=")
        assert separator and key == key.strip(), f"{path.name}:{number}: not KEY=VALUE"
        assert key not in values, f"{path.name}:{number}: {key} given twice"
        values[key] = value
    return values


def dockerfile_instructions(dockerfile: Path) -> list[tuple[str, str]]:
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


def kustomize() -> Path:
    """The pinned kustomize binary, built with the Go toolchain on first use and cached.

    Raises:
        pytest.fail.Exception: no Go toolchain, or the build failed (with its output).
    """
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "embedding-trident"
    binary = cache / f"kustomize-{KUSTOMIZE_VERSION}"
    if binary.is_file():
        return binary
    go = shutil.which("go")
    if go is None:
        pytest.fail(
            f"kustomize {KUSTOMIZE_VERSION} is built from its Go module and needs the Go "
            "toolchain (go 1.22 or newer on PATH); none found"
        )
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as gobin:
        build = subprocess.run(
            [go, "install", f"{KUSTOMIZE_MODULE}@{KUSTOMIZE_VERSION}"],
            env={**os.environ, "GOBIN": gobin, "GOFLAGS": "-mod=mod"},
            capture_output=True,
            text=True,
            timeout=900,
            check=False,
        )
        if build.returncode != 0:
            pytest.fail(f"go install {KUSTOMIZE_MODULE}@{KUSTOMIZE_VERSION}:\n{build.stderr}")
        # Rename into place: a concurrent run sees either no binary or a whole one.
        os.replace(Path(gobin) / "kustomize", binary)
    return binary


def executable(name: str) -> Path:
    """A console script of this venv (a dev-extra tool), or fail saying how to get it.

    Raises:
        pytest.fail.Exception: not installed.
    """
    path = Path(sys.executable).parent / name
    if not path.is_file():
        pytest.fail(f"{name} is missing from {path.parent}: run `make install` (dev extra)")
    return path
