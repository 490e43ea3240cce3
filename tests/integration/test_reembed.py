"""``trident-reembed`` on the real stack: a collection embedded by EfficientNet-Lite0, holding
path, URL (a loopback host) and inline images, is rebuilt with EfficientNet-Lite2 while it keeps
serving.

The session's Triton serves Lite2 too (``LocalStack.serve_models``, loaded without a restart).
A Lite0 worker serves the collection throughout. ``start`` migrates the plain collection (its
name becomes an alias of ``<name>_v1``) while events are published and searches sent, none of
which fails; the rebuild worker (a real ``trident-worker`` process) is SIGKILLed once it has
written something, upserts and deletes are published while it is down, and ``start`` again
resumes it: nothing is lost. ``switch`` moves the alias (rows read through it are Lite2's, one
vector equal to Lite2's embedding of its image), ``rollback`` moves it back, ``finish`` drops
the old version; after it the Lite0 worker skips the alias's events (no dead letter) and the
rebuild worker keeps the new version current.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import pytest
from confluent_kafka.admin import AdminClient

from devstack.stack import LocalStack
from engine.errors import CollectionConflictError, UnknownCollectionError
from engine.images import decode_image
from engine.inference import TritonEmbedder
from engine.models import UINT8_MODEL_SPEC, model_spec
from engine.preprocess import build_preprocessor
from engine.records import VectorRecord
from engine.settings import Settings
from engine.store import VectorStore, tombstone_collection, version_collection
from producer import EventPublisher
from reembed import local
from reembed.cli import main as reembed
from reembed.plan import alias_folder, load_state
from schemas import DeleteEvent, IngestEvent
from schemas.events import InlineImage, PathImage, UrlImage
from tests.integration.conftest import (
    committed_everything,
    dead_letters,
    running_worker,
    small_images,
    wait_for,
)
from tests.support.http_host import Reply, loopback_host

pytestmark = pytest.mark.stack

LITE0 = UINT8_MODEL_SPEC
LITE2 = model_spec("efficientnet_lite2_embedding_uint8")


@pytest.fixture
def setup(
    stack: LocalStack, settings: Settings, tmp_path: Path
) -> Iterator[tuple[Settings, Path, VectorStore]]:
    """Settings with a state folder of this test's (the rebuild workers share the run's JAX
    compilation cache, tests/conftest.py), the settings file the CLI reads, and a store;
    everything dropped after."""
    stack.serve_models([LITE2.name])
    ours = settings.model_copy(
        update={
            "reembed": settings.reembed.model_copy(
                update={"state_dir": tmp_path / "reembed", "compare_sample": 4}
            ),
            "fetch": settings.fetch.model_copy(update={"allowed_hosts": ["127.0.0.1"]}),
            "batch": settings.batch.model_copy(update={"max_size": 4}),
            "worker": settings.worker.model_copy(update={"routing_cache_s": 1.0}),
        }
    )
    config = stack.write_settings(ours, name=f"reembed-{ours.kafka.group_id}.yaml")
    store = VectorStore(ours.milvus)
    try:
        yield ours, config, store
    finally:
        local.stop_all(ours.reembed.state_dir, timeout_s=10)
        name = ours.milvus.collection
        for alias in [a for a, target in store.aliases().items() if target.startswith(name)]:
            store.drop_alias(alias)
        for collection in store.list_collections():
            if collection.startswith(name):
                store.drop_collection(collection)
        store.close()


def _cli(config: Path, *argv: str) -> int:
    return reembed([argv[0], "--config", str(config), *argv[1:]])


def _ids(store: VectorStore, name: str) -> set[str]:
    return set(store.ids_matching('id != ""', name, limit=1000))


def test_rebuild_with_another_model_while_serving(
    setup: tuple[Settings, Path, VectorStore], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings, config, store = setup
    alias = settings.milvus.collection
    old, new = version_collection(alias, 1), version_collection(alias, 2)
    store.create_collection(alias, model_tag=LITE0.model_version_tag, model_name=LITE0.name)
    paths = small_images(tmp_path / "images", 10)
    served = {f"/u{n}.png": paths[n].read_bytes() for n in range(8, 10)}
    publisher = EventPublisher(settings.kafka)
    with (
        loopback_host(lambda path, _nth: Reply(200, served[path])) as host,
        running_worker(settings, worker_id="lite0"),
    ):
        first = [
            *(IngestEvent(id=f"p{n}", image=PathImage(path=str(paths[n]))) for n in range(5)),
            *(
                IngestEvent(id=f"i{n}", image=InlineImage(data=paths[n].read_bytes()))
                for n in (5, 6, 7)
            ),
            *(IngestEvent(id=f"u{n}", image=UrlImage(url=f"{host.url}/u{n}.png")) for n in (8, 9)),
        ]
        publisher.publish_each(
            [*first, IngestEvent(id="gone", image=PathImage(path=str(paths[0])))]
        )
        wait_for(lambda: store.count(alias) == 11, timeout=120, what="Lite0's 11 rows")
        publisher.publish_each([DeleteEvent(id="gone", collection=alias)])
        wait_for(lambda: store.tombstone("gone", alias), timeout=60, what="a tombstone")

        # start: the migration's window fails no write and no search.
        traffic = _Traffic(settings, alias, paths)
        with traffic:
            began = time.monotonic()
            assert _cli(config, "start", alias, "--model", LITE2.name) == 0
            start_s = time.monotonic() - began
        assert traffic.failures == []
        assert traffic.searches > 0 and traffic.ids
        said = capsys.readouterr().out
        assert "1 tombstones copied" in said
        window = re.search(r"its name was missing for (\d+) ms", said)
        assert window, said
        assert store.resolve_alias(alias) == old and store.aliases()[alias] == old
        info = store.describe_collection(new)
        assert (info.model_name, info.dimension) == (LITE2.name, LITE2.output_dim)

        # A rebuild worker SIGKILLed once it wrote something; changes published while it is down.
        folder = alias_folder(settings.reembed.state_dir, alias)
        wait_for(lambda: _rows(store, new) > 0, timeout=240, what="the rebuild's first rows")
        (pid,) = local.running_workers(folder).values()
        os.killpg(pid, signal.SIGKILL)
        wait_for(lambda: not local.running_workers(folder), timeout=10, what="the kill")
        publisher.publish_each(
            [
                IngestEvent(id="p0", image=InlineImage(data=paths[9].read_bytes())),  # new image
                IngestEvent(id="late", image=PathImage(path=str(paths[1]))),
                DeleteEvent(id="p1", collection=alias),
                DeleteEvent(id="u8", collection=alias),
            ]
        )
        assert _cli(config, "start", alias, "--model", LITE2.name) == 0  # resumes
        assert len(local.running_workers(folder)) == 1
        publisher.publish_each([DeleteEvent(id="i5", collection=alias)])  # while it runs

        expected = {f"p{n}" for n in (0, 2, 3, 4)} | {"i6", "i7", "u9", "late"}
        expected |= set(traffic.ids)
        wait_for(lambda: committed_everything(settings), timeout=120, what="Lite0 caught up")
        wait_for(lambda: _ids(store, new) == expected, timeout=300, what="the rebuild caught up")
        assert _ids(store, old) == expected
        assert store.tombstone("p1", new) is not None and store.tombstone("i5", new) is not None

        # status and the workers' gauges, then refusals: nothing to roll back or finish yet.
        capsys.readouterr()
        assert _cli(config, "status", alias, "--json") == 0
        (figures,) = orjson.loads(capsys.readouterr().out)["rebuilds"]
        assert (figures["lag"], figures["rows_new"], figures["points_to"]) == (
            0,
            len(expected),
            old,
        )
        assert figures["done"] == figures["total"] > 0
        gauges = {"done": _gauge(folder, "done", new), "total": _gauge(folder, "total", new)}
        assert gauges["total"] > 0 and gauges["done"] <= gauges["total"]
        assert _cli(config, "rollback", alias) == 3
        assert _cli(config, "finish", alias) == 3

        # switch: reads through the alias are Lite2's.
        wait_for(lambda: _cli(config, "switch", alias, "--force") == 0, timeout=60, what="a switch")
        assert store.resolve_alias(alias) == new
        rows = store.get(["p0"], alias, with_vectors=True)
        assert rows[0]["model_version"] == LITE2.model_version_tag
        wanted = _lite2_embedding(settings, paths[9].read_bytes())
        assert float(np.dot(np.asarray(rows[0]["embedding"]), wanted)) > 0.999

        # rollback and switch again; after finish, Lite0 skips the alias's events.
        assert _cli(config, "rollback", alias) == 0
        assert store.resolve_alias(alias) == old
        assert _cli(config, "switch", alias, "--force") == 0
        assert _cli(config, "finish", alias) == 0
        assert old not in store.list_collections()
        state = load_state(settings.reembed.state_dir, alias)
        assert state is not None and state.finished
        publisher.publish_each([IngestEvent(id="after", image=PathImage(path=str(paths[2])))])
        wait_for(lambda: "after" in _ids(store, new), timeout=120, what="the new version kept up")
    assert not store.collection_exists(tombstone_collection(old))
    assert dead_letters(settings, timeout=5) == []
    print(f"\nreembed: start {start_s:.1f}s, the name missing {window.group(1)} ms of it")


def _gauge(folder: Path, name: str, collection: str) -> float:
    """A ``trident_reembed_*`` gauge of the running rebuild worker (its address from its log)."""
    log = next(folder.glob("rebuild-worker-*.log")).read_text()
    address = re.findall(r"health and metrics on (http://\S+)", log)[-1]
    metrics = httpx.get(f"{address}/metrics", timeout=10).text
    found = re.search(
        rf'^trident_reembed_{name}\{{collection="{collection}"\}} (\S+)$', metrics, re.MULTILINE
    )
    assert found, metrics[-2000:]
    return float(found.group(1))


def _rows(store: VectorStore, name: str) -> int:
    return store.count(name)


class _Traffic:
    """Events published and searches sent through the alias, continuously, while ``start``
    migrates the collection; the ids published, the searches answered and every failure."""

    def __init__(self, settings: Settings, alias: str, paths: list[Path]) -> None:
        self._settings, self._alias, self._paths = settings, alias, paths
        self.failures: list[BaseException] = []
        self.ids: list[str] = []
        self.searches = 0
        self._store = VectorStore(settings.milvus)
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._publish),
            threading.Thread(target=self._search),
        ]

    def __enter__(self) -> _Traffic:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *_: Any) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=60)
        self._store.close()

    def _publish(self) -> None:
        publisher = EventPublisher(self._settings.kafka)
        n = 0
        while not self._stop.is_set():
            event = IngestEvent(id=f"t{n}", image=PathImage(path=str(self._paths[n % 10])))
            try:
                publisher.publish_each([event])
                self.ids.append(event.id)
            except Exception as exc:  # collected: the test fails on it
                self.failures.append(exc)
            n += 1
            self._stop.wait(0.2)

    def _search(self) -> None:
        vector = np.ones(LITE0.output_dim, dtype=np.float32)
        while not self._stop.is_set():
            try:
                self._store.search(vector, top_k=3, collection=self._alias)
                self.searches += 1
            except Exception as exc:  # collected: the test fails on it
                self.failures.append(exc)
            self._stop.wait(0.05)


def _lite2_embedding(settings: Settings, data: bytes) -> np.ndarray:
    lite2 = settings.for_model(LITE2.name)
    preprocessor = build_preprocessor(lite2.preprocess)
    pixels = decode_image(
        data, max_pixels=lite2.fetch.max_pixels, target_short_side=preprocessor.decode_short_side
    ).pixels
    with TritonEmbedder(lite2.triton, model=lite2.model) as embedder:
        vector = embedder.embed(preprocessor.preprocess([pixels]))[0]
    return np.asarray(vector, dtype=np.float64)


def test_the_store_works_through_an_alias(settings: Settings) -> None:
    """Rename a collection and make its old name an alias (a migration): writes, deletes and
    reads by the old name reach the renamed collection and its tombstones; a store that cached
    the old name finds its way; moving, dropping through and listing aliases."""
    name = settings.milvus.collection
    renamed, other = version_collection(name, 1), version_collection(name, 2)
    store, stale = VectorStore(settings.milvus), VectorStore(settings.milvus)
    vector = np.ones(LITE0.output_dim, dtype=np.float32)
    try:
        store.create_collection(name, model_tag=LITE0.model_version_tag, model_name=LITE0.name)
        store.upsert([_record("a", vector)], name)
        store.delete([("b", 7)], name)
        stale.stored_versions(["a", "b"], name)  # caches the plain collection and its companion
        store.rename_collection(name, renamed)
        store.create_alias(name, renamed)
        assert store.resolve_alias(name) == renamed and store.aliases()[name] == renamed
        assert store.collection_exists(tombstone_collection(renamed)) is False  # reserved
        assert stale.tombstone("b", name) is not None  # its companion followed it
        stale.upsert([_record("c", vector)], name)
        stale.delete([("a", 9)], name)
        assert set(store.ids_matching('id != ""', renamed, limit=10)) == {"c"}
        assert store.stored_versions(["a", "b"], renamed)["a"].deleted
        assert [hit.id for hit in store.search(vector, collection=name)] == ["c"]
        with pytest.raises(CollectionConflictError):
            store.drop_collection(name)
        store.create_version(name, other, LITE2)
        store.alter_alias(name, other)
        assert store.resolve_alias(name) == other and store.count(name) == 0
        assert store.describe_collection(other).model_name == LITE2.name
        store.drop_alias(name)
        with pytest.raises(UnknownCollectionError):
            store.resolve_alias(name)
    finally:
        with contextlib.suppress(UnknownCollectionError):
            store.drop_alias(name)
        for collection in (renamed, other, name):
            with contextlib.suppress(UnknownCollectionError):
                store.drop_collection(collection)
        store.close()
        stale.close()


def _record(record_id: str, vector: np.ndarray) -> VectorRecord:
    return VectorRecord(
        id=record_id,
        vector=vector,
        metadata={},
        source="test",
        content_sha256="0" * 64,
        model_version=LITE0.model_version_tag,
        event_version=8,
        ingested_at_ms=int(time.time() * 1000),
    )


def test_cancel_before_a_switch_drops_the_new_version_and_its_group(
    setup: tuple[Settings, Path, VectorStore], capsys: pytest.CaptureFixture[str]
) -> None:
    """An alias made beforehand (as the Kubernetes files make ``images`` -> ``images_v1``) is
    rebuilt without a migration; ``cancel`` stops the rebuild worker, drops the new version and
    the rebuild's consumer group, and leaves the alias where it was."""
    settings, config, store = setup
    alias = settings.milvus.collection
    old, new = version_collection(alias, 1), version_collection(alias, 2)
    store.create_collection(old, model_tag=LITE0.model_version_tag, model_name=LITE0.name)
    store.create_alias(alias, old)
    assert _cli(config, "start", alias, "--model", LITE2.name, "--workers", "2") == 0
    assert "migrated" not in capsys.readouterr().out
    folder = alias_folder(settings.reembed.state_dir, alias)
    assert len(local.running_workers(folder)) == 2
    assert _cli(config, "start", alias, "--model", LITE0.name) == 3  # another model: refused
    state = load_state(settings.reembed.state_dir, alias)
    assert state is not None
    wait_for(lambda: _group_exists(settings, state.group), timeout=120, what="the group")
    assert _cli(config, "cancel", alias) == 0
    assert local.running_workers(folder) == {}
    assert new not in store.list_collections() and store.resolve_alias(alias) == old
    assert load_state(settings.reembed.state_dir, alias) is None
    assert not _group_exists(settings, state.group)


def _group_exists(settings: Settings, group: str) -> bool:
    # Warnings only: librdkafka's informational lines would go to stderr.
    admin = AdminClient({"bootstrap.servers": settings.kafka.bootstrap_servers, "log_level": 4})
    listed = admin.list_consumer_groups().result(timeout=10)
    return group in {found.group_id for found in listed.valid}
