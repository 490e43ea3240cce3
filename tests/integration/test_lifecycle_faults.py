"""The ingest topic as the log's last word, under faults: a seeded random life of a few hundred
ids (upserts and deletes, versions increasing per id on the ingest topic), older versions
arriving out of order through the side doors (copies of superseded upserts re-published to the
retry topic as a worker's re-queue would, dead letters replayed after their fix, the worker's
own re-queues of images whose host fails at first), while one of two workers is SIGKILLed. At
the end the collection equals each id's last record on the ingest topic (ids, versions,
metadata; a deleted id is absent and its tombstone kept), and a fresh read of the compacted
topic agrees.

Prints ``scenario=lifecycle produced=<n> stored=<n> dead_lettered=<n> lost=<n>`` (``lost``: ids
whose stored state is not their last word) and a line of what the scenario did.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from confluent_kafka import Producer

from devstack.stack import LocalStack
from engine.kafka import ensure_topics, producer_config
from engine.settings import Settings
from engine.store import VectorStore
from producer import EventPublisher
from producer.dlq_cli import main as dlq
from schemas import DeleteEvent, IngestEvent, InlineImage, PathImage, UrlImage, encode_event
from schemas.dead_letter import HEADER_RETRY_ATTEMPTS
from tests.integration.conftest import (
    dead_letters,
    report,
    safe_count,
    small_images,
    wait_for,
    worker_alive,
    worker_processes,
)
from tests.integration.test_compaction import (
    FAST_COMPACTION,
    caught_up,
    last_words,
    read_from_beginning,
    roll_segments,
)
from tests.integration.topics import settings_file
from tests.support.http_host import LoopbackHost, Reply

pytestmark = [pytest.mark.stack, pytest.mark.faults]

SEED = 2022
IDS = 300
# Ops after the first upsert of every id, of which this share are deletes.
LATER_OPS = 320
DELETE_SHARE = 0.35
# Image kinds of upserts (the rest are files that exist).
INLINE_SHARE = 0.1
FLAKY_SHARE = 0.05  # a URL whose host answers 503 three times first: re-queued once
LATE_SHARE = 0.05  # a file that appears only later: dead-lettered, replayed after the fix
RETRY_COPIES = 30  # superseded upserts re-published to the retry topic
FAILURES_PER_URL = 3
RETRY = {"attempts": 3, "initial_backoff_s": 0.05, "max_backoff_s": 0.2, "pause_s": 0.5}


def flaky_host(png: bytes) -> LoopbackHost:
    """A loopback image host: each path answers 503 ``FAILURES_PER_URL`` times, then a PNG."""
    return LoopbackHost(
        lambda _path, nth: Reply(503) if nth <= FAILURES_PER_URL else Reply(200, png)
    )


@pytest.fixture
def flaky_server(tmp_path: Path) -> Iterator[LoopbackHost]:
    server = flaky_host(small_images(tmp_path / "served", 1)[0].read_bytes())
    yield server
    server.close()


@dataclass(frozen=True)
class Published:
    """One record a producer put on the ingest topic, where it landed."""

    id: str
    version: int
    value: bytes | None  # None: a delete (tombstone)
    partition: int
    offset: int
    late: Path | None = None  # the file a "late" upsert names, which appears later


class Life:
    """The seeded script: which record each id gets next."""

    def __init__(self, tmp_path: Path, images: list[Path], server: LoopbackHost) -> None:
        self.rng = random.Random(SEED)
        self.images = images
        self.late_folder = tmp_path / "late"
        self.server = server
        self.versions = {f"item-{i:03d}": self.rng.randint(1, 10**9) * 1_000 for i in range(IDS)}
        self.ops = 0
        self.late: dict[str, Path] = {}

    def upsert(self, event_id: str, *, plain: bool = False) -> IngestEvent:
        """The id's next upsert; ``plain``: of a file that exists."""
        self.versions[event_id] += self.rng.randint(1, 50_000)
        version = self.versions[event_id]
        self.ops += 1
        draw = 1.0 if plain else self.rng.random()
        image: InlineImage | PathImage | UrlImage
        if draw < INLINE_SHARE:
            image = InlineImage(data=self.rng.choice(self.images).read_bytes())
        elif draw < INLINE_SHARE + FLAKY_SHARE:
            image = UrlImage.model_validate({"url": f"{self.server.url}/{event_id}-{version}.png"})
        elif draw < INLINE_SHARE + FLAKY_SHARE + LATE_SHARE:
            path = self.late_folder / f"{event_id}-{version}.png"
            self.late[event_id] = path
            image = PathImage(path=str(path))
        else:
            image = PathImage(path=str(self.rng.choice(self.images)))
        metadata = {"op": self.ops, "tag": self.rng.choice("abc"), "seed": SEED}
        return IngestEvent(id=event_id, image=image, version=version, metadata=metadata)

    def delete(self, event_id: str) -> DeleteEvent:
        self.versions[event_id] += self.rng.randint(1, 50_000)
        self.ops += 1
        return DeleteEvent(id=event_id, version=self.versions[event_id])


def publish(settings: Settings, events: list[IngestEvent | DeleteEvent]) -> list[Published]:
    with EventPublisher(settings.kafka) as publisher:
        deliveries = publisher.publish_each(events)
    assert all(d.ok for d in deliveries), [d.error for d in deliveries if not d.ok][:3]
    published = []
    for event, delivery in zip(events, deliveries, strict=True):
        assert delivery.partition is not None and delivery.offset is not None
        value = encode_event(event) if isinstance(event, IngestEvent) else None
        late = None
        if isinstance(event, IngestEvent) and isinstance(event.image, PathImage):
            path = Path(event.image.path)
            late = path if path.parent.name == "late" else None
        published.append(
            Published(event.id, event.version, value, delivery.partition, delivery.offset, late)
        )
    return published


def republish_as_retries(settings: Settings, copies: list[Published]) -> None:
    """Copies of upserts appended to the retry topic, each to its id's partition, as a worker
    re-queues a record (the attempts header on it)."""
    producer = Producer(producer_config(settings.kafka))
    for copy in copies:
        producer.produce(
            settings.kafka.topics().retry,
            key=copy.id.encode(),
            value=copy.value,
            headers=[(HEADER_RETRY_ATTEMPTS, b"1")],
            partition=copy.partition,
        )
    assert producer.flush(30) == 0


def test_the_collection_is_the_logs_last_word_through_kills_retries_and_replays(
    stack: LocalStack,
    settings: Settings,
    store: VectorStore,
    tmp_path: Path,
    *,
    unique: str,
    flaky_server: LoopbackHost,
    capsys: pytest.CaptureFixture[str],
) -> None:
    started = time.monotonic()
    kafka = settings.kafka.model_copy(
        update={
            "topic": f"life-{unique}",
            "retry_topic": "",
            "dead_letter_topic": f"life-{unique}.dlq",
            # Tombstones outlive the scenario: a worker that lags (its peer was killed) must
            # still read every delete.
            "delete_retention_ms": 600_000,
            **FAST_COMPACTION,
        }
    )
    ensure_topics(kafka)
    settings = settings.model_copy(
        update={
            "kafka": kafka,
            "retry": settings.retry.model_copy(update=RETRY),
            "fetch": settings.fetch.model_copy(update={"allowed_hosts": ["127.0.0.1"]}),
        }
    )
    topics = kafka.topics()
    images = small_images(tmp_path / "images", 12, seed=SEED)
    life = Life(tmp_path, images, flaky_server)
    rng = life.rng
    ids = sorted(life.versions)

    published = publish(settings, [life.upsert(event_id) for event_id in ids])
    with worker_processes(stack, settings, ["lifecycle-a", "lifecycle-b"]) as (victim, peer):
        wait_for(lambda: safe_count(store) >= 40, timeout=240, what="ingest under way")
        victim.kill()  # SIGKILL: no commit, no leave; the peer takes over after the session
        killed_at = safe_count(store)

        # Updates and deletes, with superseded upserts re-published to the retry topic among
        # them (older versions arriving after newer ones).
        later: list[IngestEvent | DeleteEvent] = [
            life.delete(i) if rng.random() < DELETE_SHARE else life.upsert(i)
            for i in (rng.choice(ids) for _ in range(LATER_OPS))
        ]
        half = LATER_OPS // 2
        published += publish(settings, later[:half])
        newest = last_words_of(published)
        superseded = [
            p for p in published if p.value is not None and p.offset < newest[p.id].offset
        ]
        copies = rng.sample(superseded, min(RETRY_COPIES, len(superseded)))
        republish_as_retries(settings, copies)
        published += publish(settings, later[half:])
        wait_for(
            lambda: worker_alive(peer) and caught_up(kafka),
            timeout=300,
            what="the peer caught up with both topics",
        )
        first_letters = dead_letters(settings)
        # Half the dead-lettered ids get a newer version before the replay: their replays are
        # older than their last word; the others' replays are it.
        letter_ids = sorted({m.key().decode() for m in first_letters if m.key()})
        assert len(letter_ids) >= 4, letter_ids
        published += publish(settings, [life.upsert(i, plain=True) for i in letter_ids[::2]])

        # The fix (the late files appear), then the replay: to the retry topic.
        for path in {p.late for p in published if p.late is not None}:
            path.parent.mkdir(exist_ok=True)
            path.write_bytes(images[0].read_bytes())
        config = settings_file(settings, tmp_path)
        assert dlq(["replay", "--config", str(config)]) == 0
        replay_line = capsys.readouterr().out.strip().splitlines()[-1]
        assert f"to {topics.retry}" in replay_line, replay_line

        # Roll the segments until the cleaner compacted every id to one record.
        rounds = [0]

        def compacted() -> bool:
            rounds[0] += 1
            roll_segments(kafka, topics.ingest, 4, 10**6 + rounds[0], str(images[1]))
            keys = [r.key for r in read_from_beginning(kafka, topics.ingest)]
            data = [k for k in keys if not k.startswith("roll-")]
            return len(data) == len(set(data))

        wait_for(compacted, timeout=120, interval=2.0, what="the ingest topic compacted")
        wait_for(
            lambda: worker_alive(peer) and caught_up(kafka),
            timeout=240,
            what="the replays and rolls consumed",
        )
        letters = dead_letters(settings)

    # The log's last word: a fresh read of the compacted topic (the rolls' own ids included).
    fresh = read_from_beginning(kafka, topics.ingest)
    last = last_words(fresh)
    expected = last_words_of(published)
    data_last = {k: r for k, r in last.items() if not k.startswith("roll-")}
    assert {k: (r.value, r.version) for k, r in data_last.items()} == {
        k: (p.value, p.version) for k, p in expected.items()
    }, "the compacted topic's last word differs from what was published last"
    live = {k: r for k, r in last.items() if r.value is not None}
    deleted = {k: r.version for k, r in last.items() if r.value is None}

    rows = store._strong_query(
        store.default_collection,
        "rows",
        filter='id != ""',
        output_fields=["event_version", "metadata"],
        limit=16_384,
    )
    stored = {str(row["id"]): (int(row["event_version"]), dict(row["metadata"])) for row in rows}
    wanted = {k: (r.version, _metadata(r.value)) for k, r in live.items()}
    wrong = {k for k in set(stored) | set(wanted) if stored.get(k) != wanted.get(k)}
    tombstones = store.stored_versions(sorted(deleted))
    wrong |= {
        k
        for k, version in deleted.items()
        if tombstones.get(k) is None
        or not tombstones[k].deleted
        or tombstones[k].event_version != version
    }
    # Replayed dead letters that were their id's last word, and those a newer version beat.
    replayed = Counter(
        m.value() == expected[m.key().decode()].value for m in first_letters if m.key()
    )
    fresh_data = [r for r in fresh if not r.key.startswith("roll-")]
    with capsys.disabled():
        report(
            "lifecycle",
            produced=len(published),
            stored=len(stored),
            dead_lettered=len(letters),
            lost=len(wrong),
        )
        print(
            f"lifecycle: seed={SEED} ids={IDS} "
            f"upserts={sum(p.value is not None for p in published)} "
            f"deletes={sum(p.value is None for p in published)} live={len(live)} "
            f"deleted={len(deleted)} retry_copies={len(copies)} "
            f"replayed_last_word={replayed[True]} replayed_stale={replayed[False]} "
            f"requeued_urls={sum(n > FAILURES_PER_URL for n in flaky_server.requests.values())} "
            f"killed_at={killed_at} compacted={len(published)}->{len(fresh_data)} "
            f"elapsed={time.monotonic() - started:.0f}s"
        )
    assert not wrong, sorted(wrong)[:10]
    assert killed_at < IDS, "the kill came after the first stream was stored; make it longer"
    # Every side door was used: stale copies, replays that were the last word and replays a
    # newer version beat, images fetched after a re-queue, and compaction.
    assert copies
    assert replayed[True] and replayed[False], replayed
    assert max(flaky_server.requests.values()) > FAILURES_PER_URL
    assert len(fresh_data) < len(published), "nothing was compacted"
    assert len(letters) == len(first_letters), "a replayed record failed again"


def last_words_of(published: list[Published]) -> dict[str, Published]:
    """Each id's last record as published (its partition holds all of the id's records)."""
    last: dict[str, Published] = {}
    for record in sorted(published, key=lambda p: (p.partition, p.offset)):
        last[record.id] = record
    return last


def _metadata(value: bytes | None) -> dict[str, object]:
    return dict(IngestEvent.model_validate_json(value or b"{}").metadata)
