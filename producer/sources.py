"""What ``trident-produce`` publishes: entries gathered from paths, globs, folders, URLs, list
files and manifests, each turned into an ingest event on demand.

An :class:`Entry` knows where it came from (``origin``: a path, a URL, or ``FILE:LINE`` for a
line of a list file or manifest). A bad entry (a manifest line that does not parse, a file that
is missing, an event over a limit) raises :class:`EntryError` from :func:`build_event` naming
its origin, and the other entries go on. Relative paths in a list file or manifest are relative
to that file's folder.

Manifests are JSONL (one object a line) or CSV (a header row), told apart by the file suffix.
Columns: ``source`` (a path or http(s) URL, required), ``id``, ``collection``, ``metadata`` (a
JSON object); any other column is one metadata entry (empty CSV cells are left out).

Deletes (``trident-produce --delete``) are gathered the same way as :class:`DeleteEntry` items:
ids on the command line, one id a line in list files (``#`` comments, blank lines skipped,
surrounding spaces stripped), and the ``id`` column of manifests (required there; ``collection``
optional; other columns ignored, so a manifest that was published can delete what it names
when it gives ids). :func:`build_delete` turns one into a :class:`~schemas.DeleteEvent`.
"""

from __future__ import annotations

import csv
import glob
import io
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from pydantic import ValidationError

from engine.errors import EntryError, SourceError
from producer.publisher import event_for_reference, folder_metadata, image_files, stable_id
from schemas import (
    DEFAULT_EVENT_LIMITS,
    DeleteEvent,
    EventLimitError,
    EventLimits,
    IngestEvent,
)
from schemas.errors import validation_problems

MANIFEST_COLUMNS = ("id", "source", "collection", "metadata")
_JSONL_SUFFIXES = frozenset({".jsonl", ".ndjson", ".json"})


@dataclass(frozen=True)
class EventOptions:
    """How entries become events: the command line's choices."""

    inline: bool = False
    collection: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    id_prefix: str = ""
    generate_ids: bool = False
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    limits: EventLimits = DEFAULT_EVENT_LIMITS


@dataclass(frozen=True)
class Entry:
    """One image to publish, or a line that could not be read (``problem``)."""

    origin: str
    reference: str = ""
    event_id: str | None = None
    # Ids made from a path below this folder are relative to it; otherwise the absolute path.
    id_base: Path | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    collection: str | None = None
    problem: str | None = None


def gather(
    sources: Sequence[str],
    options: EventOptions,
    *,
    list_files: Sequence[Path] = (),
    manifests: Sequence[Path] = (),
) -> list[Entry]:
    """Every entry, in order: the command-line sources, then list files, then manifests.

    Raises:
        SourceError: a list file or manifest cannot be read, or a manifest has no usable header.
    """
    entries = [e for source in sources for e in _expand(source, source, options)]
    for list_file in list_files:
        folder = list_file.resolve().parent
        for number, line in enumerate(_read_lines(list_file), start=1):
            text = line.strip()
            if text and not text.startswith("#"):
                entries += _expand(text, f"{list_file}:{number}", options, base=folder)
    for manifest in manifests:
        entries += read_manifest(manifest)
    return entries


def _expand(
    text: str, origin: str, options: EventOptions, *, base: Path | None = None
) -> Iterator[Entry]:
    """A URL, a folder (walked), a glob pattern or a file; relative to ``base`` when given.

    Ids of files in a walked folder are relative to it; of other files, relative to ``base``
    (a list file's folder), or their absolute path.
    """
    if text.startswith(("http://", "https://")):
        yield Entry(origin, text)
        return
    path = (base or Path.cwd()) / text
    if path.is_dir():
        root = path.resolve()
        for file in image_files(root, include=options.include, exclude=options.exclude):
            category = folder_metadata(file, root, {})
            yield Entry(str(file), str(file), id_base=root, metadata=category)
    elif glob.has_magic(text):
        matches = sorted(Path(m) for m in glob.glob(str(path), recursive=True))
        files = [m for m in matches if m.is_file()]
        if not files:
            yield Entry(origin, problem="no file matches this pattern")
        for file in files:
            yield Entry(str(file), str(file), id_base=base)
    elif path.is_file():
        yield Entry(origin, str(path), id_base=base)
    else:
        yield Entry(origin, problem="no such file or folder")


def read_manifest(manifest: Path) -> list[Entry]:
    """The manifest's entries; a bad line becomes an entry with its ``problem``.

    Raises:
        SourceError: the file cannot be read, its suffix is unknown, or a CSV lacks ``source``.
    """
    base = manifest.resolve().parent
    suffix = manifest.suffix.lower()
    if suffix in _JSONL_SUFFIXES:
        rows = _jsonl_rows(manifest)
    elif suffix == ".csv":
        rows = _csv_rows(manifest)
    else:
        raise SourceError(f"{manifest}: a manifest is .jsonl, .ndjson, .json or .csv")
    return [_manifest_entry(f"{manifest}:{number}", row, base) for number, row in rows]


def _manifest_entry(origin: str, row: dict[str, Any] | str, base: Path) -> Entry:
    if isinstance(row, str):
        return Entry(origin, problem=row)
    row = dict(row)
    source, event_id = row.pop("source", None), row.pop("id", None)
    metadata = row.pop("metadata", None) or {}
    collection = row.pop("collection", None)
    if not isinstance(source, str) or not source:
        return Entry(origin, problem="no source (a path or URL) on this line")
    if event_id is not None and not isinstance(event_id, str):
        return Entry(origin, problem=f"id must be a string, not {type(event_id).__name__}")
    if collection is not None and not isinstance(collection, str):
        return Entry(origin, problem="collection must be a string")
    if not isinstance(metadata, dict):
        return Entry(origin, problem="metadata must be a JSON object")
    reference = source
    if not source.startswith(("http://", "https://")):
        reference = str(base / source)
    return Entry(
        origin,
        reference,
        event_id=event_id or None,
        id_base=base,
        metadata={**row, **metadata},
        collection=collection or None,
    )


def _jsonl_rows(manifest: Path) -> Iterator[tuple[int, dict[str, Any] | str]]:
    for number, line in enumerate(_read_lines(manifest), start=1):
        if not line.strip():
            continue
        try:
            row = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            yield number, f"not valid JSON: {exc}"
            continue
        yield number, row if isinstance(row, dict) else "a manifest line must be a JSON object"


def _csv_rows(
    manifest: Path, required: str = "source"
) -> Iterator[tuple[int, dict[str, Any] | str]]:
    text = "\n".join(_read_lines(manifest))
    reader = csv.DictReader(io.StringIO(text, newline=""), strict=True)
    if not reader.fieldnames or required not in reader.fieldnames:
        raise SourceError(f"{manifest}: the CSV header must name a {required!r} column")
    while True:
        first_line = reader.line_num + 1  # a quoted cell may span lines: report the first
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            yield first_line, f"not valid CSV: {exc}"
            continue
        yield first_line, _csv_row(row)


def _csv_row(row: dict[str | None, Any]) -> dict[str, Any] | str:
    if None in row:
        return "more cells than the header has columns"
    values = {key: value for key, value in row.items() if key and value}
    if "metadata" in values:
        try:
            values["metadata"] = orjson.loads(values["metadata"])
        except orjson.JSONDecodeError as exc:
            return f"the metadata cell is not valid JSON: {exc}"
    return values


def _read_lines(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise SourceError(f"cannot read {path}: {exc}") from exc


def build_event(entry: Entry, options: EventOptions) -> IngestEvent:
    """The entry's event, checked against ``options.limits``.

    Raises:
        EntryError: the entry's line was bad, the file cannot be read, the event is invalid or
            over a limit; the message starts with the entry's origin.
    """
    if entry.problem is not None:
        raise EntryError(f"{entry.origin}: {entry.problem}")
    try:
        event = event_for_reference(
            entry.reference,
            inline=options.inline,
            collection=entry.collection or options.collection,
            metadata={**options.metadata, **entry.metadata},
            event_id=_event_id(entry, options),
            limits=options.limits,
        )
        options.limits.check(event)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'event'}: {err['msg']}"
            for err in exc.errors()
        )
        raise EntryError(f"{entry.origin}: invalid event: {problems}") from exc
    except (EventLimitError, OSError) as exc:
        raise EntryError(f"{entry.origin}: {exc}") from exc
    return event


def _event_id(entry: Entry, options: EventOptions) -> str | None:
    if entry.event_id is not None:
        return entry.event_id
    if options.generate_ids:
        return uuid.uuid4().hex
    if entry.reference.startswith(("http://", "https://")):
        return None  # the URL itself
    path = Path(entry.reference).resolve()
    name = str(path)
    if entry.id_base is not None and path.is_relative_to(entry.id_base.resolve()):
        name = path.relative_to(entry.id_base.resolve()).as_posix()
    return stable_id(options.id_prefix + name, options.limits)


# Deletes ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeleteEntry:
    """One id to delete (from ``collection``, when the line names one), or a line that could not
    be read (``problem``)."""

    origin: str
    id: str = ""
    collection: str | None = None
    problem: str | None = None


def gather_deletes(
    ids: Sequence[str], *, list_files: Sequence[Path] = (), manifests: Sequence[Path] = ()
) -> list[DeleteEntry]:
    """Every id to delete, in order: the command line's, then list files', then manifests'.

    Raises:
        SourceError: a list file or manifest cannot be read, its suffix is unknown, or a CSV
            header lacks ``id``.
    """
    entries = [DeleteEntry(repr(text), text) for text in ids]  # quoted: "''" reads as empty
    for list_file in list_files:
        for number, line in enumerate(_read_lines(list_file), start=1):
            text = line.strip()
            if text and not text.startswith("#"):
                entries.append(DeleteEntry(f"{list_file}:{number}", text))
    for manifest in manifests:
        suffix = manifest.suffix.lower()
        if suffix in _JSONL_SUFFIXES:
            rows = _jsonl_rows(manifest)
        elif suffix == ".csv":
            rows = _csv_rows(manifest, required="id")
        else:
            raise SourceError(f"{manifest}: a manifest is .jsonl, .ndjson, .json or .csv")
        entries += [_delete_entry(f"{manifest}:{number}", row) for number, row in rows]
    return entries


def _delete_entry(origin: str, row: dict[str, Any] | str) -> DeleteEntry:
    if isinstance(row, str):
        return DeleteEntry(origin, problem=row)
    event_id, collection = row.get("id"), row.get("collection")
    if not isinstance(event_id, str) or not event_id:
        return DeleteEntry(origin, problem="no id on this line (a delete needs one)")
    if collection is not None and not isinstance(collection, str):
        return DeleteEntry(origin, problem="collection must be a string")
    return DeleteEntry(origin, event_id, collection or None)


def build_delete(
    entry: DeleteEntry,
    *,
    collection: str | None = None,
    limits: EventLimits = DEFAULT_EVENT_LIMITS,
) -> DeleteEvent:
    """The entry's delete, as of now (its version), from the entry's collection, else
    ``collection``, else (None) the worker's default.

    Raises:
        EntryError: the line was bad, or the id or collection is not valid or the id is over
            ``limits.id_max_bytes``; the message starts with the entry's origin.
    """
    if entry.problem is not None:
        raise EntryError(f"{entry.origin}: {entry.problem}")
    try:
        event = DeleteEvent(id=entry.id, collection=entry.collection or collection)
        limits.check_id(event.id)
    except ValidationError as exc:
        problems = validation_problems(exc, whole="<delete>")
        raise EntryError(f"{entry.origin}: invalid delete: {problems}") from exc
    except EventLimitError as exc:
        raise EntryError(f"{entry.origin}: {exc}") from exc
    return event
