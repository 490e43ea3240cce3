"""``trident-dlq``: find out why records were dead-lettered, and replay them after a fix.

``inspect`` counts the dead letters by stage and reason, by source topic and by time window,
shows samples, one record in full (``--offset``, ``--id``), or prints one JSON object per record
(``--json``). ``replay`` republishes the chosen records to the retry topic, which the workers
consume beside the ingest topic (never to the compacted ingest topic: see
``producer.dead_letters`` for why, what is kept and the replay cap). Both read the dead-letter topic
without a consumer group and never write to it. Both first ask the cluster for metadata (for up
to ``kafka.connect_timeout_s``) and, when that goes unanswered, say so in one line. Exit status:
0 success; 1 something could not be replayed (or ``inspect --offset/--id`` found nothing), or
Kafka is unreachable; 2 the command cannot run (bad arguments or settings, no such topic).
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from collections import Counter
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta

import orjson

from engine.cli_support import add_common_arguments, settings_from_arguments
from engine.errors import BrokerUnavailableError, ConfigurationError
from engine.kafka import require_broker
from engine.settings import Settings
from producer.dead_letters import (
    DEFAULT_MAX_REPLAYS,
    DeadLetterFilter,
    DeadLetterReader,
    DeadLetterRecord,
    plan_replay,
    replay,
)
from producer.progress import progress_bar
from producer.publisher import Delivery, EventPublisher
from producer.status import add_status_command, run_status

logger = logging.getLogger(__name__)

_RELATIVE_TIME = re.compile(r"^(\d+)([smhd])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}
_WINDOWS = {"minute": "%Y-%m-%dT%H:%MZ", "hour": "%Y-%m-%dT%H:00Z", "day": "%Y-%m-%d"}


def parse_time(text: str) -> datetime:
    """An ISO 8601 time (UTC unless it says otherwise) or an age: ``90s``, ``30m``, ``2h``, ``1d``.

    Raises:
        argparse.ArgumentTypeError: neither.
    """
    relative = _RELATIVE_TIME.match(text)
    if relative:
        amount, unit = relative.groups()
        return datetime.now(UTC) - timedelta(**{_UNITS[unit]: int(amount)})
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither an ISO 8601 time nor an age like 30m or 2h"
        ) from exc
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _add_filters(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("which dead letters (all given must hold)")
    group.add_argument("--stage", action="append", default=[], help="Failed at this stage.")
    group.add_argument("--reason", action="append", default=[], help="Failed for this reason.")
    group.add_argument("--id", action="append", default=[], help="This event id, exactly.")
    group.add_argument(
        "--id-glob", action="append", default=[], metavar="PATTERN", help="Ids matching a glob."
    )
    group.add_argument(
        "--since", type=parse_time, help="Dead-lettered at or after (ISO 8601 or an age: 2h)."
    )
    group.add_argument("--until", type=parse_time, help="Dead-lettered before this time.")
    group.add_argument(
        "--partition", type=int, action="append", default=[], help="In this partition."
    )
    group.add_argument("--from-offset", type=int, help="At or after this offset.")
    group.add_argument("--to-offset", type=int, help="At or before this offset.")


def _selection(args: argparse.Namespace) -> DeadLetterFilter:
    from_offset, to_offset = args.from_offset, args.to_offset
    if getattr(args, "offset", None) is not None:
        from_offset = to_offset = args.offset
    return DeadLetterFilter(
        stages=frozenset(args.stage),
        reasons=frozenset(args.reason),
        ids=frozenset(args.id),
        id_globs=tuple(args.id_glob),
        since=args.since,
        until=args.until,
        partitions=frozenset(args.partition),
        from_offset=from_offset,
        to_offset=to_offset,
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trident-dlq",
        description="Inspect and replay the dead-letter topic (kafka.dead_letter_topic).",
        epilog="Exit status: 0 success, 1 something not replayed or not found, or Kafka "
        "unreachable, 2 cannot run.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    inspect = commands.add_parser(
        "inspect",
        help="Counts, samples, one record in full, or JSON lines.",
        description="Counts by stage and reason, source topic and time window, with samples. "
        "With --offset or --id: the records in full. With --json: one object per record.",
    )
    add_common_arguments(inspect)
    _add_filters(inspect)
    inspect.add_argument(
        "--offset", type=int, help="Show the record at this offset in full (with --partition)."
    )
    inspect.add_argument("--json", action="store_true", help="One JSON object per record.")
    inspect.add_argument(
        "--samples", type=int, default=3, help="Samples per stage and reason (default 3)."
    )
    inspect.add_argument(
        "--window", choices=sorted(_WINDOWS), default="hour", help="Time window of the counts."
    )

    replay_parser = commands.add_parser(
        "replay",
        help="Republish chosen dead letters to the retry topic (the workers consume it).",
        description="Republish the chosen dead letters (key, value and original headers) to "
        "the retry topic, each to the partition it failed in, with a replay count; records at "
        "the cap are refused.",
    )
    add_common_arguments(replay_parser)
    _add_filters(replay_parser)
    replay_parser.add_argument(
        "--dry-run", action="store_true", help="List what would be replayed; publish nothing."
    )
    replay_parser.add_argument("--rate", type=float, help="At most this many records a second.")
    replay_parser.add_argument(
        "--max-replays",
        type=int,
        default=DEFAULT_MAX_REPLAYS,
        help=f"Refuse records replayed this many times already (default {DEFAULT_MAX_REPLAYS}).",
    )
    replay_parser.add_argument(
        "--topic",
        help="Publish to this topic instead of the retry topic (kafka.retry_topic, default "
        "'<kafka.topic>.retry').",
    )
    add_status_command(commands, add_common_arguments)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = settings_from_arguments(args)
    except ConfigurationError as exc:
        logger.error("%s", exc)
        return 2
    try:
        require_broker(settings.kafka, timeout_s=settings.kafka.connect_timeout_s)
        if args.command == "status":
            return run_status(args, settings)
        with DeadLetterReader(settings.kafka) as reader:
            records = reader.read(_selection(args))
            if args.command == "inspect":
                return _inspect(args, reader.topic, records)
            return _replay(args, settings, list(records))
    except ConfigurationError as exc:
        logger.error("%s", exc)
        return 2
    except BrokerUnavailableError as exc:
        logger.error("%s", exc)
        if args.command == "inspect":
            topic = settings.kafka.dead_letter_topic
            print(f"dead-letter topic {topic}: not read (Kafka unavailable)")
        else:  # replaying a record twice is harmless: the stale-version guard keeps the newest
            print("replay incomplete (Kafka unavailable): run it again once Kafka answers")
        return 1


# inspect ----------------------------------------------------------------------------------


def _inspect(args: argparse.Namespace, topic: str, records: Iterable[DeadLetterRecord]) -> int:
    if args.json:
        for record in records:
            print(orjson.dumps(record.to_json()).decode())
        return 0
    if args.offset is not None or args.id:
        shown = 0
        for record in records:
            _print_record(record)
            shown += 1
        if not shown:
            print("no such record")
        return 0 if shown else 1
    _print_counts(topic, list(records), samples=args.samples, window=_WINDOWS[args.window])
    return 0


def _print_counts(
    topic: str, records: list[DeadLetterRecord], *, samples: int, window: str
) -> None:
    print(f"dead-letter topic {topic}: {len(records)} record{'' if len(records) == 1 else 's'}")
    if not records:
        return
    _print_table("by stage/reason", Counter(f"{r.stage}/{r.reason}" for r in records))
    _print_table("by source topic", Counter(r.source_topic for r in records))
    _print_table(
        "by time dead-lettered (UTC)",
        Counter(
            r.dead_lettered_at.strftime(window) if r.dead_lettered_at else "unknown"
            for r in records
        ),
        sort_by_key=True,
    )
    if samples > 0:
        print("samples:")
        shown: Counter[tuple[str, str]] = Counter()
        for record in records:
            kind = (record.stage, record.reason)
            if shown[kind] < samples:
                shown[kind] += 1
                print(f"  {_one_line(record)}")


def _print_table(title: str, counts: Counter[str], *, sort_by_key: bool = False) -> None:
    print(f"{title}:")
    rows = sorted(counts.items()) if sort_by_key else counts.most_common()
    width = max(len(name) for name, _ in rows)
    for name, count in rows:
        print(f"  {name:<{width}}  {count}")


def _one_line(record: DeadLetterRecord) -> str:
    data = record.to_json()
    message = (data["error"]["message"] or "").splitlines()[0:1]
    return (
        f"[{record.partition}:{record.offset}] {record.id}  {record.stage}/{record.reason}  "
        f"attempts={data['attempts']} replays={record.replay_count}  {''.join(message)[:120]}"
    )


def _print_record(record: DeadLetterRecord) -> None:
    data = record.to_json()
    source = data["source"]
    print(f"partition {record.partition} offset {record.offset}")
    for label, value in (
        ("id", data["id"]),
        ("dead-lettered at", data["dead_lettered_at"]),
        ("stage / reason", f"{record.stage} / {record.reason}"),
        ("attempts", data["attempts"]),
        ("first failed at", data["first_failed_at"]),
        ("replay count", record.replay_count),
        ("source", f"{source['topic']} partition {source['partition']} offset {source['offset']}"),
        ("error", f"{data['error']['class']}: {data['error']['message']}"),
    ):
        print(f"  {label + ':':<18}{value}")
    print("  headers:")
    for key, value in record.headers:
        print(f"    {key}: {value.decode(errors='replace') if value is not None else ''}")
    print("  value:")
    event = record.event()
    text = (
        orjson.dumps(event, option=orjson.OPT_INDENT_2).decode()
        if event is not None
        else (record.value or b"").decode(errors="replace")
    )
    for line in text.splitlines():
        print(f"    {line}")
    print()


# replay -----------------------------------------------------------------------------------


def _replay(args: argparse.Namespace, settings: Settings, records: list[DeadLetterRecord]) -> int:
    plan = plan_replay(records, max_replays=args.max_replays)
    topics = settings.kafka.topics()
    topic = args.topic or topics.retry
    for record, why in plan.refused:
        print(f"refused [{record.partition}:{record.offset}] {record.id}: {why}")
    if args.dry_run:
        for record in plan.replay:
            print(
                f"would replay [{record.partition}:{record.offset}] {record.id} "
                f"({record.stage}/{record.reason}) to {topic} as replay {record.replay_count + 1}"
            )
        print(
            f"dry run, nothing published: would_replay={len(plan.replay)} "
            f"refused={len(plan.refused)} duplicates={len(plan.duplicates)}"
        )
        return 1 if plan.refused else 0

    failures: list[str] = []

    with progress_bar(len(plan.replay), "replaying") as advance:

        def answered(record: DeadLetterRecord, delivery: Delivery) -> None:
            if not delivery.ok:
                failures.append(
                    f"[{record.partition}:{record.offset}] {record.id}: {delivery.error}"
                )
            advance(1)

        with EventPublisher(settings.kafka, topic=topic) as publisher:
            report = replay(
                plan.replay,
                publisher,
                rate_per_s=args.rate,
                on_delivery=answered,
                # The failed partition's number is the id's partition in the topics the workers
                # consume (co-partitioned); another topic may not even have that partition.
                keep_partition=topic in topics.consumed,
            )
    for failure in failures:
        print(f"failed {failure}")
    print(
        f"replayed={report.delivered} failed={report.failed} refused={len(plan.refused)} "
        f"duplicates={len(plan.duplicates)} to {topic}"
    )
    return 1 if plan.refused or report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
