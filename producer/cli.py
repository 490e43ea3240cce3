"""``trident-produce``: publish images (folders, files, URLs) as ingest events."""

from __future__ import annotations

import argparse
import itertools
import logging
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

from engine.cli_support import add_common_arguments, settings_from_arguments
from engine.errors import TridentError
from producer.publisher import EventPublisher, event_for_reference, events_from_folder
from schemas import IngestEvent

logger = logging.getLogger(__name__)


def _parse_metadata(pairs: Sequence[str]) -> dict[str, str]:
    metadata = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"--metadata expects key=value, got {pair!r}")
        metadata[key] = value
    return metadata


def _events(args: argparse.Namespace) -> Iterator[IngestEvent]:
    metadata = _parse_metadata(args.metadata)
    references = list(args.sources)
    if args.from_file:
        lines = Path(args.from_file).read_text().splitlines()
        references += [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    for reference in references:
        if Path(reference).is_dir():
            yield from events_from_folder(
                Path(reference),
                inline=args.inline,
                collection=args.collection,
                metadata=metadata,
                id_prefix=args.id_prefix,
            )
        else:
            yield event_for_reference(
                reference, inline=args.inline, collection=args.collection, metadata=metadata
            )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="trident-produce", description="Publish images as ingest events to Kafka."
    )
    add_common_arguments(parser)
    parser.add_argument(
        "sources", nargs="*", help="Folders (recursively), image files or http(s) URLs."
    )
    parser.add_argument("--from-file", help="A file listing paths/URLs, one per line.")
    parser.add_argument(
        "--inline", action="store_true", help="Carry local files' bytes in the events."
    )
    parser.add_argument(
        "--collection", default=None, help="Target collection (worker default if absent)."
    )
    parser.add_argument("--metadata", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--id-prefix", default="", help="Prefix for ids made from folder paths.")
    parser.add_argument("--limit", type=int, default=None, help="Publish at most this many.")
    parser.add_argument("--topic", default=None, help="Override the ingest topic.")
    args = parser.parse_args(argv)
    settings = settings_from_arguments(args)
    if not args.sources and not args.from_file:
        parser.error("give at least one folder, file or URL (or --from-file)")
    try:
        with EventPublisher(settings.kafka, topic=args.topic) as publisher:
            for event in itertools.islice(_events(args), args.limit):
                publisher.publish(event)
            report = publisher.flush()
    except (TridentError, OSError, ValueError) as exc:
        logger.error("publishing failed: %s", exc)
        return 1
    print(f"delivered={report.delivered} failed={report.failed}")
    return 0 if report.failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
