"""``trident-reembed`` without services: progress arithmetic, names, the state file, the
switch's checks (with fakes) and the CLI's arguments and exit codes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from engine.errors import (
    BrokerUnavailableError,
    RebuildRefusedError,
    UnknownCollectionError,
    UnknownModelError,
)
from engine.settings import Settings
from engine.store import version_collection, version_number
from reembed import cli, rebuild
from reembed.plan import (
    RebuildState,
    load_report,
    load_state,
    rebuild_group,
    save_report,
    save_state,
)
from worker.metrics import RebuildMetrics, WorkerMetrics
from worker.progress import PartitionOffsets, Progress, ProgressReporter, rate_and_eta

# Progress ------------------------------------------------------------------------------------


def test_progress_counts_offsets_passed_from_each_partition_start() -> None:
    offsets = [
        PartitionOffsets("ingest", 0, low=10, high=110, committed=60),  # 50 of 100
        PartitionOffsets("ingest", 1, low=0, high=40, committed=None),  # none committed: 0
        PartitionOffsets("ingest.retry", 0, low=5, high=5, committed=None),  # empty
        PartitionOffsets("ingest", 2, low=30, high=50, committed=3),  # compacted past it: 0
    ]
    progress = Progress.of(offsets)
    assert (progress.done, progress.total, progress.lag) == (50, 160, 110)


def test_rate_and_eta() -> None:
    assert rate_and_eta(100, 300, 10.0, lag=400) == (20.0, 20.0)
    assert rate_and_eta(100, 100, 10.0, lag=5) == (0.0, float("inf"))
    assert rate_and_eta(0, 50, 5.0, lag=0) == (10.0, 0.0)
    assert rate_and_eta(0, 0, 0.0, lag=0) == (0.0, 0.0)


def test_the_reporter_sets_the_gauges() -> None:
    metrics = WorkerMetrics()
    reads = iter(
        [
            [PartitionOffsets("t", 0, 0, 100, 10)],
            [PartitionOffsets("t", 0, 0, 100, 60)],
        ]
    )
    reporter = ProgressReporter(
        RebuildMetrics(metrics.registry),
        collection="images_v2",
        read=lambda: next(reads),
        interval_s=1,
    )
    reporter.sample()
    reporter.sample()
    value = metrics.registry.get_sample_value
    labels = {"collection": "images_v2"}
    assert value("trident_reembed_done", labels) == 60
    assert value("trident_reembed_total", labels) == 100
    assert value("trident_reembed_lag", labels) == 40
    assert (value("trident_reembed_rate", labels) or 0) > 0
    assert (value("trident_reembed_eta_seconds", labels) or 0) > 0


# Names and state ------------------------------------------------------------------------------


def test_versions_and_groups_are_named_in_one_way() -> None:
    assert version_collection("images", 2) == "images_v2"
    assert version_number("images", "images_v12") == 12
    assert version_number("images", "images_v") is None
    assert version_number("images", "images_v01") is None
    assert version_number("images", "imagesx_v2") is None
    assert version_number("images", "images_v2_v3") is None
    assert rebuild_group("images", 2) == "trident-reembed.images.v2"


def _state(**changes: Any) -> RebuildState:
    values: dict[str, Any] = {
        "alias": "images",
        "old": "images_v1",
        "new": "images_v2",
        "version": 2,
        "model": "efficientnet_lite2_embedding_uint8",
        "group": "trident-reembed.images.v2",
    }
    return RebuildState(**{**values, **changes})


def test_the_state_and_the_report_are_kept_per_alias(tmp_path: Path) -> None:
    assert load_state(tmp_path, "images") is None
    save_state(tmp_path, _state(switched=True))
    loaded = load_state(tmp_path, "images")
    assert loaded is not None and loaded.switched and loaded.new == "images_v2"
    assert load_report(tmp_path, "images") is None
    save_report(tmp_path, "images", {"lines": ["a"], "new_is_worse": True})
    assert load_report(tmp_path, "images") == {"lines": ["a"], "new_is_worse": True}


# The switch's checks ----------------------------------------------------------------------------


class FakeStore:
    def __init__(self, counts: dict[str, int], alias_to: str) -> None:
        self.counts, self.alias_to = counts, alias_to
        self.altered: list[tuple[str, str]] = []

    def count(self, name: str) -> int:
        return self.counts[name]

    def resolve_alias(self, name: str) -> str:
        return self.alias_to

    def alter_alias(self, alias: str, collection: str) -> None:
        self.altered.append((alias, collection))
        self.alias_to = collection


def _switch(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    *,
    lag: int,
    old: int,
    new: int,
    worse: bool = False,
    force: bool = False,
) -> tuple[FakeStore, list[list[str]]]:
    settings = Settings(reembed={"state_dir": str(tmp_path)})
    save_state(tmp_path, _state())
    store = FakeStore({"images_v1": old, "images_v2": new}, "images_v1")
    offsets = [PartitionOffsets("t", 0, 0, 100, 100 - lag)]
    monkeypatch.setattr(rebuild, "read_offsets", lambda *_a, **_k: offsets)
    shown: list[list[str]] = []
    rebuild.switch(
        settings,
        store,  # type: ignore[arg-type]
        "images",
        max_lag=2,
        max_missing=1,
        force=force,
        compare=lambda _state: {"lines": ["compared"], "new_is_worse": worse},
        show=shown.append,
    )
    return store, shown


def test_a_switch_once_caught_up_moves_the_alias_after_showing_the_report(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store, shown = _switch(tmp_path, monkeypatch, lag=2, old=10, new=9)
    assert store.altered == [("images", "images_v2")] and shown == [["compared"]]
    state = load_state(tmp_path, "images")
    assert state is not None and state.switched


@pytest.mark.parametrize(
    "case",
    [
        (3, 10, 10, False, "3 records left"),
        (0, 10, 8, False, "holds 8 rows"),
        (0, 8, 10, False, "holds 10 rows"),
        (0, 10, 10, True, "--force"),
    ],
)
def test_a_switch_is_refused_until_caught_up_and_measured_no_worse(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: tuple[int, int, int, bool, str]
) -> None:
    lag, old, new, worse, says = case
    with pytest.raises(RebuildRefusedError, match=says):
        _switch(tmp_path, monkeypatch, lag=lag, old=old, new=new, worse=worse)
    state = load_state(tmp_path, "images")
    assert state is not None and not state.switched


def test_force_switches_to_a_model_measured_worse(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store, _ = _switch(tmp_path, monkeypatch, lag=0, old=5, new=5, worse=True, force=True)
    assert store.altered == [("images", "images_v2")]


def test_a_saved_report_is_used_instead_of_a_new_compare(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    save_report(tmp_path, "images", {"lines": ["saved"], "new_is_worse": False})
    _store, shown = _switch(tmp_path, monkeypatch, lag=0, old=5, new=5, worse=True)
    assert shown == [["saved"]]


# The CLI ---------------------------------------------------------------------------------------


def _raise(error: Exception) -> Any:
    def fail(*_args: Any, **_kwargs: Any) -> Any:
        raise error

    return fail


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (UnknownModelError("no model 'x'"), 2),
        (UnknownCollectionError("no collection named 'images'"), 2),
        (RebuildRefusedError("not caught up"), 3),
        (BrokerUnavailableError("kafka down"), 1),
    ],
)
def test_cli_exit_codes_and_one_line(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    error: Exception,
    code: int,
) -> None:
    for name in ("start", "switch", "rollback", "finish", "cancel", "status"):
        monkeypatch.setattr(rebuild, name, _raise(error))
    for argv in (
        ["start", "images", "--model", "x"],
        ["switch", "images"],
        ["rollback", "images"],
        ["finish", "images"],
        ["cancel", "images"],
        ["status"],
    ):
        caplog.clear()
        assert cli.main(argv) == code, argv
        errors = [r for r in caplog.records if r.levelname == "ERROR"]
        assert len(errors) == 1 and str(error) in errors[0].getMessage()
        assert errors[0].exc_info is None  # no traceback


def test_cli_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (
        [],
        ["start", "images"],  # --model is required
        ["start", "images", "--model", "x", "--workers", "-1"],
        ["switch", "images", "--max-lag", "-1"],
        ["bogus"],
    ):
        with pytest.raises(SystemExit) as exited:
            cli.main(argv)
        assert exited.value.code == 2, argv


def test_cli_switch_prints_the_report_and_the_new_target(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def switch(*_args: Any, show: Any, **kwargs: Any) -> dict[str, Any]:
        assert kwargs["max_lag"] == 7 and kwargs["force"] is True
        show(["top-10 overlap 0.8"])
        return {"new": "images_v2", "model": "lite2", "rows_new": 12}

    monkeypatch.setattr(rebuild, "switch", switch)
    assert cli.main(["switch", "images", "--max-lag", "7", "--force"]) == 0
    out = capsys.readouterr().out
    assert "top-10 overlap 0.8" in out and "images -> images_v2 (lite2); 12 rows" in out


# The local rebuild workers across a restart of the stack -------------------------------------


def test_start_all_starts_the_workers_of_every_recorded_rebuild_with_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from reembed import local  # noqa: PLC0415 - the module under test, patched below

    asked: list[tuple[str, int]] = []

    def start_workers(folder: Path, count: int) -> list[int]:
        asked.append((folder.name, count))
        return list(range(count))

    monkeypatch.setattr(local, "start_workers", start_workers)
    save_state(tmp_path, _state(workers=2, finished=True))
    save_state(tmp_path, _state(alias="other", workers=1))
    save_state(tmp_path, _state(alias="elsewhere", workers=0))
    local.write_worker_settings(tmp_path / "images", Settings())
    local.write_worker_settings(tmp_path / "elsewhere", Settings())
    # "other" has no settings file (a start that stopped before writing it): left alone.
    assert local.start_all(tmp_path) == 2
    assert sorted(asked) == [("elsewhere", 0), ("images", 2)]


def test_a_worker_leaves_a_rebuilt_collections_alias_alone_and_creates_a_missing_default() -> None:
    from worker.runner import _ensure_default_collection  # noqa: PLC0415 - private seam

    class Store:
        def __init__(self, aliases: dict[str, str], collections: set[str]) -> None:
            self.aliases, self.collections, self.created = aliases, collections, []

        def resolve_alias(self, name: str) -> str:
            if name in self.aliases:
                return self.aliases[name]
            if name in self.collections:
                return name
            raise UnknownCollectionError(name)

        def create_collection(self, name: str, **_: object) -> None:
            self.created.append(name)

    settings = Settings()
    name = settings.milvus.collection
    rebuilt = Store({name: f"{name}_v2"}, {f"{name}_v2"})
    _ensure_default_collection(rebuilt, settings)  # type: ignore[arg-type]
    assert rebuilt.created == []
    for store in (Store({}, set()), Store({}, {name})):
        _ensure_default_collection(store, settings)  # type: ignore[arg-type]
        assert store.created == [name]
