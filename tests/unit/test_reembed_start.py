"""``reembed.rebuild.start`` on a recorded rebuild (fakes: no Milvus, Kafka or Triton)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from engine.settings import Settings
from reembed import local, rebuild
from reembed.plan import RebuildState, load_state, save_state

LITE2 = "efficientnet_lite2_embedding_uint8"


class NoCollectionsStore:
    """A store that must not be asked to create or copy anything."""

    def create_version(self, like: str, name: str, model: object) -> bool:
        raise AssertionError(f"create_version({like}, {name}) on a finished rebuild")

    def copy_tombstones(self, source: str, target: str) -> int:
        raise AssertionError(f"copy_tombstones({source}, {target}) on a finished rebuild")

    def resolve_alias(self, name: str) -> str:
        raise AssertionError("a finished rebuild of the same model is resumed, not started anew")


@pytest.fixture
def started_workers(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The counts ``local.start_workers`` was asked for; Triton and Kafka faked away."""
    asked: list[int] = []

    def start_workers(folder: Path, count: int) -> list[int]:
        asked.append(count)
        return list(range(100, 100 + count))

    monkeypatch.setattr(rebuild, "_require_served", lambda *_a, **_k: None)
    monkeypatch.setattr(rebuild, "ensure_topics", lambda *_a, **_k: None)
    monkeypatch.setattr(local, "start_workers", start_workers)
    return asked


def _state(**changes: Any) -> RebuildState:
    values: dict[str, Any] = {
        "alias": "images",
        "old": "images_v1",
        "new": "images_v2",
        "version": 2,
        "model": LITE2,
        "group": "trident-reembed.images.v2",
        "tombstones_copied": True,
    }
    return RebuildState(**{**values, **changes})


def test_start_after_finish_starts_the_rebuild_workers_again(
    tmp_path: Path, started_workers: list[int]
) -> None:
    # After finish the rebuild workers keep the new version current; once stopped (the local
    # stack's `down`), start must bring them back: nothing else serves the alias then.
    settings = Settings(reembed={"state_dir": str(tmp_path)})
    save_state(tmp_path, _state(switched=True, finished=True, workers=2))
    started = rebuild.start(
        settings,
        NoCollectionsStore(),  # type: ignore[arg-type]
        "images",
        LITE2,
        workers=2,
    )
    assert started_workers == [2]
    assert started.started_pids == [100, 101]
    assert not started.created
    recorded = load_state(tmp_path, "images")
    assert recorded is not None and recorded.finished and recorded.new == "images_v2"


class ExistingVersionStore(NoCollectionsStore):
    def create_version(self, like: str, name: str, model: object) -> bool:
        return False  # made by the first start


def test_a_rebuild_may_run_no_local_workers(tmp_path: Path, started_workers: list[int]) -> None:
    # `start --workers 0`: Kubernetes runs the workers; the state records 0 and reads back.
    settings = Settings(reembed={"state_dir": str(tmp_path)})
    save_state(tmp_path, _state())
    started = rebuild.start(
        settings,
        ExistingVersionStore(),  # type: ignore[arg-type]
        "images",
        LITE2,
        workers=0,
    )
    assert started_workers == [0]
    assert started.started_pids == []
    recorded = load_state(tmp_path, "images")
    assert recorded is not None and recorded.workers == 0
