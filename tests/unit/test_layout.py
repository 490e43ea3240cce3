"""The packages' rooms: who may import whom (README, "Layout").

- ``engine`` is the runtime engine: it imports none of the roles, the earlier pipeline's API
  (``jax_embedding``) or the model build tooling (``model_build``);
- the roles (``worker``, ``query_api``, ``producer``) never import ``jax_embedding``, and never
  ``model_build`` (build time only), neither in their source nor when they run;
- ``jax_embedding`` depends on the engine, never the reverse.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import engine
import jax_embedding

REPO = Path(__file__).resolve().parents[2]
ROLES = ("worker", "query_api", "producer")
FORBIDDEN = {
    "engine": {"jax_embedding", "model_build", "worker", "query_api", "producer", "devstack"},
    "schemas": {"engine", "jax_embedding", "model_build", "worker", "query_api", "producer"},
    **{role: {"jax_embedding", "model_build", "devstack"} for role in ROLES},
}


def _imported_packages(path: Path) -> list[tuple[str, int]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name.split(".")[0], node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.module.split(".")[0], node.lineno))
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_a_package_imports_only_what_its_room_allows(package: str) -> None:
    offenders = [
        f"{path.relative_to(REPO)}:{line} imports {name}"
        for path in sorted((REPO / package).rglob("*.py"))
        for name, line in _imported_packages(path)
        if name in FORBIDDEN[package]
    ]
    assert offenders == []


def test_the_running_roles_load_neither_the_earlier_api_nor_the_model_tooling() -> None:
    # What the entry points really load, lazy imports included once they are built.
    probe = (
        "import sys\n"
        "import worker.cli, worker.runner, query_api.cli, query_api.app, producer.cli\n"
        "import producer.dlq_cli\n"
        "from query_api.app import create_app\n"
        "loaded = sorted({m.split('.')[0] for m in sys.modules} & "
        "{'jax_embedding', 'model_build', 'onnx', 'devstack'})\n"
        "print(','.join(loaded))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ""


@pytest.mark.parametrize("package", [engine, jax_embedding], ids=lambda m: m.__name__)
def test_every_exported_name_resolves(package: object) -> None:
    names = package.__all__  # type: ignore[attr-defined]
    assert names
    for name in names:
        assert getattr(package, name) is not None, name
