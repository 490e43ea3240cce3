"""Index choices are validated before anything reaches Milvus, naming the wrong parameter."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from engine.errors import ConfigurationError
from engine.indexes import IndexSpec, build_parameter_names, search_parameter_names
from engine.settings import Settings
from jax_embedding.config import ServiceConfig


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


@pytest.mark.parametrize(
    ("given", "named"),
    [
        # Milvus 2.3.5 refuses these after the collection exists (issue 21, 5.1): never again.
        ({"index_type": "HNSW", "params": {"efConstruction": 1_000_000_000}}, r"\[1, 999999\]"),
        ({"index_type": "HNSW", "params": {"efConstruction": 1_000_000}}, "efConstruction"),
        ({"index_type": "HNSW", "params": {"M": 2049}}, r"\[2, 2048\]"),
        ({"index_type": "IVF_FLAT", "params": {"nlist": 65_537}}, r"\[1, 65536\]"),
        # A search with this ef brought the server down.
        ({"index_type": "HNSW", "search_params": {"ef": 2**31 - 1}}, r"\[1, 32768\]"),
        ({"index_type": "IVF_FLAT", "search_params": {"nprobe": 0}}, "nprobe=0"),
    ],
)
def test_values_the_server_refuses_are_refused_before_it(
    given: dict[str, object], named: str
) -> None:
    with pytest.raises(ValidationError, match=named):
        IndexSpec.model_validate(given)


def test_the_earlier_configuration_is_held_to_the_same_ranges() -> None:
    # jax_embedding's ServiceConfig reads the parameter names and ranges of engine.indexes.
    config = ServiceConfig(milvus={"index_type": "HNSW", "efConstruction": 1_000_000_000})
    with pytest.raises(ConfigurationError, match="efConstruction=1000000000"):
        config.to_settings()
    config = ServiceConfig(milvus={"index_type": "HNSW", "nlist": 10**9, "ef": 32})
    settings = config.to_settings().milvus  # nlist is IVF_FLAT's: ignored for HNSW
    assert (settings.index_params, settings.search_params) == ({}, {"ef": 32})


def test_each_index_type_names_its_parameters() -> None:
    assert [build_parameter_names(t) for t in ("FLAT", "IVF_FLAT", "HNSW")] == [
        (),
        ("nlist",),
        ("M", "efConstruction"),
    ]
    assert [search_parameter_names(t) for t in ("FLAT", "IVF_FLAT", "HNSW")] == [
        (),
        ("nprobe",),
        ("ef",),
    ]


def test_hnsw_searches_at_least_as_wide_as_the_result_window() -> None:
    # Milvus refuses ef below limit + offset ("ef(64) should be larger than k(100)").
    spec = IndexSpec(index_type="HNSW", search_params={"ef": 64})
    assert spec.query_params() == {"ef": 64}
    assert spec.query_params(window=100) == {"ef": 100}
    assert spec.query_params(window=10) == {"ef": 64}
    assert IndexSpec(index_type="IVF_FLAT").query_params(window=500) == {"nprobe": 16}


def test_an_existing_index_is_described_as_the_server_has_it() -> None:
    # Made elsewhere, outside this project's ranges (the server takes M=1): described, not refused.
    spec = IndexSpec.from_description({"index_type": "HNSW", "metric_type": "L2", "M": "1"})
    assert spec.describe()["params"] == {"M": 1, "efConstruction": 200}
