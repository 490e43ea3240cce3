"""TritonEmbedder's parallel parts against fake clients: every part is sent before any answer,
rows come back in order, a failed part fails the batch as Triton's error would, and an HTTP
client used on one thread can be closed from another (as the worker's shutdown does)."""

from __future__ import annotations

import threading
import time
from typing import Any

import gevent
import gevent.pool
import numpy as np
import pytest
from tritonclient.utils import InferenceServerException

from engine.errors import InferenceUnavailableError
from engine.inference import TritonEmbedder
from engine.settings import TritonSettings


class _Answer:
    def __init__(self, rows: np.ndarray) -> None:
        self._rows = rows

    def as_numpy(self, name: str) -> np.ndarray:
        return self._rows


class FakeGrpcClient:
    """Answers each request on a thread of its own, a little later: embedding = first pixel."""

    def __init__(self, fail_part: int | None = None) -> None:
        self.fail_part = fail_part
        self.sizes: list[int] = []
        self.most_in_flight = 0
        self._in_flight = 0
        self._lock = threading.Lock()

    def _embeddings(self, inputs: list[Any]) -> np.ndarray:
        pixels = inputs[0]._raw_content  # what set_data_from_numpy serialised
        batch = np.frombuffer(pixels, dtype=np.uint8).reshape(-1, 4, 4, 3)
        return batch[:, 0, 0, :1].astype(np.float32)

    def async_infer(self, model: str, inputs: list[Any], callback: Any, **kwargs: Any) -> None:
        part = len(self.sizes)
        rows = self._embeddings(inputs)
        self.sizes.append(rows.shape[0])
        with self._lock:
            self._in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self._in_flight)

        def answer() -> None:
            time.sleep(0.02)
            with self._lock:
                self._in_flight -= 1
            if part == self.fail_part:
                callback(
                    None, InferenceServerException("overloaded", status="StatusCode.UNAVAILABLE")
                )
            else:
                callback(_Answer(rows), None)

        threading.Thread(target=answer).start()

    def infer(self, model: str, inputs: list[Any], **kwargs: Any) -> _Answer:
        rows = self._embeddings(inputs)
        self.sizes.append(rows.shape[0])
        return _Answer(rows)

    def close(self) -> None:
        pass


def embedder_with(client: FakeGrpcClient, parallel: int, max_batch: int = 64) -> TritonEmbedder:
    settings = TritonSettings(parallel_requests=parallel, max_batch_size=max_batch)
    embedder = TritonEmbedder(settings)
    embedder._client = client  # the connection, as if opened
    return embedder


def numbered(rows: int) -> np.ndarray:
    """Row i's first pixel is i: the fake's embedding says which row it came from."""
    batch = np.zeros((rows, 4, 4, 3), dtype=np.uint8)
    batch[:, 0, 0, 0] = np.arange(rows)
    return batch


@pytest.mark.parametrize(
    ("rows", "parallel", "max_batch", "sizes"),
    [
        (32, 2, 64, [16, 16]),
        (33, 2, 64, [17, 16]),
        (12, 5, 64, [3, 3, 3, 3]),
        (1, 2, 64, [1]),
        (200, 2, 64, [64, 64, 64, 8]),  # parts never exceed the model's max_batch_size
    ],
)
def test_parts_are_equal_sent_at_once_and_come_back_in_order(
    rows: int, parallel: int, max_batch: int, sizes: list[int]
) -> None:
    client = FakeGrpcClient()
    got = embedder_with(client, parallel, max_batch).embed(numbered(rows))
    assert client.sizes == sizes
    np.testing.assert_array_equal(got[:, 0], np.arange(rows))
    assert client.most_in_flight == (len(sizes) if len(sizes) > 1 else 0)


def test_one_failed_part_fails_the_batch_as_retriable() -> None:
    client = FakeGrpcClient(fail_part=1)
    with pytest.raises(InferenceUnavailableError, match="overloaded"):
        embedder_with(client, 2).embed(numbered(32))


class _HttpRequest:
    def __init__(self, greenlet: Any) -> None:
        self._greenlet = greenlet

    def get_result(self, timeout: float | None = None) -> Any:
        try:
            return self._greenlet.get(timeout=timeout)
        except gevent.Timeout as exc:
            raise InferenceServerException("timed out") from exc


class FakeHttpClient:
    """tritonclient.http's shape: ``async_infer`` runs each request as a greenlet in a pool on
    the calling thread's gevent hub, and ``close`` joins that pool. Part 0 is refused at once,
    the others answer 0.2 s later."""

    def __init__(self) -> None:
        self._pool = gevent.pool.Pool(4)
        self._parts = 0

    def async_infer(self, model: str, inputs: list[Any], **kwargs: Any) -> _HttpRequest:
        part, self._parts = self._parts, self._parts + 1

        def answer() -> _Answer:
            if part == 0:
                raise InferenceServerException("bad input", status="400")
            gevent.sleep(0.2)
            return _Answer(np.zeros((1, 1), np.float32))

        return _HttpRequest(self._pool.apply_async(answer))

    def close(self) -> None:
        self._pool.join()


def test_an_http_client_used_on_one_thread_closes_from_another() -> None:
    embedder = TritonEmbedder(TritonSettings(protocol="http", parallel_requests=2))
    client = FakeHttpClient()
    embedder._client = client
    errors: list[Exception] = []

    def embed() -> None:
        try:
            embedder.embed(numbered(2))
        except Exception as exc:
            errors.append(exc)

    thread = threading.Thread(target=embed)
    thread.start()
    thread.join()
    assert [type(e).__name__ for e in errors] == ["InferenceConfigurationError"]
    # The slow part was waited for and released on its own thread's hub: without that, this
    # close would wait on this thread's hub for a greenlet that only the other one can run.
    assert len(client._pool) == 0
    embedder.close()
