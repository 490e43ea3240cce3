"""Which models the local stack's Triton repository holds (issue 23.2): Lite0's two always, other
built-in models when asked, the choice remembered per stack root, models no longer asked for
removed (a user's model left alone); the repository writer and its command line for any spec."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest

from devstack.cli import main as stack_main
from devstack.config import StackConfig
from devstack.stack import LocalStack
from engine.errors import UnknownModelError
from engine.models import (
    DEFAULT_MODEL_SPEC,
    LITE1_MODEL_SPEC,
    LITE2_MODEL_SPEC,
    MODEL_SPEC_FILE,
    UINT8_MODEL_SPEC,
)
from model_build.triton_repository import main as repository_main

LITE0 = {UINT8_MODEL_SPEC.name, DEFAULT_MODEL_SPEC.name}


def _served(repository: Path) -> set[str]:
    return {p.parent.name for p in repository.glob("*/config.pbtxt")}


def _mtimes(repository: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in repository.rglob("*") if p.is_file()}


def test_the_default_stack_serves_lite0_alone(tmp_path: Path) -> None:
    stack = LocalStack(StackConfig(root=tmp_path))
    assert stack.extra_models == []
    assert _served(stack.build_model_repository()) == LITE0


def test_models_asked_for_are_served_remembered_and_dropped_when_no_longer_asked(
    tmp_path: Path,
) -> None:
    config = StackConfig(root=tmp_path)
    repository = LocalStack(config, models=[LITE1_MODEL_SPEC.name]).build_model_repository()
    assert _served(repository) == LITE0 | {LITE1_MODEL_SPEC.name}
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
    assert _served(repository) == LITE0 | {LITE2_MODEL_SPEC.name}
    LocalStack(config, models=[]).build_model_repository()
    assert _served(repository) == LITE0
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
