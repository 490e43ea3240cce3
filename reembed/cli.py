"""``trident-reembed``: rebuild a collection with another model while it keeps serving.

Commands (see ``reembed.rebuild`` and docs/OPERATIONS.md, "Changing the model")::

    start ALIAS --model NAME [--workers N] [--stack-root DIR]
    status [ALIAS] [--json]
    compare ALIAS [--sample N] [--labelled DIR]
    switch ALIAS [--max-lag N] [--max-missing N] [--force]
    rollback ALIAS
    finish ALIAS
    cancel ALIAS

Exit status: 0 done; 1 a service (Kafka, Milvus, Triton) is unavailable; 2 the settings or the
arguments are wrong (an unknown model or collection included); 3 refused in the rebuild's state
(not caught up, the new model measured worse without ``--force``, nothing to roll back). Each
failure is one line saying what to do.
"""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import orjson

from engine.cli_support import add_common_arguments, settings_from_arguments
from engine.errors import (
    CollectionConflictError,
    ConfigurationError,
    RebuildRefusedError,
    RetriableError,
    TridentError,
    UnknownCollectionError,
)
from engine.settings import Settings
from engine.store import VectorStore
from reembed import rebuild
from reembed.plan import RebuildState, save_report

logger = logging.getLogger(__name__)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trident-reembed",
        description="Rebuild a collection with another model while it keeps serving.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name: str, text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=text, description=text)
        add_common_arguments(sub)
        return sub

    start = command("start", "Start (or resume) the rebuild of ALIAS with another model.")
    start.add_argument("alias")
    start.add_argument("--model", required=True, help="A model of the registry.")
    start.add_argument(
        "--workers",
        type=_count,
        default=1,
        help="Local rebuild workers (0: none here, e.g. where a Kubernetes Deployment runs them).",
    )
    start.add_argument(
        "--stack-root",
        type=Path,
        default=None,
        help="The local stack's folder: load the model into its Triton when it is not served.",
    )
    status = command("status", "Collections, aliases and each rebuild's progress.")
    status.add_argument("alias", nargs="?")
    status.add_argument("--json", action="store_true")
    compare = command("compare", "Compare the answers of the old and the new collection.")
    compare.add_argument("alias")
    compare.add_argument("--sample", type=_positive, default=100, help="Queries.")
    compare.add_argument("--labelled", type=Path, default=None, help="A labelled image set.")
    switch = command("switch", "Point ALIAS at the rebuilt collection, once caught up.")
    switch.add_argument("alias")
    switch.add_argument("--max-lag", type=_count, default=None, help="reembed.max_lag")
    switch.add_argument("--max-missing", type=_count, default=None, help="reembed.max_missing")
    switch.add_argument("--force", action="store_true", help="Switch to a model measured worse.")
    for name, text in (
        ("rollback", "Point ALIAS back at the old collection."),
        ("finish", "Drop the old collection of a switched ALIAS."),
        ("cancel", "Before a switch: stop the rebuild, drop the new collection and its group."),
    ):
        command(name, text).add_argument("alias")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = settings_from_arguments(args)
    except ConfigurationError as exc:
        logger.error("%s", exc)
        return 2
    store = VectorStore(settings.milvus)
    try:
        return _COMMANDS[args.command](args, settings, store)
    except (ConfigurationError, UnknownCollectionError) as exc:
        logger.error("%s", exc)
        return 2
    except (RebuildRefusedError, CollectionConflictError) as exc:
        logger.error("refused: %s", exc)
        return 3
    except RetriableError as exc:
        logger.error("unavailable, run it again once it answers: %s", exc)
        return 1
    except TridentError as exc:
        logger.error("%s", exc)
        return 1
    finally:
        store.close()


def _start(args: argparse.Namespace, settings: Settings, store: VectorStore) -> int:
    started = rebuild.start(
        settings,
        store,
        args.alias,
        args.model,
        workers=args.workers,
        serve=_stack_server(args.stack_root),
    )
    state = started.state
    if started.migration is not None:
        print(
            f"migrated {state.alias}: now an alias of {started.migration.renamed_to} "
            f"(its name was missing for {started.migration.window_s * 1000:.0f} ms)"
        )
    made = "created" if started.created else "exists"
    print(f"{state.new} ({state.model}): {made}; {started.tombstones} tombstones copied")
    print(
        f"rebuild workers: {len(started.started_pids)} started, {state.workers} wanted "
        f"(group {state.group}); follow it with: trident-reembed status {state.alias}"
    )
    return 0


def _stack_server(root: Path | None) -> rebuild.ServeModel | None:
    """Load a model into the local stack's Triton at ``root`` (``trident-stack models add``,
    run as a command: the runtime packages never import the local stack)."""
    if root is None:
        return None

    def serve(name: str) -> None:
        argv = [sys.executable, "-m", "devstack.cli", "models", "add", name, "--root", str(root)]
        done = subprocess.run(argv, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise ConfigurationError(f"could not load {name} into the local Triton: {last}")

    return serve


def _status(args: argparse.Namespace, settings: Settings, store: VectorStore) -> int:
    report = rebuild.status(settings, store, args.alias)
    if args.json:
        print(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode())
        return 0
    aliases: dict[str, list[str]] = {}
    for alias, target in report["aliases"].items():
        aliases.setdefault(target, []).append(alias)
    for found in report["collections"]:
        names = ", ".join(aliases.get(found["name"], []))
        pointed = f"  <- {names}" if names else ""
        print(
            f"{found['name']:30s} {found['model'] or found['model_tag'] or '-':40s} "
            f"{'-' if found['rows'] is None else found['rows']:>10} rows{pointed}"
        )
    for item in report["rebuilds"]:
        print(_progress_line(item))
    return 0


def _progress_line(item: dict[str, Any]) -> str:
    share = item["done"] / item["total"] * 100 if item["total"] else 100.0
    eta = "-" if item["eta_s"] is None else f"{item['eta_s']:.0f}s"
    phase = "finished" if item["finished"] else "switched" if item["switched"] else "rebuilding"
    return (
        f"rebuild {item['alias']} -> {item['new']} ({item['model']}, {phase}, alias at "
        f"{item['points_to']}): {item['done']}/{item['total']} ({share:.0f}%), lag "
        f"{item['lag']}, {item['rate']:.1f}/s, ETA {eta}; rows {item['rows_old']} old / "
        f"{item['rows_new']} new; workers {len(item['workers_running'])}/{item['workers']}"
    )


def _compare(args: argparse.Namespace, settings: Settings, store: VectorStore) -> int:
    state = rebuild.recorded(settings, args.alias)
    report = run_compare(settings, store, state, sample=args.sample, labelled=args.labelled)
    for line in report["lines"]:
        print(line)
    return 0


def run_compare(
    settings: Settings,
    store: VectorStore,
    state: RebuildState,
    *,
    sample: int,
    labelled: Path | None = None,
) -> dict[str, Any]:
    """Compare the old and new versions (``reembed.compare``), save the report in the state
    folder and return it as saved: ``lines``, ``new_is_worse``, ``report``."""
    from reembed.compare import compare_collections  # noqa: PLC0415 - loads the models

    found = compare_collections(
        settings,
        store,
        alias=state.alias,
        old=state.old,
        new=state.new,
        sample=sample,
        labelled=labelled,
    )
    report = {
        "lines": list(found.lines()),
        "new_is_worse": bool(found.new_is_worse),
        "report": found.model_dump(mode="json"),
    }
    path = save_report(settings.reembed.state_dir, state.alias, report)
    logger.info("compare report saved in %s", path)
    return report


def _switch(args: argparse.Namespace, settings: Settings, store: VectorStore) -> int:
    def compare(state: RebuildState) -> dict[str, Any]:
        return run_compare(settings, store, state, sample=settings.reembed.compare_sample)

    figures = rebuild.switch(
        settings,
        store,
        args.alias,
        max_lag=settings.reembed.max_lag if args.max_lag is None else args.max_lag,
        max_missing=settings.reembed.max_missing if args.max_missing is None else args.max_missing,
        force=args.force,
        compare=compare,
        show=lambda lines: print("\n".join(lines)),
    )
    print(f"{args.alias} -> {figures['new']} ({figures['model']}); {figures['rows_new']} rows")
    return 0


def _rollback(args: argparse.Namespace, settings: Settings, store: VectorStore) -> int:
    state = rebuild.rollback(settings, store, args.alias)
    print(f"{state.alias} -> {state.old} (again); {state.new} stays current")
    return 0


def _finish(args: argparse.Namespace, settings: Settings, store: VectorStore) -> int:
    state = rebuild.finish(settings, store, args.alias)
    print(f"{state.old} dropped; {state.alias} -> {state.new}")
    return 0


def _cancel(args: argparse.Namespace, settings: Settings, store: VectorStore) -> int:
    state = rebuild.cancel(settings, store, args.alias)
    print(f"rebuild of {state.alias} cancelled: {state.new} and group {state.group} dropped")
    return 0


_COMMANDS: dict[str, Callable[[argparse.Namespace, Settings, VectorStore], int]] = {
    "start": _start,
    "status": _status,
    "compare": _compare,
    "switch": _switch,
    "rollback": _rollback,
    "finish": _finish,
    "cancel": _cancel,
}


def _positive(text: str) -> int:
    value = int(text) if text.isdigit() else 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number")
    return value


def _count(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a number (0 or more)")
    return int(text)


if __name__ == "__main__":
    sys.exit(main())
