"""``trident-produce``: publish images as ingest events, with a progress bar and a summary.

Sources: paths, glob patterns, folders (recursive, ``--include``/``--exclude``), http(s) URLs,
list files (``--from-file``) and manifests (``--manifest``, JSONL or CSV; see
``producer.sources``). Every event is validated and checked against the configured
``kafka.event_limits`` before it is sent. With ``--delete`` the arguments, list-file lines and
manifests' ``id`` column are ids, each published as a delete (a tombstone: ``schemas.deletes``)
from ``--collection`` (or a manifest line's own), as of now. Before publishing it asks the
cluster for metadata (for up to ``kafka.connect_timeout_s``): when that goes unanswered it says
so in one line and publishes nothing. Exit status: 0 when every event (or delete) was delivered
(with ``--dry-run``: is valid); 1 when some were not, each listed with its reason, or Kafka is
unreachable; 2 when the command cannot run (bad arguments or settings, an unreadable list file
or manifest).
"""

from __future__ import annotations

import argparse
import functools
import logging
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from engine.cli_support import add_common_arguments, settings_from_arguments
from engine.errors import BrokerUnavailableError, ConfigurationError, EntryError, SourceError
from engine.kafka import require_broker
from engine.settings import Settings
from producer.progress import progress_bar
from producer.publisher import Delivery, EventPublisher
from producer.sources import (
    DeleteEntry,
    Entry,
    EventOptions,
    build_delete,
    build_event,
    gather,
    gather_deletes,
)

logger = logging.getLogger(__name__)

# librdkafka reports an undeliverable event after message.timeout.ms (120 s); wait a bit longer.
FLUSH_TIMEOUT_S = 150.0
MAX_LISTED_FAILURES = 100


@dataclass
class _Tally:
    """What happened to the entries of one run."""

    advance: Callable[[int], None]
    queued: int = 0
    delivered: int = 0
    failures: list[str] = field(default_factory=list)

    def refused(self, error: EntryError) -> None:
        self.failures.append(str(error))
        self.advance(1)

    def answered(self, origin: str, delivery: Delivery) -> None:
        if delivery.ok:
            self.delivered += 1
        else:
            self.failures.append(f"{origin}: {delivery.error}")
        self.advance(1)


def _parse_metadata(pairs: Sequence[str]) -> dict[str, str]:
    metadata = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"--metadata expects key=value, got {pair!r}")
        metadata[key] = value
    return metadata


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trident-produce",
        description="Publish images as ingest events to Kafka; with --delete, delete ids.",
        epilog="Exit status: 0 all delivered, 1 some not delivered (listed) or Kafka "
        "unreachable, 2 cannot run. Deletes: the same.",
    )
    add_common_arguments(parser)
    parser.add_argument(
        "sources",
        nargs="*",
        help="Image files, glob patterns (quoted, ** allowed), folders (recursive) or URLs; "
        "with --delete, ids.",
    )
    parser.add_argument(
        "--delete",
        action="store_true",
        help="Delete ids instead: the arguments, --from-file lines (one id a line) and the id "
        "column of --manifest files, from --collection or a manifest line's collection.",
    )
    parser.add_argument(
        "--from-file",
        action="append",
        default=[],
        type=Path,
        metavar="FILE",
        help="A file listing paths, patterns, folders or URLs, one a line (# comments).",
    )
    parser.add_argument(
        "--manifest",
        action="append",
        default=[],
        type=Path,
        metavar="FILE",
        help="A JSONL or CSV manifest: source, id, collection, metadata, metadata columns.",
    )
    parser.add_argument(
        "--include",
        action="append",
        default=[],
        metavar="GLOB",
        help="In folders, publish only files whose relative path matches (default: images).",
    )
    parser.add_argument(
        "--exclude",
        action="append",
        default=[],
        metavar="GLOB",
        help="In folders, skip files whose relative path matches.",
    )
    parser.add_argument(
        "--inline", action="store_true", help="Carry local files' bytes in the events."
    )
    parser.add_argument(
        "--collection", default=None, help="Target collection (worker default if absent)."
    )
    parser.add_argument(
        "--metadata",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="Metadata for every event (a manifest's own values win).",
    )
    parser.add_argument("--id-prefix", default="", help="Prefix for ids made from paths.")
    parser.add_argument(
        "--generate-ids",
        action="store_true",
        help="Random ids where the manifest gives none (republishing then duplicates).",
    )
    parser.add_argument("--limit", type=int, default=None, help="Publish at most this many.")
    parser.add_argument("--topic", default=None, help="Override the ingest topic.")
    parser.add_argument(
        "--dry-run", action="store_true", help="Validate and count; publish nothing."
    )
    return parser


# What only applies to images: refused with --delete rather than silently ignored.
_IMAGE_ONLY = {
    "inline": "--inline",
    "metadata": "--metadata",
    "id_prefix": "--id-prefix",
    "generate_ids": "--generate-ids",
    "include": "--include",
    "exclude": "--exclude",
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.delete:
        misplaced = [flag for name, flag in _IMAGE_ONLY.items() if getattr(args, name)]
        if misplaced:
            parser.error(f"--delete takes ids: {', '.join(misplaced)} do not apply")
        if not (args.sources or args.from_file or args.manifest):
            parser.error("give at least one id to delete (or --from-file, --manifest)")
    elif not (args.sources or args.from_file or args.manifest):
        parser.error("give at least one file, pattern, folder or URL (or --from-file, --manifest)")
    try:
        settings = settings_from_arguments(args)
    except ConfigurationError as exc:
        logger.error("%s", exc)
        return 2
    if args.delete:
        return _delete_main(args, settings)
    options = EventOptions(
        inline=args.inline,
        collection=args.collection,
        metadata=_parse_metadata(args.metadata),
        id_prefix=args.id_prefix,
        generate_ids=args.generate_ids,
        include=tuple(args.include),
        exclude=tuple(args.exclude),
        limits=settings.kafka.event_limits,
    )
    try:
        entries = gather(args.sources, options, list_files=args.from_file, manifests=args.manifest)[
            : args.limit
        ]
    except SourceError as exc:
        logger.error("%s", exc)
        return 2
    started = time.monotonic()
    if not args.dry_run and _broker_unreachable(settings, len(entries), started):
        return 1
    with progress_bar(len(entries), "validating" if args.dry_run else "publishing") as advance:
        tally = _Tally(advance)
        if args.dry_run:
            _validate(entries, options, tally)
        else:
            _publish(entries, options, settings, args.topic, tally)
    _print_summary(tally, time.monotonic() - started, dry_run=args.dry_run)
    return 0 if not tally.failures else 1


def _broker_unreachable(settings: Settings, pending: int, started: float) -> bool:
    """Ask the cluster for metadata first; unanswered, say so in one line and return True."""
    try:
        require_broker(settings.kafka, timeout_s=settings.kafka.connect_timeout_s)
    except BrokerUnavailableError as exc:
        logger.error("%s", exc)
        print(
            f"delivered=0 not_sent={pending} elapsed={time.monotonic() - started:.1f}s "
            "(Kafka unreachable)"
        )
        return True
    return False


def _validate(entries: list[Entry], options: EventOptions, tally: _Tally) -> None:
    for entry in entries:
        try:
            build_event(entry, options)
        except EntryError as exc:
            tally.refused(exc)
        else:
            tally.queued += 1
            tally.advance(1)


def _publish(
    entries: list[Entry],
    options: EventOptions,
    settings: Settings,
    topic: str | None,
    tally: _Tally,
) -> None:
    with EventPublisher(settings.kafka, topic=topic, limits=options.limits) as publisher:
        for entry in entries:
            try:
                event = build_event(entry, options)
            except EntryError as exc:
                tally.refused(exc)
                continue
            publisher.publish(event, on_delivery=functools.partial(tally.answered, entry.origin))
            tally.queued += 1
        try:
            publisher.flush(FLUSH_TIMEOUT_S)
        except BrokerUnavailableError as exc:
            tally.failures.append(f"{exc} (their delivery is unknown)")


def _delete_main(args: argparse.Namespace, settings: Settings) -> int:
    """``--delete``: the ids' deletes, validated, then published (or only validated)."""
    limits = settings.kafka.event_limits
    try:
        entries = gather_deletes(args.sources, list_files=args.from_file, manifests=args.manifest)
    except SourceError as exc:
        logger.error("%s", exc)
        return 2
    entries = entries[: args.limit]
    started = time.monotonic()
    if not args.dry_run and _broker_unreachable(settings, len(entries), started):
        return 1
    with progress_bar(len(entries), "validating" if args.dry_run else "deleting") as advance:
        tally = _Tally(advance)
        if args.dry_run:
            for entry in entries:
                try:
                    build_delete(entry, collection=args.collection, limits=limits)
                except EntryError as exc:
                    tally.refused(exc)
                else:
                    tally.queued += 1
                    tally.advance(1)
        else:
            _publish_deletes(entries, args.collection, settings, args.topic, tally)
    _print_summary(tally, time.monotonic() - started, dry_run=args.dry_run)
    return 0 if not tally.failures else 1


def _publish_deletes(
    entries: list[DeleteEntry],
    collection: str | None,
    settings: Settings,
    topic: str | None,
    tally: _Tally,
) -> None:
    limits = settings.kafka.event_limits
    with EventPublisher(settings.kafka, topic=topic, limits=limits) as publisher:
        for entry in entries:
            try:
                # Built at its turn: its version is the moment it is published.
                delete = build_delete(entry, collection=collection, limits=limits)
            except EntryError as exc:
                tally.refused(exc)
                continue
            publisher.publish_delete(
                delete, on_delivery=functools.partial(tally.answered, entry.origin)
            )
            tally.queued += 1
        try:
            publisher.flush(FLUSH_TIMEOUT_S)
        except BrokerUnavailableError as exc:
            tally.failures.append(f"{exc} (their delivery is unknown)")


def _print_summary(tally: _Tally, elapsed_s: float, *, dry_run: bool) -> None:
    if dry_run:
        print(f"dry run, nothing published: valid={tally.queued} invalid={len(tally.failures)}")
    else:
        rate = tally.delivered / elapsed_s if elapsed_s > 0 else 0.0
        print(
            f"delivered={tally.delivered} failed={len(tally.failures)} "
            f"elapsed={elapsed_s:.1f}s rate={rate:.1f}/s"
        )
    if tally.failures:
        print("failures:")
        for failure in tally.failures[:MAX_LISTED_FAILURES]:
            print(f"  {failure}")
        if len(tally.failures) > MAX_LISTED_FAILURES:
            print(f"  ... and {len(tally.failures) - MAX_LISTED_FAILURES} more")


if __name__ == "__main__":
    sys.exit(main())
