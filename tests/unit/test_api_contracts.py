"""The query API's request contracts and its key settings, without any service."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from engine.errors import ConfigurationError
from engine.settings import ApiSettings
from query_api.security import api_keys
from schemas import SearchRequest
from schemas.api import CreateCollectionRequest, InsertRequest


def test_the_earlier_apis_bodies_still_validate() -> None:
    search = SearchRequest.model_validate(
        {"query_input": "/x.png", "topk": 3, "collection_name": "c", "filter_expr": "a > 1"}
    )
    assert (search.topk, search.offset, search.filter) == (3, 0, None)
    insert = InsertRequest.model_validate(
        {"inputs": ["/a.png"], "ids": ["a"], "metadata": [{"k": 1}], "collection_name": "c"}
    )
    assert insert.ids == ["a"]
    created = CreateCollectionRequest.model_validate({"name": "c", "dim": 512, "description": "d"})
    assert (created.index_type, created.metric) == ("HNSW", "COSINE")


@pytest.mark.parametrize(
    "body",
    [
        {"topk": 3},  # no query
        {"vector": [1.0], "id": "a"},  # two queries
        {"vector": [1.0], "topk": 0},
        {"vector": [1.0], "topk": 1001},
        {"vector": [1.0], "offset": 16_000, "topk": 1000},  # past Milvus's result window
        {"vector": [float("nan")]},
        {"vector": [1.0], "collection_name": "bad name"},
        {"vector": [1.0], "output_fields": ["embedding"]},
        {"vector": [1.0], "filter_expr": "x" * 4097},
        {"vector": [1.0], "unknown": 1},
    ],
)
def test_bad_searches_are_refused(body: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        SearchRequest.model_validate(body)


@pytest.mark.parametrize(
    "body",
    [
        {"inputs": []},
        {"inputs": ["/a", "/b"], "ids": ["a"]},
        {"inputs": ["/a", "/b"], "ids": ["a", "a"]},
        {"inputs": ["/a"], "metadata": [{}, {}]},
    ],
)
def test_bad_inserts_are_refused(body: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        InsertRequest.model_validate(body)


def test_keys_are_required_off_loopback_and_read_from_settings_and_a_file(tmp_path: Path) -> None:
    assert api_keys(ApiSettings()) is None  # the local stack: loopback only
    assert api_keys(ApiSettings(host="0.0.0.0", auth="off")) is None
    with pytest.raises(ConfigurationError, match="requires API keys"):
        api_keys(ApiSettings(host="0.0.0.0"))
    with pytest.raises(ConfigurationError, match="requires API keys"):
        api_keys(ApiSettings(auth="on"))
    key_file = tmp_path / "keys"
    key_file.write_text("# comment\n\nfrom-file  \n")
    keys = api_keys(ApiSettings(auth="on", api_keys=["inline"], api_keys_file=key_file))
    assert keys == frozenset({"inline", "from-file"})
    with pytest.raises(ConfigurationError, match="api_keys_file"):
        api_keys(ApiSettings(auth="on", api_keys_file=tmp_path / "missing"))
