"""Columnar upsert requests are the request pymilvus's rows API builds: no server needed."""

from __future__ import annotations

import numpy as np
import orjson
import pytest
from pymilvus.client.prepare import Prepare

from engine.errors import InvalidRowError
from engine.records import VECTOR_FIELD, VectorRecord
from engine.store import collection_schema
from engine.store_requests import pack_upsert


def _records(dimension: int) -> list[VectorRecord]:
    rng = np.random.default_rng(3)
    return [
        VectorRecord(
            id=f"r-{i}-猫",
            # float64 on purpose: both paths round it to float32 the same way
            vector=rng.standard_normal(dimension)
            if i % 2
            else rng.standard_normal(dimension, np.float32),
            metadata={"n": i, "nested": {"tags": ["a", "é"], "x": 0.5}, "np": np.int64(i)},
            source=f"/data/{i}.jpg",
            content_sha256=f"{i:064x}",
            model_version="tag-1",
            event_version=i * 10,
            ingested_at_ms=1_700_000_000_000 + i,
        )
        for i in range(5)
    ]


@pytest.mark.parametrize("dynamic", [False, True])
def test_the_packed_request_is_the_rows_apis(dynamic: bool) -> None:
    schema = collection_schema(16)
    records = _records(16)
    rows_api = Prepare.row_upsert_param(
        "c",
        [record.to_row() for record in records],
        "",
        schema.to_dict()["fields"],
        enable_dynamic=dynamic,
    )
    packed = pack_upsert(
        "c", records, vector_field=VECTOR_FIELD, dimension=16, dynamic_field=dynamic
    )
    assert packed.num_rows == rows_api.num_rows == 5
    assert packed.collection_name == rows_api.collection_name
    by_name = {field.field_name: field for field in rows_api.fields_data}
    assert sorted(by_name) == sorted(field.field_name for field in packed.fields_data)
    for field in packed.fields_data:  # ids, vectors, JSON bytes, scalars: all identical
        assert field == by_name[field.field_name], field.field_name
    vectors = next(f for f in packed.fields_data if f.field_name == VECTOR_FIELD).vectors
    stored = np.array(vectors.float_vector.data, dtype=np.float32).reshape(5, 16)
    for row, record in zip(stored, records, strict=True):
        assert row.tobytes() == record.vector.astype(np.float32).tobytes()


def test_json_is_encoded_as_pymilvus_encodes_it() -> None:
    records = _records(4)
    packed = pack_upsert("c", records, vector_field=VECTOR_FIELD, dimension=4, dynamic_field=False)
    metadata = next(f for f in packed.fields_data if f.field_name == "metadata")
    decoded = [orjson.loads(value) for value in metadata.scalars.json_data.data]
    assert decoded == [{**r.metadata, "np": int(r.metadata["np"])} for r in records]


def test_what_cannot_be_packed_is_an_invalid_row() -> None:
    good = VectorRecord(id="a", vector=np.ones(4, np.float32))
    with pytest.raises(InvalidRowError) as wrong:
        pack_upsert(
            "c",
            [good, VectorRecord(id="b", vector=np.ones(5, np.float32))],
            vector_field=VECTOR_FIELD,
            dimension=4,
            dynamic_field=False,
        )
    assert wrong.value.reason == "wrong_dimension"
    with pytest.raises(InvalidRowError) as not_json:
        pack_upsert(
            "c",
            [VectorRecord(id="b", vector=np.ones(4, np.float32), metadata={"x": object()})],
            vector_field=VECTOR_FIELD,
            dimension=4,
            dynamic_field=False,
        )
    assert not_json.value.reason == "metadata_not_json"
    with pytest.raises(InvalidRowError):
        pack_upsert(
            "c",
            [VectorRecord(id="b", vector=np.ones(4, np.float32), event_version=2**63)],
            vector_field=VECTOR_FIELD,
            dimension=4,
            dynamic_field=False,
        )
