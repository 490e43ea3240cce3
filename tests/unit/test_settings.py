"""Settings: YAML, then environment, typed and validated."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.errors import ConfigurationError
from engine.models import DEFAULT_MODEL_SPEC, PREPROCESS_BATCH_SIZES
from engine.settings import PreprocessSettings, Settings, load_settings, merged_sections


def test_yaml_then_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "trident.yaml"
    config.write_text("kafka:\n  topic: from-yaml\n  group_id: g-yaml\nbatch:\n  max_size: 8\n")
    monkeypatch.setenv("TRIDENT_KAFKA__GROUP_ID", "g-env")
    settings = load_settings(config)
    assert settings.kafka.topic == "from-yaml"
    assert settings.kafka.group_id == "g-env"
    assert settings.batch.max_size == 8
    assert settings.api.port == 8080


def test_invalid_values_and_files_fail_clearly(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("batch:\n  max_size: 0\n")
    with pytest.raises(ConfigurationError, match="max_size"):
        load_settings(bad)
    with pytest.raises(ConfigurationError, match="cannot read"):
        load_settings(tmp_path / "missing.yaml")
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("kafak: {}\n")
    with pytest.raises(ConfigurationError, match="kafak"):
        load_settings(unknown)


def test_settings_built_in_code_ignore_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRIDENT_MILVUS__COLLECTION", "prod_images")
    assert Settings(milvus={"collection": "test_x"}).milvus.collection == "test_x"
    assert Settings().milvus.collection == "images"
    assert load_settings().milvus.collection == "prod_images"  # only the loader reads it


def test_environment_overrides_one_key_of_a_yaml_section(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "trident.yaml"
    config.write_text("fetch:\n  max_bytes: 1000\n  allowed_roots: [/a]\n")
    monkeypatch.setenv("TRIDENT_FETCH__ALLOWED_ROOTS", '["/b", "/c"]')
    settings = load_settings(config)
    assert settings.fetch.max_bytes == 1000
    assert [str(p) for p in settings.fetch.allowed_roots] == ["/b", "/c"]


@pytest.mark.parametrize(
    "section",
    ["kafka", "triton", "milvus", "fetch", "preprocess", "batch", "retry", "worker", "api"],
)
def test_an_unknown_key_in_any_section_is_an_error_naming_it(tmp_path: Path, section: str) -> None:
    config = tmp_path / "typo.yaml"
    config.write_text(f"{section}:\n  no_such_key: 1\n")
    with pytest.raises(ConfigurationError) as raised:
        load_settings(config)
    # One line an operator can act on, not pydantic's multi-line report.
    assert str(raised.value) == f"invalid settings: {section}.no_such_key: unknown key"
    with pytest.raises(ValueError, match="no_such_key"):
        Settings(**{section: {"no_such_key": 1}})


def test_an_unknown_key_from_the_environment_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRIDENT_KAFKA__BOOTSTRAP_SERVRES", "typo:9092")
    with pytest.raises(ConfigurationError, match="bootstrap_servres"):
        load_settings()


def test_merged_sections_replace_one_key_and_leave_their_inputs_alone() -> None:
    base = {"fetch": {"max_bytes": 1, "allowed_roots": ["/a"]}, "batch": {"max_size": 8}}
    override = {"fetch": {"allowed_roots": ["/b"]}, "batch": None, "api": {"port": 1}}
    assert merged_sections(base, override) == {
        "fetch": {"max_bytes": 1, "allowed_roots": ["/b"]},
        "batch": None,
        "api": {"port": 1},
    }
    assert base == {"fetch": {"max_bytes": 1, "allowed_roots": ["/a"]}, "batch": {"max_size": 8}}


def test_the_preprocessing_defaults_are_the_models_description() -> None:
    defaults = PreprocessSettings()
    assert defaults.batch_sizes == PREPROCESS_BATCH_SIZES
    assert defaults.image_size == DEFAULT_MODEL_SPEC.image_size == 224
    assert defaults.resize_short_side == DEFAULT_MODEL_SPEC.resize_short_side_for(224) == 256
    assert (defaults.mean, defaults.std) == (
        DEFAULT_MODEL_SPEC.input_mean,
        DEFAULT_MODEL_SPEC.input_std,
    )
