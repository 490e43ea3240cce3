"""The Milvus adapter's error classification, by the codes Milvus and pymilvus give and by what
was asked, and how its upserts are sent (chunks, requests in flight, the first failure raised
once none is in flight): no server needed."""

from __future__ import annotations

from typing import Any

import grpc
import numpy as np
import pytest
from pymilvus.client.call_context import CallContext
from pymilvus.exceptions import DataNotMatchException, MilvusException
from pymilvus.grpc_gen import common_pb2, milvus_pb2

from engine.errors import (
    ConfigurationError,
    InvalidQueryError,
    InvalidRowError,
    StoreAuthenticationError,
    StoreUnavailableError,
    TridentError,
    UnknownCollectionError,
)
from engine.indexes import IndexSpec
from engine.records import CollectionInfo, VectorRecord
from engine.settings import MilvusSettings
from engine.store import VectorStore, _Operation, validate_id


class _Refusing:
    """A client whose every call raises ``error``."""

    def __init__(self, error: BaseException) -> None:
        self.error = error
        self.closed = False

    def __getattr__(self, name: str) -> Any:
        def call(*args: object, **kwargs: object) -> None:
            raise self.error

        return call

    def close(self) -> None:
        self.closed = True


class _Unauthenticated(grpc.RpcError):
    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAUTHENTICATED

    def details(self) -> str:
        return "auth check failure, please check username and password are correct"


class _Unavailable(grpc.RpcError):
    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def __str__(self) -> str:
        return "failed to connect to all addresses"


def _chained(error: MilvusException, cause: BaseException) -> MilvusException:
    """``error`` raised ``from cause``, as pymilvus raises it."""
    error.__cause__ = cause
    return error


def _could_not_connect(cause: BaseException) -> MilvusException:
    # What pymilvus raises when the channel's first call fails, whatever the reason.
    return _chained(
        MilvusException(
            2,
            "Fail connecting to server on 127.0.0.1:19530, illegal connection params or server "
            "unavailable",
        ),
        cause,
    )


def _store(error: BaseException) -> tuple[VectorStore, _Refusing]:
    store = VectorStore(MilvusSettings())
    client = _Refusing(error)
    store._client = client  # type: ignore[assignment]  # the connection, as if opened
    return store, client


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (
            MilvusException(1100, "the length (768) of 3th string exceeds max length (256)"),
            InvalidRowError,
        ),
        (DataNotMatchException(message="dim mismatch"), InvalidRowError),
        (MilvusException(65535, "segment allocation stalled"), StoreUnavailableError),
        (MilvusException(1, "service not available"), StoreUnavailableError),
        (MilvusException(100, "collection not found[collection=x]"), UnknownCollectionError),
        (_Unauthenticated(), StoreAuthenticationError),
        (OSError("connection reset"), StoreUnavailableError),
    ],
)
def test_write_errors(error: BaseException, expected: type[Exception]) -> None:
    store, client = _store(error)
    record = VectorRecord(id="a", vector=np.ones(4, np.float32))
    with pytest.raises(expected):
        store._call(_Operation.WRITE, "upsert", "upsert", "c", data=[record.to_row()])
    # A transient failure replaces the client but never closes it under another thread's call.
    assert (store._client is None) == (expected is StoreUnavailableError)
    assert not client.closed


def test_a_refused_search_is_an_invalid_query_and_a_refused_read_transient() -> None:
    store, _ = _store(MilvusException(1100, "cannot parse expression"))
    with pytest.raises(InvalidQueryError):
        store._call(_Operation.SEARCH, "search", "search", "c")
    store, _ = _store(MilvusException(1100, "cannot parse expression"))
    with pytest.raises(StoreUnavailableError):
        store._call(_Operation.READ, "get", "get", "c")


# (error, operation, expected): the codes decide, whatever the message says.
_BY_CODE: list[tuple[BaseException, _Operation, type[TridentError]]] = [
    # A code the message contradicts: the code wins.
    (MilvusException(1100, "service unavailable, timed out"), _Operation.WRITE, InvalidRowError),
    (
        MilvusException(100, "timeout: collection not found"),
        _Operation.READ,
        UnknownCollectionError,
    ),
    (MilvusException(8, "rate limit exceeded"), _Operation.SEARCH, StoreUnavailableError),
    (MilvusException(101, "collection not loaded"), _Operation.SEARCH, StoreUnavailableError),
    (MilvusException(9, "quota exceeded"), _Operation.WRITE, StoreUnavailableError),
    (MilvusException(503, "channel not available"), _Operation.SEARCH, StoreUnavailableError),
    (MilvusException(1100, "invalid parameter"), _Operation.SEARCH, InvalidQueryError),
    (MilvusException(1100, "invalid parameter"), _Operation.INDEX, InvalidQueryError),
    # Milvus 2.3.5 refusing an index's parameters: no code (65535), read per operation.
    (MilvusException(65535, "M out of range: [1, 2048]"), _Operation.INDEX, InvalidQueryError),
    (MilvusException(65535, "cannot parse expression"), _Operation.SEARCH, InvalidQueryError),
    (
        MilvusException(65535, "create duplicate collection"),
        _Operation.ADMIN,
        StoreUnavailableError,
    ),
    # Credentials: the server's codes, or the gRPC status under pymilvus's "could not connect".
    (MilvusException(1800, "user hasn't authenticated"), _Operation.READ, StoreAuthenticationError),
    (MilvusException(1400, "not authenticated"), _Operation.WRITE, StoreAuthenticationError),
    (_could_not_connect(_Unauthenticated()), _Operation.READ, StoreAuthenticationError),
    (_could_not_connect(_Unauthenticated()), _Operation.WRITE, StoreAuthenticationError),
    (MilvusException(1401, "privilege not permitted"), _Operation.ADMIN, ConfigurationError),
    # pymilvus's own code 2 over a dead channel is an outage.
    (_could_not_connect(_Unavailable()), _Operation.READ, StoreUnavailableError),
    # A retry that ran out of time carries the gRPC status as its code.
    (
        MilvusException(grpc.StatusCode.UNAVAILABLE, "[query] Retry timeout: 30s"),  # type: ignore[arg-type]
        _Operation.SEARCH,
        StoreUnavailableError,
    ),
    # A server before 2.3: no code, the legacy one.
    (
        MilvusException(0, "can't find", common_pb2.CollectionNotExists),
        _Operation.READ,
        UnknownCollectionError,
    ),
    (
        MilvusException(0, "too fast", common_pb2.RateLimit),
        _Operation.SEARCH,
        StoreUnavailableError,
    ),
    (MilvusException(0, "bad", common_pb2.IllegalArgument), _Operation.WRITE, InvalidRowError),
]


@pytest.mark.parametrize(("error", "operation", "expected"), _BY_CODE)
def test_errors_are_classified_by_their_codes(
    error: BaseException, operation: _Operation, expected: type[TridentError]
) -> None:
    store, _ = _store(error)
    with pytest.raises(TridentError) as raised:
        store._call(operation, "call", "anything", "c")
    assert type(raised.value) is expected
    if operation is _Operation.INDEX:
        assert raised.value.reason == "invalid_index"


@pytest.mark.parametrize("token", ["root:wrong", ""])
def test_refused_credentials_say_how_to_pass_the_token_never_unavailable(token: str) -> None:
    store = VectorStore(MilvusSettings(token=token))
    store._client = _Refusing(_could_not_connect(_Unauthenticated()))  # type: ignore[assignment]
    with pytest.raises(StoreAuthenticationError) as refused:
        store.list_collections()
    message = str(refused.value)
    assert "authentication failed" in message
    assert "milvus.token" in message and "TRIDENT_MILVUS__TOKEN" in message
    assert ("no token is set" in message) == (token == "")
    assert "unavailable" not in message and "auth check failure" in message
    assert "Traceback" not in message and "MilvusException" not in message


def test_ids_are_measured_in_utf8_bytes() -> None:
    validate_id("a" * 256)
    validate_id("猫" * 85)  # 255 bytes
    with pytest.raises(InvalidRowError, match="768 UTF-8 bytes"):
        validate_id("猫" * 256)
    with pytest.raises(InvalidRowError):
        validate_id("")


class _Sent:
    """A request in flight: its answer is given when the caller waits for it."""

    def __init__(self, stub: _Stub, answer: object) -> None:
        self.stub, self.answer = stub, answer

    def result(self) -> object:
        self.stub.in_flight -= 1
        if isinstance(self.answer, BaseException):
            raise self.answer
        return self.answer


class _Stub:
    """``Upsert.future`` of a gRPC stub whose answers are scripted, one per request."""

    def __init__(self, answers: list[object]) -> None:
        self.answers = answers
        self.requests: list[Any] = []
        self.in_flight = self.most_in_flight = 0
        self.Upsert = self

    def future(self, request: Any, **_: object) -> _Sent:
        self.requests.append(request)
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        return _Sent(self, self.answers[len(self.requests) - 1])


class _Client:
    def __init__(self, stub: _Stub) -> None:
        self._stub, self.server_address, self.closed = stub, "fake:19530", False

    def _get_connection(self) -> _Client:
        return self

    def _generate_call_context(self) -> CallContext:
        return CallContext()

    def close(self) -> None:
        self.closed = True

    def has_collection(self, name: str, **_: object) -> bool:
        # Looked up again after a write found its collection missing (renamed under it): it
        # is gone for good here.
        return False

    def describe_collection(self, name: str, **_: object) -> dict[str, Any]:
        raise MilvusException(code=100, message=f"collection not found[collection={name}]")


def _answer(code: int = 0, reason: str = "") -> milvus_pb2.MutationResult:
    return milvus_pb2.MutationResult(
        status=common_pb2.Status(code=code, reason=reason), timestamp=1 + code
    )


def _writing_store(
    answers: list[object], *, chunk_rows: int = 3, in_flight: int = 2
) -> tuple[VectorStore, _Client]:
    store = VectorStore(
        MilvusSettings(missing_recheck_s=0),
        upsert_chunk_rows=chunk_rows,
        upsert_in_flight=in_flight,
    )
    client = _Client(_Stub(answers))
    store._client = client  # type: ignore[assignment]
    store._collections["c"] = (CollectionInfo(name="c", dimension=4, index=IndexSpec()), None)
    return store, client


def _rows(count: int) -> list[VectorRecord]:
    return [VectorRecord(id=f"r{i}", vector=np.full(4, i, np.float32)) for i in range(count)]


def test_a_large_upsert_is_sent_in_chunks_a_few_in_flight() -> None:
    store, client = _writing_store([_answer()] * 4)
    assert store.upsert(_rows(10), "c") == 10
    stub = client._stub
    assert [r.num_rows for r in stub.requests] == [3, 3, 3, 1]
    assert [r.fields_data[0].scalars.string_data.data[0] for r in stub.requests] == [
        "r0",
        "r3",
        "r6",
        "r9",
    ]
    assert (stub.most_in_flight, stub.in_flight) == (2, 0)


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        (_answer(1100, "the length (768) of 0th string exceeds max length (256)"), InvalidRowError),
        (_answer(100, "collection not found[collection=c]"), UnknownCollectionError),
        (_answer(65535, "segment allocation stalled"), StoreUnavailableError),
        (_Unavailable(), StoreUnavailableError),
        (_Unauthenticated(), StoreAuthenticationError),
    ],
)
def test_a_refused_chunk_fails_the_call_once_none_is_in_flight(
    answer: object, expected: type[Exception]
) -> None:
    store, client = _writing_store([_answer(), answer, _answer(), _answer()])
    with pytest.raises(expected):
        store.upsert(_rows(10), "c")
    assert len(client._stub.requests) == 4 and client._stub.in_flight == 0
    # An outage replaces the client (the next call reconnects) without closing it under
    # another thread's call.
    assert (store._client is None) == (expected is StoreUnavailableError)
    assert not client.closed


def test_a_row_that_cannot_be_packed_fails_before_anything_is_sent() -> None:
    store, client = _writing_store([_answer()] * 4)
    rows = [*_rows(5), VectorRecord(id="odd", vector=np.ones(3, np.float32))]
    with pytest.raises(InvalidRowError) as refused:
        store.upsert(rows, "c")
    assert refused.value.reason == "wrong_dimension"
    assert client._stub.requests == []
