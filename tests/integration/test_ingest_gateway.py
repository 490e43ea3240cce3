"""The query API's inserts on the real broker: concurrent inserts through the one shared
producer each see their own deliveries' failures, never another request's."""

from __future__ import annotations

import base64
import os
import threading

import pytest

from engine.errors import EventTooLargeError, TridentError
from engine.settings import Settings
from query_api.ingest import IngestGateway
from schemas.api import InsertRequest

pytestmark = pytest.mark.stack

ROUNDS = 20


class Collections:
    """The one thing an insert asks the store: the collection exists (it does)."""

    default_collection = "images"

    def resolve_alias(self, name: str) -> str:
        return name

    def describe_collection(self, name: str) -> None:
        pass


def test_concurrent_inserts_each_see_only_their_own_failures(settings: Settings) -> None:
    # The producer refuses records over 4 KiB (a broker's refusal would fail the whole batch
    # the record went in, with any other request's records beside it).
    kafka = settings.kafka.model_copy(update={"extra": {"message.max.bytes": "4096"}})
    gateway = IngestGateway(kafka, Collections(), acknowledge_timeout_s=30)  # type: ignore[arg-type]
    # Incompressible (lz4), under the contract's metadata limit, over the producer's.
    blob = base64.b64encode(os.urandom(6000)).decode()
    start = threading.Barrier(2)
    outcomes: dict[str, list[TridentError | None]] = {"good": [], "bad": []}

    def good(round_: int) -> InsertRequest:
        inputs = [f"https://example.com/good-{round_}-{k}.jpg" for k in range(4)]
        return InsertRequest(inputs=inputs)

    def bad(round_: int) -> InsertRequest:
        inputs = [f"https://example.com/bad-{round_}-{k}.jpg" for k in range(2)]
        return InsertRequest(inputs=inputs, metadata=[{"blob": blob}, {}])

    def inserting(name: str) -> None:
        make = good if name == "good" else bad
        for round_ in range(ROUNDS):
            start.wait(timeout=60)
            try:
                gateway.insert(make(round_))
            except TridentError as exc:
                outcomes[name].append(exc)
            else:
                outcomes[name].append(None)

    threads = [threading.Thread(target=inserting, args=(name,)) for name in outcomes]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=300)
    finally:
        gateway.close()
    assert not any(thread.is_alive() for thread in threads)
    # The good request never takes the other's failures for its own...
    assert [error for error in outcomes["good"] if error is not None] == []
    # ...and the bad one sees exactly its own: one of its two events, too large.
    assert len(outcomes["bad"]) == ROUNDS
    for round_, error in enumerate(outcomes["bad"]):
        assert isinstance(error, EventTooLargeError), error
        assert f"1 of 2 events; 'https://example.com/bad-{round_}-0.jpg'" in str(error)
