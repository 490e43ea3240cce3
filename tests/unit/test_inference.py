"""TritonEmbedder's parallel parts against a fake gRPC client: every part is sent before any
answer, rows come back in order, and a failed part fails the batch as Triton's error would."""

from __future__ import annotations

import threading
import time
from typing import Any

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
