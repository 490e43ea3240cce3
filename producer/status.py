"""Where is my image? The status of one item id, from every place a record of it can be.

An id is, in a collection:

- **stored**: Milvus holds its row (the row's version);
- **deleted**: Milvus keeps the tombstone of a delete newer than any row of it;
- **dead_lettered**: its newest dead letter (stage, reason, when) is newer than what is stored;
- **pending**: a record of it on a topic the workers consume (the ingest topic, or the retry
  topic where re-queued records and replays wait) is past the worker group's committed offset
  of its partition (published, not yet processed), and newer than the above;
- **unknown**: none of these.

Precedence: the newest version wins among the stored fact and the newest dead letter (the stored
fact on a tie, or when the dead letter's version cannot be read); a pending record wins when it
is newer than both, or when its version cannot be read (it is not processed yet, whatever it
holds); on a tie the settled fact wins (the record was processed between the two reads), except
a dead letter that the pending record was published after (its replay, not yet processed).

Each lookup (:meth:`ItemStatusFinder.status`) reads, in this order, so that a record the workers
process meanwhile is never missed (a worker writes Milvus or the dead letter before it commits):

1. the worker group's committed offsets and the ends of the ingest and retry topics; the
   uncommitted tail of each partition is scanned for the id's key (the partition librdkafka's
   default partitioner gives the key first; all of them, for records of other partitioners),
   up to the deadline;
2. the dead-letter topic's ends; the dead letters are looked up in a :class:`DeadLetterIndex`
   once it has read up to those ends (the query API keeps one, tailing the topic in the
   background; the command line reads the topic once, keeping the id's records alone), and the
   newest one is read back for its stage, reason, time and message;
3. Milvus, at Strong consistency (:meth:`VectorStore.stored_versions`).

What the deadline cut short is said in the answer (``complete`` false), never guessed.

The index keeps, per (collection, id), the version and place of the newest dead letter only
(about 275 bytes an id plus the id; ``max_entries`` bounds it, evicting the ids dead-lettered
longest ago);
benchmarks/bench_status.py measures it (docs/OPERATIONS.md, "Item status").

``trident-dlq status ID`` is the command-line form (:func:`add_status_command`).
"""

from __future__ import annotations

import argparse
import itertools
import logging
import threading
import time
import uuid
import zlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Literal, NamedTuple

import orjson
from confluent_kafka import OFFSET_INVALID, Consumer, KafkaException, Message, TopicPartition

from engine.cli_support import configure_logging
from engine.errors import (
    BrokerUnavailableError,
    ConfigurationError,
    PermanentError,
    RetriableError,
)
from engine.kafka import consumer_config
from engine.settings import ApiSettings, KafkaSettings, Settings
from producer.dead_letters import DeadLetterRecord, record_time
from schemas import ContractError, decode_delete
from schemas.api import DeadLetterSummary, ItemStatus, PendingRecord, StoredFact
from schemas.dead_letter import HEADER_EXCEPTION_MESSAGE

if TYPE_CHECKING:  # pymilvus, which trident-dlq's other commands never load
    from engine.records import StoredVersion
    from engine.store import VectorStore

logger = logging.getLogger(__name__)

Operation = Literal["upsert", "delete"]

# The query API's settings (api.status_deadline_s, api.status_index_max_ids) say both; the
# command line takes --deadline.
STATUS_DEADLINE_S: float = ApiSettings.model_fields["status_deadline_s"].default
# Ids the index keeps (about 275 bytes each plus the id: docs/OPERATIONS.md).
DEFAULT_MAX_ENTRIES: int = ApiSettings.model_fields["status_index_max_ids"].default
# When the index is full, this share of its entries, dead-lettered longest ago, goes at once.
_EVICT_SHARE = 0.1
# How often the index looks for new partitions of the dead-letter topic (or for the topic).
_REFRESH_S = 10.0
_DETAIL_CHARS = 1000
_BATCH = 1000
_METADATA_TIMEOUT_S = 5.0


class _Seen(NamedTuple):
    """What a record of the ingest or dead-letter topic says of its id."""

    id: str
    collection: str | None
    operation: Operation
    version: int | None


def read_record(message: Message) -> _Seen | None:
    """The id, collection, operation and version a record stands for (None: no id at all).

    A tombstone is a delete (``schemas.deletes``); any other record an upsert, whose fields are
    read leniently: what cannot be read is None, as the worker would dead-letter such a record.
    """
    key, value = message.key(), message.value()
    if value is None:
        if not key:
            return None
        _kind, timestamp_ms = message.timestamp()
        try:
            delete = decode_delete(key, _headers(message), timestamp_ms=timestamp_ms)
        except ContractError:
            return _Seen(key.decode(errors="replace"), None, "delete", None)
        return _Seen(delete.id, delete.collection, "delete", delete.version)
    try:
        event = orjson.loads(value)
    except orjson.JSONDecodeError:
        event = None
    fields = event if isinstance(event, dict) else {}
    named = fields.get("id")
    item_id = key.decode(errors="replace") if key else named if isinstance(named, str) else None
    if not item_id:
        return None
    collection = fields.get("collection")
    version = fields.get("version")
    return _Seen(
        item_id,
        collection if isinstance(collection, str) else None,
        "upsert",
        version if isinstance(version, int) and not isinstance(version, bool) else None,
    )


def _headers(message: Message) -> list[tuple[str, str | bytes | None]]:
    received = message.headers() or []
    return list(received.items()) if isinstance(received, dict) else received


def key_partition(key: bytes, partitions: int) -> int:
    """The partition librdkafka's default partitioner (``consistent_random``: CRC-32 of the key)
    gives a key; every publisher of this project uses it."""
    return zlib.crc32(key) % partitions


class _Entry(NamedTuple):
    """The newest dead letter of an id: its version (-1 unknown) and where it is."""

    version: int
    partition: int
    offset: int


def _index_key(collection: str | None, item_id: str) -> str:
    # NUL is in neither a collection name nor an id, so the pair is unambiguous.
    return f"{collection or ''}\x00{item_id}"


class DeadLetterIndex:
    """The newest dead letter of each (collection, id), kept by reading the dead-letter topic
    from its beginning: in a background thread (:meth:`start`, the query API) or on demand
    (:meth:`read_until`, one lookup). It joins no consumer group and commits nothing.

    ``only_id``: keep that id's dead letters alone (a one-off lookup reads the topic faster).
    ``max_entries``: past it, the ids dead-lettered longest ago are forgotten, and
    :attr:`evicted` counts them (a lookup of a forgotten id may then miss its dead letter).
    """

    def __init__(
        self,
        settings: KafkaSettings,
        *,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        only_id: str | None = None,
    ) -> None:
        self.topic = settings.dead_letter_topic
        self._consumer = Consumer(
            consumer_config(
                settings,
                **{
                    # Never joins nor commits: librdkafka wants a group id all the same.
                    "group.id": f"trident-status-{uuid.uuid4().hex[:8]}",
                    "enable.auto.commit": False,
                    "enable.auto.offset.store": False,
                },
            )
        )
        self._max_entries = max_entries
        self._only = only_id
        self._only_key = only_id.encode() if only_id is not None else None
        self._entries: dict[str, _Entry] = {}
        self._positions: dict[int, int] = {}  # partition -> next offset to read
        self._changed = threading.Condition()
        self._refresh = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.records_read = 0
        self.evicted = 0

    @property
    def size(self) -> int:
        """How many ids it holds."""
        with self._changed:
            return len(self._entries)

    def start(self) -> None:
        """Read the topic in a background thread from now on, following new records."""
        self._thread = threading.Thread(target=self._run, name="dead-letter-index", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._consumer.close()

    def wait_until(self, ends: dict[int, int], deadline: float) -> bool:
        """Wait until the background thread has read each partition up to ``ends``; False when
        the monotonic ``deadline`` came first."""
        with self._changed:
            while not self._reached(ends):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                if any(partition not in self._positions for partition in ends):
                    self._refresh.set()  # a partition (or the topic) it does not read yet
                self._changed.wait(min(remaining, 0.1))
            return True

    def read_until(self, ends: dict[int, int], deadline: float) -> bool:
        """Read, in this thread, each partition up to ``ends``; False when the monotonic
        ``deadline`` came first. Not beside :meth:`start`.

        Raises:
            BrokerUnavailableError: Kafka did not answer a metadata request.
        """
        self._assign()
        while not self._reached(ends):
            if time.monotonic() >= deadline:
                return False
            self._poll(min(0.2, max(0.01, deadline - time.monotonic())))
        return True

    def find(self, item_id: str, collection: str, *, default: bool) -> _Entry | None:
        """The newest dead letter of ``item_id`` in ``collection`` (also of records naming no
        collection when it is the ``default`` one)."""
        with self._changed:
            found = [self._entries.get(_index_key(collection, item_id))]
            if default:
                found.append(self._entries.get(_index_key(None, item_id)))
        entries = [entry for entry in found if entry is not None]
        return max(entries, key=lambda e: (e.version, e.offset)) if entries else None

    # The reading --------------------------------------------------------------------------

    def _run(self) -> None:
        refresh_at = 0.0
        while not self._stop.is_set():
            try:
                if time.monotonic() >= refresh_at or self._refresh.is_set():
                    self._refresh.clear()
                    refresh_at = time.monotonic() + _REFRESH_S
                    self._assign()
                if not self._positions:  # no topic yet
                    self._stop.wait(0.5)
                    continue
                self._poll(0.2)
            except (KafkaException, BrokerUnavailableError) as exc:
                logger.warning("dead-letter index of %s: %s; trying again", self.topic, exc)
                self._stop.wait(1.0)
            except Exception:
                # A bug must not end the thread: every status would then wait out its deadline.
                logger.exception("dead-letter index of %s failed; trying again", self.topic)
                self._stop.wait(1.0)

    def _assign(self) -> None:
        """Start reading partitions not read yet, from their beginning."""
        partitions = _partitions(self._consumer, self.topic)
        new = [p for p in partitions if p not in self._positions]
        if not new:
            return
        starts = {p: _watermarks(self._consumer, self.topic, p)[0] for p in new}
        self._consumer.incremental_assign(
            [TopicPartition(self.topic, p, start) for p, start in starts.items()]
        )
        with self._changed:
            self._positions.update(starts)
            self._changed.notify_all()

    def _poll(self, timeout_s: float) -> None:
        messages = self._consumer.consume(_BATCH, timeout=timeout_s)
        seen = [
            (message, found)
            for message in messages
            if message.error() is None and (found := self._wanted(message)) is not None
        ]
        # The positions pass what no message shows too (transaction markers, compacted gaps).
        assigned = [TopicPartition(self.topic, p) for p in self._positions]
        positions = {tp.partition: tp.offset for tp in self._consumer.position(assigned)}
        with self._changed:
            for message, found in seen:
                self._add(found, message.partition() or 0, message.offset() or 0)
            for message in messages:
                if message.error() is None:
                    partition = message.partition() or 0
                    next_offset = (message.offset() or 0) + 1
                    self._positions[partition] = max(self._positions[partition], next_offset)
            for partition, offset in positions.items():
                if offset >= 0:
                    self._positions[partition] = max(self._positions[partition], offset)
            self.records_read += len(messages)
            self._changed.notify_all()

    def _wanted(self, message: Message) -> _Seen | None:
        key = message.key()
        if self._only_key is not None and key is not None and key != self._only_key:
            return None  # not parsed: the one-off lookup's shortcut
        found = read_record(message)
        if found is None or (self._only is not None and found.id != self._only):
            return None
        return found

    def _add(self, found: _Seen, partition: int, offset: int) -> None:
        key = _index_key(found.collection, found.id)
        version = found.version if found.version is not None else -1
        kept = self._entries.get(key)
        if kept is not None:
            if version < kept.version:
                return  # an older version failing later (a replay) does not hide a newer one
            del self._entries[key]  # to the end: eviction goes from the front
        self._entries[key] = _Entry(version, partition, offset)
        if len(self._entries) > self._max_entries:
            dropped = max(1, int(self._max_entries * _EVICT_SHARE))
            for old in list(itertools.islice(self._entries, dropped)):
                del self._entries[old]
            self.evicted += dropped

    def _reached(self, ends: dict[int, int]) -> bool:
        return all(self._positions.get(p, -1) >= end for p, end in ends.items())


class ItemStatusFinder:
    """Answers :class:`~schemas.api.ItemStatus` lookups (module docstring).

    ``index``: a started :class:`DeadLetterIndex` (the query API's); None reads the dead-letter
    topic once per lookup, for the id alone (the command line). Lookups are answered one at a
    time (one consumer reads the topics); each within about ``deadline_s`` plus the Milvus read.
    """

    def __init__(
        self,
        settings: KafkaSettings,
        store: VectorStore,
        *,
        index: DeadLetterIndex | None = None,
        deadline_s: float = STATUS_DEADLINE_S,
    ) -> None:
        self._settings = settings
        self._store = store
        self._index = index
        self._deadline_s = deadline_s
        # The worker group's id, to read its committed offsets: it never joins nor commits.
        self._consumer = Consumer(
            consumer_config(
                settings,
                **{
                    "enable.auto.commit": False,
                    "enable.auto.offset.store": False,
                    # A fetch still waiting for data (500 ms by default) holds up the offset
                    # requests behind it on the connection: each lookup's scans end in one.
                    "fetch.wait.max.ms": 20,
                },
            )
        )
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            self._consumer.close()

    def status(self, item_id: str, collection: str | None = None) -> ItemStatus:
        """Where ``item_id`` is in ``collection`` (default: the store's default collection).

        Raises:
            UnknownCollectionError: no such collection.
            BrokerUnavailableError: Kafka did not answer.
            StoreUnavailableError: Milvus did not answer.
        """
        deadline = time.monotonic() + self._deadline_s
        name = collection or self._store.default_collection
        default = name == self._store.default_collection
        self._store.describe_collection(name)
        with self._lock:
            pending, complete = self._pending(item_id, name, deadline)
            ends = _ends(self._consumer, self._settings.dead_letter_topic)
        index = (
            self._index
            if self._index is not None
            else DeadLetterIndex(self._settings, only_id=item_id)
        )
        try:
            if self._index is None:
                caught_up = index.read_until(ends, deadline)
            else:
                caught_up = index.wait_until(ends, deadline)
            entry = index.find(item_id, name, default=default)
        finally:
            if self._index is None:
                index.close()
        letter = None
        if entry is not None:
            with self._lock:
                letter = self._read_back(entry, deadline)
            caught_up = caught_up and letter is not None
        # Where the name points now (an alias moves; the store's descriptions are cached).
        stored_in = self._store.resolve_alias(name)
        stored = self._store.stored_versions([item_id], stored_in, consistency="Strong").get(
            item_id
        )
        return decide(
            item_id,
            name,
            stored=stored,
            pending=pending,
            letter=letter,
            # Forgotten ids (a full index) may have had a dead letter: not found is not sure.
            complete=complete
            and caught_up
            and (entry is not None or self._index is None or not self._index.evicted),
        )

    def _pending(
        self, item_id: str, collection: str, deadline: float
    ) -> tuple[PendingRecord | None, bool]:
        """The newest unprocessed record of the id on the topics the workers consume (the
        ingest topic, and the retry topic where re-queued records and replays wait), and
        whether every partition's uncommitted tail was scanned before the deadline."""
        found: PendingRecord | None = None
        for topic in self._settings.topics().consumed:
            record, finished = self._pending_on(topic, item_id, collection, deadline)
            if record is not None and (found is None or _newer(record, found)):
                found = record
            if not finished:
                return found, False
        return found, True

    def _pending_on(
        self, topic: str, item_id: str, collection: str, deadline: float
    ) -> tuple[PendingRecord | None, bool]:
        """:meth:`_pending` for one topic."""
        partitions = _partitions(self._consumer, topic, missing_ok=True)
        if not partitions:
            return None, True
        key = item_id.encode()
        first = key_partition(key, len(partitions))
        order = [first, *(p for p in partitions if p != first)]
        try:
            committed = self._consumer.committed(
                [TopicPartition(topic, p) for p in partitions], timeout=_METADATA_TIMEOUT_S
            )
        except KafkaException as exc:
            raise BrokerUnavailableError(
                f"Kafka did not say the workers' committed offsets of {topic}: {exc}"
            ) from exc
        start_of = {tp.partition: tp.offset for tp in committed}
        found: PendingRecord | None = None

        def ours(message: Message) -> bool:
            # Keyless records name their id in the value only.
            return message.key() == key or (message.key() is None and message.value() is not None)

        for partition in order:
            low, high = _watermarks(self._consumer, topic, partition)
            start = start_of.get(partition, OFFSET_INVALID)
            start = low if start < 0 else max(start, low)  # never committed: from the start
            if start >= high:
                continue
            matches, finished = _scan(
                self._consumer,
                topic,
                partition,
                start=start,
                end=high,
                deadline=deadline,
                wanted=ours,
            )
            for message in matches:
                seen = read_record(message)
                if seen is None or seen.id != item_id:
                    continue
                if (seen.collection or self._store.default_collection) != collection:
                    continue
                candidate = PendingRecord(
                    operation=seen.operation,
                    version=seen.version,
                    topic=topic,
                    partition=partition,
                    offset=message.offset() or 0,
                    published_at=record_time(message),
                )
                if found is None or _newer(candidate, found):
                    found = candidate
            if not finished:
                return found, False
        return found, True

    def _read_back(self, entry: _Entry, deadline: float) -> DeadLetterSummary | None:
        """The dead letter at the entry's place, summarised; None if it could not be read in
        time (or is gone: the topic's retention)."""
        topic = self._settings.dead_letter_topic
        # At least a second: the deadline may be spent by now, and this is one record.
        until = max(deadline, time.monotonic() + 1.0)
        matches, _ = _scan(
            self._consumer,
            topic,
            entry.partition,
            start=entry.offset,
            end=entry.offset + 1,
            deadline=until,
            wanted=lambda message: True,
        )
        if not matches:
            return None
        record = DeadLetterRecord.from_message(matches[0])
        seen = read_record(matches[0])
        return DeadLetterSummary(
            operation=seen.operation if seen else "upsert",
            version=seen.version if seen else None,
            stage=record.stage,
            reason=record.reason,
            detail=(record.header(HEADER_EXCEPTION_MESSAGE) or "")[:_DETAIL_CHARS],
            dead_lettered_at=record.dead_lettered_at,
            partition=entry.partition,
            offset=entry.offset,
        )


def decide(
    item_id: str,
    collection: str,
    *,
    stored: StoredVersion | None,
    pending: PendingRecord | None,
    letter: DeadLetterSummary | None,
    complete: bool = True,
) -> ItemStatus:
    """The status the facts found make (precedence: module docstring)."""
    answer = ItemStatus(
        id=item_id,
        collection=collection,
        state="unknown",
        version=None,
        stored=StoredFact(version=stored.event_version, deleted=stored.deleted) if stored else None,
        pending=pending,
        dead_letter=letter,
        complete=complete,
    )
    settled: tuple[str, int | None] | None = None
    if stored is not None:
        settled = ("deleted" if stored.deleted else "stored", stored.event_version)
    if letter is not None and (
        settled is None
        or (letter.version is not None and settled[1] is not None and letter.version > settled[1])
    ):
        settled = ("dead_lettered", letter.version)
    if pending is not None and (
        settled is None
        or pending.version is None
        or settled[1] is None
        or pending.version > settled[1]
        or (settled[0] == "dead_lettered" and _replayed_after(pending, letter))
    ):
        settled = ("pending", pending.version)
    if settled is not None:
        state, version = settled
        answer = answer.model_copy(update={"state": state, "version": version})
    return answer


def _replayed_after(pending: PendingRecord, letter: DeadLetterSummary | None) -> bool:
    """Whether ``pending`` ties with the dead letter and was published after it was written:
    the dead letter replayed, not yet processed again (a version tie cannot tell)."""
    return (
        letter is not None
        and pending.version == letter.version
        and pending.published_at is not None
        and letter.dead_lettered_at is not None
        and pending.published_at > letter.dead_lettered_at
    )


def _newer(candidate: PendingRecord, kept: PendingRecord) -> bool:
    """Whether ``candidate`` is the newer of two unprocessed records of one id: the higher
    version (unknown ones count as newest: nothing can be said of them), then the later offset
    in one partition (on a tie across topics the first kept, the ingest topic's, stays)."""
    unknown = 2**63
    mine = candidate.version if candidate.version is not None else unknown
    theirs = kept.version if kept.version is not None else unknown
    if mine != theirs:
        return mine > theirs
    same_partition = (candidate.topic, candidate.partition) == (kept.topic, kept.partition)
    return same_partition and candidate.offset > kept.offset


# Kafka reads ------------------------------------------------------------------------------------


def _partitions(consumer: Consumer, topic: str, *, missing_ok: bool = False) -> list[int]:
    """The topic's partitions; [] for no such topic (when ``missing_ok`` or not yet made).

    Raises:
        BrokerUnavailableError: Kafka did not answer.
    """
    try:
        metadata = consumer.list_topics(topic, timeout=_METADATA_TIMEOUT_S)
    except KafkaException as exc:
        raise BrokerUnavailableError(f"Kafka did not describe topic {topic}: {exc}") from exc
    found = metadata.topics.get(topic)
    if found is None or found.error is not None or not found.partitions:
        if not missing_ok:
            logger.debug("topic %s does not exist (yet)", topic)
        return []
    return sorted(found.partitions)


def _watermarks(consumer: Consumer, topic: str, partition: int) -> tuple[int, int]:
    try:
        low, high = consumer.get_watermark_offsets(
            TopicPartition(topic, partition), timeout=_METADATA_TIMEOUT_S
        )
    except KafkaException as exc:
        raise BrokerUnavailableError(
            f"Kafka did not say the ends of {topic}[{partition}]: {exc}"
        ) from exc
    return int(low), int(high)


def _ends(consumer: Consumer, topic: str) -> dict[int, int]:
    """Each partition's end (its high watermark) now; {} for no such topic."""
    return {p: _watermarks(consumer, topic, p)[1] for p in _partitions(consumer, topic)}


def _scan(
    consumer: Consumer,
    topic: str,
    partition: int,
    *,
    start: int,
    end: int,
    deadline: float,
    wanted: Callable[[Message], bool],
) -> tuple[list[Message], bool]:
    """The ``wanted`` records of ``topic[partition]`` in ``[start, end)``, and whether the whole
    range was read before the monotonic ``deadline``."""
    found: list[Message] = []
    position = start
    consumer.assign([TopicPartition(topic, partition, start)])
    try:
        while position < end:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return found, False
            # No more than are left: consume returns once it has them, not at its timeout.
            wanted_now = max(1, min(_BATCH, end - position))
            for message in consumer.consume(wanted_now, timeout=min(0.2, remaining)):
                if message.error() is None and (message.offset() or 0) < end and wanted(message):
                    found.append(message)
            # The position passes what no message shows too (transaction markers).
            at = consumer.position([TopicPartition(topic, partition)])[0].offset
            position = max(position, at)
        return found, True
    finally:
        consumer.unassign()


# Command line -----------------------------------------------------------------------------------


def add_status_command(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
    common: Callable[[argparse.ArgumentParser], None],
) -> None:
    """The ``status`` command of ``trident-dlq``; ``common`` adds the shared options."""
    parser = commands.add_parser(
        "status",
        help="Where an item is: stored, pending, dead_lettered, deleted or unknown.",
        description="Where an item id is: stored (with its version), pending (published, not "
        "yet processed by the worker group), dead_lettered (stage, reason, when), deleted or "
        "unknown. Reads the ingest topic's unprocessed records, the dead-letter topic and "
        "Milvus. Exit status: 0 answered, 1 Kafka or Milvus unavailable, 2 cannot run (no such "
        "collection, bad settings).",
    )
    common(parser)
    parser.add_argument("item_id", metavar="ID", help="The item id, exactly.")
    parser.add_argument("--collection", help="The collection (default: milvus.collection).")
    parser.add_argument("--json", action="store_true", help="Print the status as JSON.")
    parser.add_argument(
        "--deadline",
        type=float,
        default=30.0,
        help="Seconds to search the topics for (default 30; a larger dead-letter topic takes "
        "longer to read).",
    )


def run_status(args: argparse.Namespace, settings: Settings) -> int:
    """``trident-dlq status``: print where the item is (exit status: :func:`add_status_command`)."""
    from engine.store import VectorStore  # noqa: PLC0415 (see the imports)

    configure_logging(args.log_level)  # again: importing pymilvus reconfigured its loggers
    store = VectorStore(settings.milvus)
    finder = ItemStatusFinder(settings.kafka, store, deadline_s=args.deadline)
    try:
        status = finder.status(args.item_id, args.collection)
    except (ConfigurationError, PermanentError) as exc:
        logger.error("%s", exc)
        return 2
    except RetriableError as exc:
        logger.error("%s", exc)
        return 1
    finally:
        finder.close()
        store.close()
    if args.json:
        print(status.model_dump_json())
    else:
        for line in describe(status):
            print(line)
    return 0


def describe(status: ItemStatus) -> list[str]:
    """``status`` as lines for people."""
    version = f" (version {status.version})" if status.version is not None else ""
    lines = [f"{status.id} in {status.collection}: {status.state}{version}"]
    if status.stored is not None:
        what = "deleted" if status.stored.deleted else "stored"
        lines.append(f"  store:       {what}, version {status.stored.version}")
    if status.pending is not None:
        p = status.pending
        lines.append(
            f"  pending:     {p.operation}, version {p.version}, {p.topic} partition "
            f"{p.partition} offset {p.offset}"
        )
    if status.dead_letter is not None:
        d = status.dead_letter
        at = d.dead_lettered_at.isoformat() if d.dead_lettered_at else "unknown time"
        lines.append(
            f"  dead letter: {d.operation}, version {d.version}, {d.stage}/{d.reason} at {at}, "
            f"partition {d.partition} offset {d.offset}"
        )
        if d.detail:
            lines.append(f"               {d.detail.splitlines()[0][:200]}")
    if not status.complete:
        lines.append("  (incomplete: the deadline cut the search short; ask again)")
    return lines
