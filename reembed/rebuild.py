"""The steps of a rebuild: start (or resume), status, switch, rollback, finish, cancel.

A rebuild of the alias ``A`` to a model ``M`` (docs/OPERATIONS.md, "Changing the model"):

1. ``start``: a plain collection ``A`` is migrated first (renamed ``A_v1``, then ``A`` made an
   alias of it, its tombstones with it); the next version ``A_v<N+1>`` is created bound to
   ``M`` with the old version's index and description, the old version's tombstones copied to
   it; the rebuild workers (ordinary ``trident-worker`` processes serving ``M``, consumer group
   :func:`reembed.plan.rebuild_group`, reading the ingest and retry topics from the beginning,
   ``worker.rebuild`` routing) are started. Run again, it resumes: the workers that are not
   running are started; they go on from their group's committed offsets. After ``finish`` too:
   the rebuild workers are then the ones that keep the new version current (on the local
   stack, ``trident-stack down`` stops them and nothing else starts them again).
2. ``switch``: once caught up (checked: the group's lag <= ``max_lag`` and the two versions'
   row counts within ``max_missing``) and compared (``compare``; a new model measured worse
   needs ``force``), the alias is moved to the new version in one call.
3. ``rollback`` moves it back; ``finish`` drops the old version; ``cancel`` (before a switch)
   stops the workers and drops the new version and its group.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from engine.errors import (
    CollectionConflictError,
    ConfigurationError,
    RebuildRefusedError,
    UnknownCollectionError,
)
from engine.inference import TritonEmbedder
from engine.kafka import delete_consumer_group, ensure_topics
from engine.models import ModelSpec, model_spec, region_model_of
from engine.settings import RebuildTarget, Settings
from engine.store import VectorStore, version_collection, version_number
from reembed import local
from reembed.plan import (
    RebuildState,
    alias_folder,
    all_states,
    load_report,
    load_state,
    rebuild_group,
    remove_state,
    save_state,
)
from worker.progress import Progress, rate_and_eta, read_offsets

logger = logging.getLogger(__name__)

# Loads a model into the local stack's Triton (devstack.stack.LocalStack.serve_models).
ServeModel = Callable[[str], None]


@dataclass
class Migration:
    """What ``start`` did to a plain collection: its new name and how long its name was
    missing (between the rename and the alias)."""

    renamed_to: str
    window_s: float


@dataclass
class Started:
    state: RebuildState
    migration: Migration | None = None
    created: bool = False
    tombstones: int = 0
    started_pids: list[int] = field(default_factory=list)


def start(
    settings: Settings,
    store: VectorStore,
    alias: str,
    model: str,
    *,
    workers: int,
    serve: ServeModel | None = None,
) -> Started:
    """Start the rebuild of ``alias`` with ``model``, or resume the one recorded (finished
    or not: its workers that are not running are started).

    Raises:
        UnknownModelError: ``model`` is not in the registry.
        ConfigurationError: Triton does not serve it, or its region model for a collection with
            regions (and ``serve`` is None), or the model does not fit the settings.
        RebuildRefusedError: another rebuild of ``alias`` (to another model) is recorded, or
            ``alias`` is bound to ``model`` already, or ``alias`` holds region vectors and
            ``model`` has no region recipe.
        UnknownCollectionError: no collection ``alias``.
        StoreUnavailableError, BrokerUnavailableError: Milvus or Kafka is unavailable.
    """
    spec = model_spec(model, settings.triton.registry())
    folder = alias_folder(settings.reembed.state_dir, alias)
    state = load_state(settings.reembed.state_dir, alias)
    # A finished rebuild to the same model resumes too: its workers serve the alias now.
    if state is not None and (not state.finished or state.model == spec.name):
        if state.model != spec.name:
            raise RebuildRefusedError(
                f"a rebuild of {alias} to {state.model} is recorded: finish or cancel it first"
            )
        state = state.model_copy(update={"workers": workers})
        return _resume(settings, store, state, spec, serve=serve)
    _require_served(settings.for_model(spec.name), spec, serve)
    _require_regions(settings, store, alias, spec, serve)
    migration = _migrate(store, alias)
    old = store.resolve_alias(alias)
    if store.describe_collection(old).model_tag == spec.model_version_tag:
        raise RebuildRefusedError(f"{alias} ({old}) holds {spec.name}'s vectors already")
    version = 1 + max(
        (version_number(alias, name) or 0 for name in store.list_collections()), default=1
    )
    state = RebuildState(
        alias=alias,
        old=old,
        new=version_collection(alias, version),
        version=version,
        model=spec.name,
        group=rebuild_group(alias, version),
        workers=workers,
    )
    save_state(settings.reembed.state_dir, state)
    started = _resume(settings, store, state, spec, serve=None)
    started.migration = migration
    logger.info("rebuild of %s started into %s (settings in %s)", alias, state.new, folder)
    return started


def _resume(
    settings: Settings,
    store: VectorStore,
    state: RebuildState,
    spec: ModelSpec,
    *,
    serve: ServeModel | None,
) -> Started:
    """Create what is missing of a recorded rebuild and start its workers that are not running."""
    worker_settings = rebuild_settings(settings, state)
    _require_served(worker_settings, spec, serve)
    done = Started(state)
    # Once finished, the old version is gone and the new one complete: nothing to create.
    if not state.finished:
        done.created = store.create_version(state.old, state.new, spec)
        if not state.tombstones_copied:
            done.tombstones = store.copy_tombstones(state.old, state.new)
            state = state.model_copy(update={"tombstones_copied": True})
    save_state(settings.reembed.state_dir, state)
    done.state = state
    ensure_topics(settings.kafka)
    folder = alias_folder(settings.reembed.state_dir, state.alias)
    local.write_worker_settings(folder, worker_settings)
    done.started_pids = local.start_workers(folder, state.workers)
    return done


def rebuild_settings(settings: Settings, state: RebuildState) -> Settings:
    """The rebuild workers' settings: ``settings`` serving the new model, in the rebuild's own
    group, writing the events of the alias (and of the old version, by name) into the new
    version, their health and metrics on any free port.

    Raises:
        UnknownModelError, ConfigurationError: as ``Settings.for_model``.
    """
    served = settings.for_model(state.model)
    target = RebuildTarget(sources=[state.alias, state.old], target=state.new)
    return served.model_copy(
        update={
            "kafka": served.kafka.model_copy(update={"group_id": state.group}),
            "worker": served.worker.model_copy(update={"rebuild": target, "health_port": 0}),
        }
    )


def _require_served(settings: Settings, spec: ModelSpec, serve: ServeModel | None) -> None:
    """Return once Triton serves ``spec`` (loading it with ``serve`` when given)."""
    with TritonEmbedder(settings.triton, model=spec) as embedder:
        if embedder.served_models().get(spec.name) == "READY":
            return
        if serve is None:
            raise ConfigurationError(
                f"Triton does not serve {spec.name}: on the local stack run "
                f"`trident-stack models add {spec.name}` (or pass --stack-root); elsewhere add "
                "it to Triton's model repository (trident-model-repository), then start again"
            )
        serve(spec.name)
        embedder.wait_until_ready(settings.triton.ready_timeout_s)


def _require_regions(
    settings: Settings, store: VectorStore, alias: str, spec: ModelSpec, serve: ServeModel | None
) -> None:
    """Of a collection with region vectors: refuse a model without a region recipe (its new
    version would lose them), and return once Triton serves the model's region model.

    Raises:
        RebuildRefusedError: ``spec`` has no region recipe.
        ConfigurationError: Triton does not serve the region model (and ``serve`` is None).
    """
    if not store.describe_collection(alias).regions:
        return
    if spec.regions is None:
        raise RebuildRefusedError(
            f"{alias} holds region vectors and {spec.name} has no region recipe, so its new "
            "version would have none: choose a model with a region recipe"
        )
    region = region_model_of(spec, settings.triton.registry())
    _require_served(settings.for_model(region.name), region, serve)


def _migrate(store: VectorStore, alias: str) -> Migration | None:
    """Make a plain collection ``alias`` the alias of ``<alias>_v1`` (None: an alias already)."""
    if store.resolve_alias(alias) != alias:
        return None
    renamed = version_collection(alias, 1)
    window = store.rename_collection(alias, renamed, alias_old_name=True)
    logger.info("migrated %s: now an alias of %s (name missing %.3fs)", alias, renamed, window)
    return Migration(renamed, window)


# status ------------------------------------------------------------------------------------


def status(settings: Settings, store: VectorStore, alias: str | None = None) -> dict[str, Any]:
    """Every collection (model, rows), every alias, and each rebuild's progress.

    Raises:
        StoreUnavailableError, BrokerUnavailableError: Milvus or Kafka is unavailable.
        ConfigurationError: a rebuild's state file is unreadable.
    """
    collections = []
    for name in store.list_collections():
        try:
            info = store.describe_collection(name)
            rows = store.count(name)
        except UnknownCollectionError:
            continue  # dropped since it was listed
        except CollectionConflictError:
            info, rows = None, None  # made elsewhere (no vector field or index): shown as such
        collections.append(
            {
                "name": name,
                "model": info.model_name if info else "",
                "model_tag": info.model_tag if info else "",
                "rows": rows,
            }
        )
    states = all_states(settings.reembed.state_dir)
    return {
        "collections": collections,
        "aliases": store.aliases(),
        "rebuilds": [
            rebuild_progress(settings, store, state)
            for state in states
            if alias is None or state.alias == alias
        ],
    }


def rebuild_progress(settings: Settings, store: VectorStore, state: RebuildState) -> dict[str, Any]:
    """One rebuild's figures: done/total/lag of its group, rate (since it started), ETA, rows.

    Raises:
        BrokerUnavailableError: Kafka did not answer.
    """
    kafka = settings.kafka
    progress = Progress.of(
        read_offsets(kafka, state.group, kafka.topics().consumed, timeout_s=kafka.connect_timeout_s)
    )
    rate, eta = rate_and_eta(0, progress.done, time.time() - state.started_at, progress.lag)
    folder = alias_folder(settings.reembed.state_dir, state.alias)
    return {
        **state.model_dump(),
        "points_to": _points_to(store, state.alias),
        "done": progress.done,
        "total": progress.total,
        "lag": progress.lag,
        "rate": round(rate, 2),
        "eta_s": None if eta == float("inf") else round(eta, 1),
        "rows_old": _rows(store, state.old),
        "rows_new": _rows(store, state.new),
        "workers_running": sorted(local.running_workers(folder)),
    }


def _rows(store: VectorStore, name: str) -> int | None:
    try:
        return store.count(name)
    except UnknownCollectionError:
        return None


def _points_to(store: VectorStore, alias: str) -> str | None:
    try:
        return store.resolve_alias(alias)
    except UnknownCollectionError:
        return None


# switch, rollback, finish, cancel -----------------------------------------------------------


def recorded(settings: Settings, alias: str) -> RebuildState:
    """The recorded rebuild of ``alias``.

    Raises:
        RebuildRefusedError: none is recorded.
    """
    state = load_state(settings.reembed.state_dir, alias)
    if state is None:
        raise RebuildRefusedError(f"no rebuild of {alias} is recorded: run start first")
    return state


def check_caught_up(
    settings: Settings, store: VectorStore, state: RebuildState, *, max_lag: int, max_missing: int
) -> dict[str, Any]:
    """The rebuild's figures, once it is caught up: its group's lag at most ``max_lag``
    records, and the new version's row count within ``max_missing`` of the old one's.

    Raises:
        RebuildRefusedError: not caught up (the message gives the figures).
        BrokerUnavailableError, StoreUnavailableError: Kafka or Milvus is unavailable.
    """
    figures = rebuild_progress(settings, store, state)
    old, new = figures["rows_old"] or 0, figures["rows_new"] or 0
    if figures["lag"] > max_lag:
        raise RebuildRefusedError(
            f"{state.new} has not caught up: {figures['lag']} records left (--max-lag "
            f"{max_lag}); wait, see trident-reembed status {state.alias}"
        )
    if abs(old - new) > max_missing:
        raise RebuildRefusedError(
            f"{state.new} holds {new} rows and {state.old} {old} (--max-missing {max_missing}): "
            "wait for both to catch up, or look at the dead letters (trident-dlq status)"
        )
    return figures


def switch(
    settings: Settings,
    store: VectorStore,
    alias: str,
    *,
    max_lag: int,
    max_missing: int,
    force: bool,
    compare: Callable[[RebuildState], dict[str, Any]],
    show: Callable[[list[str]], None],
) -> dict[str, Any]:
    """Move ``alias`` to the new version, once caught up and compared; return the figures.
    The last compare report (``compare`` runs one when none was saved) is shown first.

    Raises:
        RebuildRefusedError: no rebuild, switched already, not caught up, or the new model
            measured worse and not ``force``.
        StoreUnavailableError, BrokerUnavailableError: Milvus or Kafka is unavailable.
    """
    state = recorded(settings, alias)
    if _points_to(store, alias) == state.new:
        raise RebuildRefusedError(f"{alias} points to {state.new} already")
    figures = check_caught_up(settings, store, state, max_lag=max_lag, max_missing=max_missing)
    report = load_report(settings.reembed.state_dir, alias) or compare(state)
    show([str(line) for line in report.get("lines", [])])
    if report.get("new_is_worse") and not force:
        raise RebuildRefusedError(
            f"{state.model} measured worse than the model of {state.old} (see the report "
            "above): pass --force to switch all the same"
        )
    store.alter_alias(alias, state.new)
    save_state(settings.reembed.state_dir, state.model_copy(update={"switched": True}))
    return figures


def rollback(settings: Settings, store: VectorStore, alias: str) -> RebuildState:
    """Move ``alias`` back to the old version (both stay current: ``worker.routing``).

    Raises:
        RebuildRefusedError: no rebuild, not switched, or the old version was dropped.
    """
    state = recorded(settings, alias)
    if state.finished:
        raise RebuildRefusedError(f"{state.old} was dropped by finish: nothing to roll back to")
    if _points_to(store, alias) != state.new:
        raise RebuildRefusedError(f"{alias} does not point to {state.new}: nothing to roll back")
    store.alter_alias(alias, state.old)
    state = state.model_copy(update={"switched": False})
    save_state(settings.reembed.state_dir, state)
    return state


def finish(settings: Settings, store: VectorStore, alias: str) -> RebuildState:
    """Drop the old version (and its tombstones) once ``alias`` points to the new one. The
    rebuild workers keep the new version current: nothing that serves ``alias`` is stopped.

    Raises:
        RebuildRefusedError: no rebuild, or ``alias`` does not point to the new version.
    """
    state = recorded(settings, alias)
    if _points_to(store, alias) != state.new:
        raise RebuildRefusedError(f"{alias} does not point to {state.new}: switch first")
    if not state.finished:
        # Dropped already by an earlier finish that stopped before recording it: no matter.
        with contextlib.suppress(UnknownCollectionError):
            store.drop_collection(state.old)
        state = state.model_copy(update={"finished": True, "switched": True})
        save_state(settings.reembed.state_dir, state)
    return state


def cancel(settings: Settings, store: VectorStore, alias: str) -> RebuildState:
    """Before a switch: stop the rebuild workers, drop the new version and its group.

    Raises:
        RebuildRefusedError: no rebuild, or ``alias`` points to the new version.
        BrokerUnavailableError: Kafka did not delete the group.
    """
    state = recorded(settings, alias)
    if _points_to(store, alias) == state.new:
        raise RebuildRefusedError(f"{alias} points to {state.new}: roll back first")
    folder = alias_folder(settings.reembed.state_dir, alias)
    local.stop_workers(folder, timeout_s=settings.reembed.stop_timeout_s)
    with contextlib.suppress(UnknownCollectionError):
        store.drop_collection(state.new)
    # Members killed rather than stopped stay in the group until their session times out.
    wait_s = settings.kafka.connect_timeout_s + settings.kafka.session_timeout_ms / 1000
    delete_consumer_group(settings.kafka, state.group, timeout_s=wait_s)
    remove_state(settings.reembed.state_dir, alias)
    return state
