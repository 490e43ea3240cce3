"""What a rebuild is called and what it remembers: its group's name, its state file, its
compare report, each in one place.

A rebuild of the alias ``images`` to version ``N`` writes the concrete collection
``engine.store.version_collection("images", N)`` (``images_v2``) with the consumer group
:func:`rebuild_group` (``trident-reembed.images.v2``), and keeps its state under
``reembed.state_dir/images/``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import orjson
from pydantic import BaseModel, Field

from engine.errors import ConfigurationError


def rebuild_group(alias: str, version: int) -> str:
    """The consumer group of the rebuild of ``alias`` into its version ``version``."""
    return f"trident-reembed.{alias}.v{version}"


class RebuildState(BaseModel):
    """One rebuild, as ``start`` recorded it and later commands moved it on."""

    alias: str
    old: str
    new: str
    version: int
    model: str
    group: str
    # 0: no local rebuild workers (``start --workers 0``: elsewhere, e.g. Kubernetes, runs them).
    workers: int = Field(1, ge=0)
    started_at: float = Field(default_factory=time.time)
    tombstones_copied: bool = False
    switched: bool = False
    finished: bool = False


def alias_folder(state_dir: Path, alias: str) -> Path:
    """Where the rebuild of ``alias`` keeps its state, settings, logs and pid files."""
    return state_dir / alias


def _state_file(state_dir: Path, alias: str) -> Path:
    return alias_folder(state_dir, alias) / "rebuild.json"


def _report_file(state_dir: Path, alias: str) -> Path:
    return alias_folder(state_dir, alias) / "compare.json"


def load_state(state_dir: Path, alias: str) -> RebuildState | None:
    """The recorded rebuild of ``alias``, or None.

    Raises:
        ConfigurationError: the state file is unreadable.
    """
    path = _state_file(state_dir, alias)
    try:
        return RebuildState.model_validate_json(path.read_bytes())
    except FileNotFoundError:
        return None
    except ValueError as exc:
        raise ConfigurationError(f"rebuild state {path} is unreadable ({exc}): remove it") from exc


def save_state(state_dir: Path, state: RebuildState) -> None:
    path = _state_file(state_dir, state.alias)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    temporary.write_text(state.model_dump_json(indent=2))
    temporary.replace(path)  # a crash leaves the old state or the new, never half of one


def remove_state(state_dir: Path, alias: str) -> None:
    _state_file(state_dir, alias).unlink(missing_ok=True)
    _report_file(state_dir, alias).unlink(missing_ok=True)


def all_states(state_dir: Path) -> list[RebuildState]:
    """Every recorded rebuild, by alias.

    Raises:
        ConfigurationError: a state file is unreadable.
    """
    found = [load_state(state_dir, path.parent.name) for path in state_dir.glob("*/rebuild.json")]
    return sorted((state for state in found if state), key=lambda state: state.alias)


def save_report(state_dir: Path, alias: str, report: dict[str, Any]) -> Path:
    path = _report_file(state_dir, alias)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
    return path


def load_report(state_dir: Path, alias: str) -> dict[str, Any] | None:
    """The last compare report saved for ``alias`` (``lines``, ``new_is_worse``, ``report``)."""
    try:
        loaded = orjson.loads(_report_file(state_dir, alias).read_bytes())
    except (FileNotFoundError, orjson.JSONDecodeError):
        return None
    return loaded if isinstance(loaded, dict) else None
