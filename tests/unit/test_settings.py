"""Settings: YAML, then environment, typed and validated."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.errors import ConfigurationError
from engine.settings import load_settings


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
