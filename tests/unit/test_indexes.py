"""Index choices are validated before anything reaches Milvus, naming the wrong parameter."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from engine.indexes import IndexSpec
from engine.settings import Settings


@pytest.mark.parametrize(
    ("index_type", "build", "search"),
    [
        ("FLAT", {}, {}),
        ("IVF_FLAT", {"nlist": 1024}, {"nprobe": 16}),
        ("HNSW", {"M": 16, "efConstruction": 200}, {"ef": 64}),
    ],
)
def test_defaults_fill_in_each_index_type(
    index_type: str, build: dict[str, int], search: dict[str, int]
) -> None:
    spec = IndexSpec.model_validate({"index_type": index_type})
    assert spec.build_params() == build
    assert spec.query_params() == search


@pytest.mark.parametrize(
    ("given", "named"),
    [
        ({"index_type": "IVF_FLAT", "params": {"M": 8}}, "'M'"),
        ({"index_type": "HNSW", "search_params": {"nprobe": 8}}, "'nprobe'"),
        ({"index_type": "HNSW", "params": {"M": 1}}, "M=1"),
        ({"index_type": "IVF_FLAT", "params": {"nlist": 0}}, "nlist=0"),
        ({"index_type": "FLAT", "params": {"nlist": 8}}, "no parameters"),
        ({"index_type": "DISKANN"}, "index_type"),
        ({"metric": "HAMMING"}, "metric"),
    ],
)
def test_a_wrong_parameter_is_named(given: dict[str, object], named: str) -> None:
    with pytest.raises(ValidationError, match=named):
        IndexSpec.model_validate(given)


def test_settings_refuse_a_parameter_the_index_type_does_not_take() -> None:
    with pytest.raises(ValidationError, match="efConstruction"):
        Settings(milvus={"index_type": "IVF_FLAT", "index_params": {"efConstruction": 10}})
    spec = Settings(milvus={"index_type": "IVF_FLAT", "index_params": {"nlist": 64}}).milvus
    assert spec.index_spec().build_params() == {"nlist": 64}


def test_an_index_is_read_back_from_either_answer_shape() -> None:
    flat = IndexSpec.from_description(
        {"index_type": "HNSW", "metric_type": "IP", "M": "8", "efConstruction": "100"}
    )
    nested = IndexSpec.from_description(
        {"index_type": "HNSW", "metric_type": "IP", "params": {"M": 8, "efConstruction": 100}}
    )
    assert flat == nested
    assert flat.describe()["params"] == {"M": 8, "efConstruction": 100}
    assert IndexSpec.from_description({"index_type": "SCANN"}).index_type == "FLAT"
