"""Which models the local stack's Triton repository holds (issue 23.2): Lite0's two always, other
built-in models when asked, the choice remembered per stack root, models no longer asked for
removed (a user's model left alone); the repository writer and its command line for any spec."""

from __future__ import annotations

import json
import os
from pathlib import Path

import onnx
import pytest

from devstack.cli import main as stack_main
from devstack.config import StackConfig
from devstack.errors import StackError
from devstack.stack import LocalStack
from engine.errors import UnknownModelError
from engine.models import (
    DEFAULT_MODEL_SPEC,
    LITE0_REGION_MODEL_SPEC,
    LITE1_MODEL_SPEC,
    LITE2_MODEL_SPEC,
    MODEL_SPEC_FILE,
    UINT8_MODEL_SPEC,
)
from engine.priorities import INGEST_PRIORITY, PRIORITY_LEVELS, QUERY_INSTANCES
from model_build.triton_repository import Backend, render_config
from model_build.triton_repository import main as repository_main

LITE0 = {UINT8_MODEL_SPEC.name, DEFAULT_MODEL_SPEC.name}
# What the stack's Triton serves with Lite0: its region model too (issue 24).
STACK = LITE0 | {LITE0_REGION_MODEL_SPEC.name}


def _served(repository: Path) -> set[str]:
    return {p.parent.name for p in repository.glob("*/config.pbtxt")}


def _mtimes(repository: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in repository.rglob("*") if p.is_file()}


def test_the_default_stack_serves_lite0_and_its_region_model(tmp_path: Path) -> None:
    stack = LocalStack(StackConfig(root=tmp_path))
    assert stack.extra_models == []
    assert _served(stack.build_model_repository()) == STACK


def test_models_asked_for_are_served_remembered_and_dropped_when_no_longer_asked(
    tmp_path: Path,
) -> None:
    config = StackConfig(root=tmp_path)
    repository = LocalStack(config, models=[LITE1_MODEL_SPEC.name]).build_model_repository()
    assert _served(repository) == STACK | {LITE1_MODEL_SPEC.name}
    model = onnx.load(str(repository / LITE1_MODEL_SPEC.name / "1" / "model.onnx"))
    input_dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim[1:]]
    assert input_dims == list(LITE1_MODEL_SPEC.input_dims)  # 240 px, from the spec
    props = {p.key: p.value for p in model.metadata_props}
    assert props["model_version_tag"] == LITE1_MODEL_SPEC.model_version_tag
    assert props["weights"] == Path(LITE1_MODEL_SPEC.weights_file or "").name

    # A later start without a choice (make up, the tests' fixture) keeps it, writing nothing.
    before = _mtimes(repository)
    again = LocalStack(config)
    assert again.extra_models == [LITE1_MODEL_SPEC.name]
    again.build_model_repository()
    assert _mtimes(repository) == before

    # A user's model (trident-models add) is not the stack's to remove.
    user = repository / "my_clip"
    user.mkdir()
    (user / MODEL_SPEC_FILE).write_text("name: my_clip\n")
    LocalStack(config, models=[LITE2_MODEL_SPEC.name]).build_model_repository()
    assert _served(repository) == STACK | {LITE2_MODEL_SPEC.name}
    LocalStack(config, models=[]).build_model_repository()
    assert _served(repository) == STACK
    assert (user / MODEL_SPEC_FILE).is_file()
    assert LocalStack(config).extra_models == []


def test_an_unknown_model_is_refused_before_anything_starts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(UnknownModelError, match=LITE2_MODEL_SPEC.name):
        LocalStack(StackConfig(root=tmp_path), models=["efficientnet_lite9"])
    with pytest.raises(SystemExit) as exited:
        stack_main(["up", "--root", str(tmp_path), "--models", "lite9,"])
    assert exited.value.code == 2
    assert "unknown model 'lite9'" in capsys.readouterr().err
    assert not (tmp_path / "triton" / "extra_models.json").exists()


def test_repository_command_writes_the_models_asked_for(tmp_path: Path) -> None:
    root = tmp_path / "repo"
    assert repository_main([str(root), "--models", f" {LITE2_MODEL_SPEC.name} ,"]) == 0
    assert _served(root) == LITE0 | {LITE2_MODEL_SPEC.name}
    config = (root / LITE2_MODEL_SPEC.name / "config.pbtxt").read_text()
    dims = ", ".join(map(str, LITE2_MODEL_SPEC.input_dims))
    assert f"dims: [ {dims} ]" in config and "TYPE_UINT8" in config
    with pytest.raises(SystemExit):
        repository_main([str(root), "--models", "nope"])


# ------------------------------------------------ models loaded into a running Triton (no restart)


def _pretend_running(stack: LocalStack) -> None:
    """The stack's Triton pid file names a live process (this one): "running" to the stack."""
    stack.triton.process.pid_file.write_text(str(os.getpid()))


def test_triton_starts_in_explicit_mode_loading_the_repository_models(tmp_path: Path) -> None:
    stack = LocalStack(StackConfig(root=tmp_path), models=[LITE1_MODEL_SPEC.name])
    stack.build_model_repository()
    record = stack.triton._expected_record()
    argv = record["argv"]
    assert "--model-control-mode=explicit" in argv
    loads = {arg.removeprefix("--load-model=") for arg in argv if arg.startswith("--load-model=")}
    assert loads == STACK | {LITE1_MODEL_SPEC.name}
    assert record["files"] == stack.triton.repository_fingerprint()


def test_serving_more_models_needs_a_running_triton_that_can_load_them(tmp_path: Path) -> None:
    config = StackConfig(root=tmp_path)
    stack = LocalStack(config)
    stack.build_model_repository()
    with pytest.raises(StackError, match="not running"):
        stack.serve_models([LITE2_MODEL_SPEC.name])
    _pretend_running(stack)
    # A server started before explicit model control (its record: a bare fingerprint).
    stack.triton.loaded_marker.write_text(json.dumps(stack.triton.repository_fingerprint()))
    with pytest.raises(StackError, match="trident-stack up"):
        stack.serve_models([LITE2_MODEL_SPEC.name])
    # Refused before anything is written or remembered.
    assert _served(stack.model_repository) == STACK
    assert LocalStack(config).extra_models == []


def test_serving_an_unknown_model_names_the_registry(tmp_path: Path) -> None:
    stack = LocalStack(StackConfig(root=tmp_path))
    with pytest.raises(StackError, match=f"unknown model 'lite9'.*{LITE2_MODEL_SPEC.name}"):
        stack.serve_models(["lite9"])


def test_a_model_that_fails_to_load_is_forgotten_and_removed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = StackConfig(root=tmp_path)
    stack = LocalStack(config, models=[LITE1_MODEL_SPEC.name])
    stack.build_model_repository()
    _pretend_running(stack)
    stack.triton._write_record(stack.triton._expected_record())

    def refuse(names: list[str], deadline: float) -> list[str]:
        raise StackError(f"triton: could not load {names[0]!r}: out of memory")

    monkeypatch.setattr(stack.triton, "_load", refuse)
    with pytest.raises(StackError, match="out of memory"):
        stack.serve_models([LITE2_MODEL_SPEC.name])
    assert _served(stack.model_repository) == STACK | {LITE1_MODEL_SPEC.name}
    assert LocalStack(config).extra_models == [LITE1_MODEL_SPEC.name]


def test_a_loaded_model_is_remembered_and_recorded_as_served(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = StackConfig(root=tmp_path)
    stack = LocalStack(config)
    stack.build_model_repository()
    _pretend_running(stack)
    stack.triton._write_record(stack.triton._expected_record())
    asked: list[list[str]] = []

    def load(names: list[str], deadline: float) -> list[str]:
        asked.append(names)
        return names

    monkeypatch.setattr(stack.triton, "_load", load)
    assert stack.serve_models([LITE2_MODEL_SPEC.name]) == [LITE2_MODEL_SPEC.name]
    assert asked == [[LITE2_MODEL_SPEC.name]]
    assert LocalStack(config).extra_models == [LITE2_MODEL_SPEC.name]
    # What a start would run is what runs: the next `up` keeps this server.
    assert stack.triton._loaded_record() == LocalStack(config).triton._expected_record()


def test_models_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = str(tmp_path)
    for argv in (["models"], ["models", "add"], ["models", "drop", "x"], ["up", "x"]):
        with pytest.raises(SystemExit) as exited:
            stack_main([*argv, "--root", root])
        assert exited.value.code == 2, argv
    with pytest.raises(SystemExit) as exited:
        stack_main(["models", "add", "lite9", "--root", root])
    assert exited.value.code == 2
    assert "unknown model 'lite9'" in capsys.readouterr().err
    assert stack_main(["models", "add", LITE2_MODEL_SPEC.name, "--root", root]) == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: triton: not running; start the stack first (trident-stack up)"
    ]
    assert stack_main(["models", "list", "--root", root]) == 0
    listed = dict(line.split(None, 1) for line in capsys.readouterr().out.strip().splitlines())
    assert listed[LITE2_MODEL_SPEC.name] == "not in the repository"


@pytest.mark.parametrize("backend", ["python", "onnxruntime"])
def test_configs_keep_an_instance_for_searches_and_let_them_go_first(backend: Backend) -> None:
    config = render_config(UINT8_MODEL_SPEC, backend)
    count = UINT8_MODEL_SPEC.instance_count + QUERY_INSTANCES
    assert f"instance_group [ {{ count: {count}, kind:" in config
    assert f"  priority_levels: {PRIORITY_LEVELS}\n" in config
    assert f"  default_priority_level: {INGEST_PRIORITY}\n" in config


def test_a_process_serving_models_keeps_those_another_process_added_since(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two processes of one root (the suite's pytest workers; two `models add`): the one whose
    memory of the choice is older must not take the other's model out of the repository
    (what Triton's repository index, and so "is it served?", reads). Failed in CI once."""
    config = StackConfig(root=tmp_path)
    first, second = LocalStack(config), LocalStack(config)
    first.build_model_repository()
    _pretend_running(first)
    first.triton._write_record(first.triton._expected_record())
    for stack in (first, second):
        monkeypatch.setattr(stack.triton, "_load", lambda names, deadline: list(names))
    first.serve_models([LITE1_MODEL_SPEC.name])
    second.serve_models([LITE2_MODEL_SPEC.name])
    first.serve_models([LITE1_MODEL_SPEC.name])  # served already: a rewrite of the repository
    both = {LITE1_MODEL_SPEC.name, LITE2_MODEL_SPEC.name}
    assert _served(first.model_repository) == STACK | both
    assert set(LocalStack(config).extra_models) == both
