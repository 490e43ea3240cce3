"""The Milvus adapter's error classification, by what was asked: no server needed."""

from __future__ import annotations

from typing import Any

import grpc
import numpy as np
import pytest
from pymilvus.exceptions import DataNotMatchException, MilvusException

from engine.errors import (
    ConfigurationError,
    InvalidQueryError,
    InvalidRowError,
    StoreUnavailableError,
    UnknownCollectionError,
)
from engine.settings import MilvusSettings
from engine.store import VectorRecord, VectorStore, _Operation, validate_id


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
        (_Unauthenticated(), ConfigurationError),
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


def test_ids_are_measured_in_utf8_bytes() -> None:
    validate_id("a" * 256)
    validate_id("猫" * 85)  # 255 bytes
    with pytest.raises(InvalidRowError, match="768 UTF-8 bytes"):
        validate_id("猫" * 256)
    with pytest.raises(InvalidRowError):
        validate_id("")
