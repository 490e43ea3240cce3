"""TritonEmbedder against fake clients: every part is sent before any answer, rows come back in
order, a failed part fails the batch as Triton's error would, an HTTP client used on one thread
can be closed from another (as the worker's shutdown does); each thread has a client of its own;
readiness says why it is not ready, and tells an unknown model from an outage."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import gevent
import gevent.pool
import numpy as np
import pytest
from tritonclient.utils import InferenceServerException

from engine.errors import InferenceConfigurationError, InferenceUnavailableError
from engine.inference import TritonEmbedder
from engine.priorities import INGEST_PRIORITY, PRIORITY, PRIORITY_LEVELS, Role
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
        self.priorities: list[int] = []
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
        self.priorities.append(kwargs["priority"])
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
        self.priorities.append(kwargs["priority"])
        return _Answer(rows)

    def close(self) -> None:
        pass


def embedder_with(
    client: FakeGrpcClient, parallel: int, max_batch: int = 64, role: Role = "ingest"
) -> TritonEmbedder:
    settings = TritonSettings(parallel_requests=parallel, max_batch_size=max_batch)
    embedder = TritonEmbedder(settings, role=role)
    connect_to(embedder, lambda: client)
    return embedder


def connect_to(embedder: TritonEmbedder, new_client: Callable[[], Any]) -> None:
    """Every connection ``embedder`` opens (one per thread, each probe's) is ``new_client()``."""
    embedder._new_client = lambda timeout_s: new_client()  # type: ignore[method-assign]


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


def test_a_query_embedder_asks_for_the_higher_priority_the_ingest_for_none() -> None:
    for role, expected in (("query", PRIORITY["query"]), ("ingest", 0)):
        client = FakeGrpcClient()
        embedder = embedder_with(client, 2, role=role)
        embedder.embed(numbered(1))  # one request, blocking
        embedder.embed(numbered(8))  # parts sent at once
        assert client.priorities == [expected] * 3, role
    # Lower numbers first: queries leave Triton's queue before the model's default (ingest).
    assert 0 < PRIORITY["query"] < INGEST_PRIORITY <= PRIORITY_LEVELS


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
    connect_to(embedder, lambda: client)
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


# One client per thread ------------------------------------------------------------------------


class CountingClient(FakeGrpcClient):
    """A fake connection that knows whether it was closed; ``broken`` ones fail every request."""

    def __init__(self, *, broken: bool = False) -> None:
        super().__init__()
        self.broken = broken
        self.closed = False
        self.thread = threading.current_thread()

    def infer(self, model: str, inputs: list[Any], **kwargs: Any) -> _Answer:
        # The HTTP client may only be used on the thread that made it (its gevent hub).
        assert threading.current_thread() is self.thread, "a client used on another thread"
        if self.broken:
            raise InferenceServerException("connection reset", status="StatusCode.UNAVAILABLE")
        return super().infer(model, inputs, **kwargs)

    def close(self) -> None:
        self.closed = True


def run_on_a_thread(work: Callable[[], Any]) -> Any:
    outcome: list[Any] = []
    thread = threading.Thread(target=lambda: outcome.append(_outcome(work)))
    thread.start()
    thread.join()
    return outcome[0]


def _outcome(work: Callable[[], Any]) -> Any:
    try:
        return work()
    except Exception as exc:
        return exc


def test_each_thread_embeds_on_a_client_of_its_own() -> None:
    embedder = TritonEmbedder(TritonSettings(parallel_requests=1))
    made: list[CountingClient] = []
    connect_to(embedder, lambda: made.append(CountingClient()) or made[-1])
    embedder.embed(numbered(1))
    embedder.embed(numbered(1))
    assert len(made) == 1  # the same thread keeps its client
    run_on_a_thread(lambda: embedder.embed(numbered(1)))
    assert len(made) == 2 and made[0].thread is not made[1].thread
    embedder.close()
    assert all(client.closed for client in made)


def test_one_threads_failure_drops_only_its_own_client() -> None:
    embedder = TritonEmbedder(TritonSettings(parallel_requests=1))
    made: list[CountingClient] = []
    connect_to(embedder, lambda: made.append(CountingClient()) or made[-1])
    embedder.embed(numbered(1))
    healthy = made[0]

    def fail() -> Any:
        connect_to(embedder, lambda: made.append(CountingClient(broken=True)) or made[-1])
        return embedder.embed(numbered(1))

    assert isinstance(run_on_a_thread(fail), InferenceUnavailableError)
    assert made[1].closed and not healthy.closed
    embedder.embed(numbered(1))  # this thread's client still serves
    assert len(made) == 2


def test_the_clients_of_ended_threads_are_closed_when_another_connects() -> None:
    embedder = TritonEmbedder(TritonSettings(parallel_requests=1))
    made: list[CountingClient] = []
    connect_to(embedder, lambda: made.append(CountingClient()) or made[-1])
    for _ in range(3):
        run_on_a_thread(lambda: embedder.embed(numbered(1)))
    # Each new thread closed the client of the one that ended before it.
    assert [client.closed for client in made] == [True, True, False]
    embedder.close()
    assert made[-1].closed


# Readiness ------------------------------------------------------------------------------------


class ReadinessClient:
    """Answers readiness questions like a Triton serving ``index`` (model name -> state)."""

    def __init__(self, index: dict[str, str], *, server_ready: bool = True) -> None:
        self.index = index
        self.server_ready = server_ready
        self.deadlines: list[float] = []
        self.closed = False

    def is_server_ready(self, client_timeout: float) -> bool:
        self.deadlines.append(client_timeout)
        return self.server_ready

    def is_model_ready(self, name: str, version: str, client_timeout: float) -> bool:
        self.deadlines.append(client_timeout)
        return self.index.get(name) == "READY"

    def get_model_repository_index(self, as_json: bool, client_timeout: float) -> Any:
        self.deadlines.append(client_timeout)
        return {"models": [{"name": n, "version": "1", "state": s} for n, s in self.index.items()]}

    def infer(self, model: str, inputs: list[Any], **kwargs: Any) -> Any:
        raise InferenceServerException(
            f"Request for unknown model: '{model}' is not found", status="StatusCode.NOT_FOUND"
        )

    def close(self) -> None:
        self.closed = True


def readiness_of(client: Any, model: str = "wanted") -> TritonEmbedder:
    settings = TritonSettings(model_name=model, input_format="uint8_nhwc", parallel_requests=1)
    embedder = TritonEmbedder(settings)
    connect_to(embedder, lambda: client)
    return embedder


def test_ready_asks_within_its_deadline_and_closes_its_own_client() -> None:
    client = ReadinessClient({"wanted": "READY"})
    readiness_of(client).check_ready(1.5)
    assert client.deadlines == [1.5, 1.5] and client.closed


@pytest.mark.parametrize(
    ("client", "error", "says"),
    [
        (ReadinessClient({"wanted": "READY"}, server_ready=False), InferenceUnavailableError,
         r"not ready \(starting or stopping\)"),
        (ReadinessClient({"wanted": "LOADING"}), InferenceUnavailableError,
         "model 'wanted' .* is not ready \\(LOADING\\)"),
        (ReadinessClient({"other": "READY", "more": "READY"}), InferenceConfigurationError,
         "does not serve model 'wanted' \\(it serves: more, other\\)"),
    ],
)  # fmt: skip
def test_not_ready_says_why(client: ReadinessClient, error: type[Exception], says: str) -> None:
    embedder = readiness_of(client)
    with pytest.raises(error, match=says):
        embedder.check_ready(1.0)
    assert not embedder.is_ready(1.0)


def test_a_server_that_does_not_answer_is_unavailable() -> None:
    class Refusing(ReadinessClient):
        def is_server_ready(self, client_timeout: float) -> bool:
            raise ConnectionRefusedError("connection refused")

    with pytest.raises(InferenceUnavailableError, match=r"did not answer.*refused"):
        readiness_of(Refusing({})).check_ready(1.0)


def test_a_model_not_found_is_a_configuration_error_only_when_the_server_does_not_know_it() -> None:
    unknown = readiness_of(ReadinessClient({"other": "READY"}))
    with pytest.raises(InferenceConfigurationError, match="does not serve model 'wanted'"):
        unknown.embed(numbered(1))
    # A server still loading it answers "not found" too: that is worth retrying.
    loading = readiness_of(ReadinessClient({"wanted": "LOADING"}))
    with pytest.raises(InferenceUnavailableError, match="unknown model"):
        loading.embed(numbered(1))


class BecomesReady(ReadinessClient):
    def __init__(self, after: int) -> None:
        super().__init__({"wanted": "LOADING"})
        self.asked = 0
        self.after = after

    def is_server_ready(self, client_timeout: float) -> bool:
        self.asked += 1
        if self.asked > self.after:
            self.index["wanted"] = "READY"
        return True


def test_waiting_for_the_model_logs_and_returns_once_it_is_ready(
    caplog: pytest.LogCaptureFixture,
) -> None:
    client = BecomesReady(after=2)
    with caplog.at_level("INFO", logger="engine.inference"):
        readiness_of(client).wait_until_ready(10.0, poll_s=0.01)
    assert client.asked == 3
    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == 2
    assert messages[0].startswith("waiting up to 10 s for Triton model 'wanted'")
    assert "ready after" in messages[1]


def test_waiting_gives_up_after_the_timeout_naming_model_and_url() -> None:
    client = BecomesReady(after=10**6)
    began = time.monotonic()
    with pytest.raises(InferenceUnavailableError) as raised:
        readiness_of(client).wait_until_ready(0.3, poll_s=0.05)
    assert time.monotonic() - began < 2.0
    message = str(raised.value)
    assert "'wanted'" in message and "127.0.0.1:18001" in message
    assert "triton.ready_timeout_s" in message and "LOADING" in message


def test_an_unknown_model_ends_the_wait_at_once() -> None:
    client = ReadinessClient({"other": "READY"})
    began = time.monotonic()
    with pytest.raises(InferenceConfigurationError, match="it serves: other"):
        readiness_of(client).wait_until_ready(60.0, poll_s=0.05)
    assert time.monotonic() - began < 1.0


def test_a_zero_timeout_does_not_wait_nor_ask() -> None:
    client = ReadinessClient({}, server_ready=False)
    readiness_of(client).wait_until_ready(0.0)
    assert client.deadlines == []
