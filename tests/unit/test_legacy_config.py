"""ServiceConfig (jax_embedding.config): the earlier YAML and environment, mapped onto Settings."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.errors import ConfigurationError
from engine.models import DEFAULT_MODEL_SPEC, PREPROCESS_BATCH_SIZES
from jax_embedding import ServiceConfig
from jax_embedding.config import ENVIRONMENT

# The earlier README's "Using YAML File" section, verbatim.
EARLIER_README_YAML = """\
triton:
  url: "localhost:8000"
  model_name: "embedding_model"
  protocol: "http"
  input_name: "input"    # Custom input tensor name
  output_name: "output"  # Custom output tensor name

milvus:
  host: "localhost"
  port: 19530
  embedding_dim: 512
  vector_field: "vector"  # Must match your Milvus FLOAT_VECTOR field name
  index_type: "IVF_FLAT"

preprocess:
  image_size: [224, 224]
  batch_size: 32
"""


@pytest.fixture(autouse=True)
def no_earlier_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for variable in ENVIRONMENT:
        monkeypatch.delenv(variable, raising=False)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def test_defaults_point_at_the_local_stack() -> None:
    settings = ServiceConfig().to_settings()
    assert settings.triton.url == "127.0.0.1:18000"
    assert settings.triton.protocol == "http"
    assert settings.milvus.uri == "http://127.0.0.1:19530"
    assert settings.kafka.bootstrap_servers == "127.0.0.1:19092"
    assert settings.milvus.dimension == 1280
    grpc = ServiceConfig(triton={"protocol": "grpc"}).to_settings()
    assert grpc.triton.url == "127.0.0.1:18001"


def test_the_earlier_readme_yaml_is_read_with_every_key(tmp_path: Path) -> None:
    config = ServiceConfig.from_yaml(write(tmp_path, EARLIER_README_YAML))
    settings = config.to_settings()
    assert settings.triton.url == "localhost:8000"
    assert settings.triton.model_name == "embedding_model"
    assert (settings.triton.input_name, settings.triton.output_name) == ("input", "output")
    assert settings.milvus.uri == "http://localhost:19530"
    assert settings.milvus.dimension == 512
    assert settings.milvus.index_type == "IVF_FLAT"
    assert settings.preprocess.image_size == 224
    assert settings.batch.max_size == 32
    assert max(settings.preprocess.batch_sizes) == 32
    # Another model's vectors must not carry the default model's tag.
    assert settings.triton.model_tag == "embedding_model:latest"


def test_earlier_environment_variables_override_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_URL", "triton.internal:8001")
    monkeypatch.setenv("TRITON_MODEL_NAME", "clip")
    monkeypatch.setenv("TRITON_INPUT_NAME", "pixels")
    monkeypatch.setenv("TRITON_OUTPUT_NAME", "vector")
    monkeypatch.setenv("MILVUS_HOST", "milvus.internal")
    monkeypatch.setenv("MILVUS_PORT", "29530")
    monkeypatch.setenv("MILVUS_EMBEDDING_DIM", "768")
    monkeypatch.setenv("MILVUS_TOKEN", "root:Milvus")
    monkeypatch.setenv("JAX_USE_GPU", "true")
    monkeypatch.setenv("JAX_PLATFORM", "gpu")
    config = ServiceConfig()
    assert config.preprocess.use_gpu is True
    settings = config.to_settings()
    assert settings.triton.url == "triton.internal:8001"
    assert (settings.triton.model_name, settings.triton.input_name) == ("clip", "pixels")
    assert settings.triton.output_name == "vector"
    assert settings.milvus.uri == "http://milvus.internal:29530"
    assert settings.milvus.dimension == 768
    assert settings.milvus.token == "root:Milvus"
    assert settings.preprocess.device == "auto"  # GPU when JAX sees one, else the CPU


def test_trident_variables_do_not_apply_to_the_earlier_configuration(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # README, "Configuration: ServiceConfig": to_settings() builds Settings in code.
    monkeypatch.setenv("TRIDENT_MILVUS__COLLECTION", "worker_images")
    monkeypatch.setenv("TRIDENT_PREPROCESS__DEVICE", "gpu")
    settings = ServiceConfig().to_settings()
    assert (settings.milvus.collection, settings.preprocess.device) == ("images", "cpu")
    monkeypatch.setenv("MILVUS_COLLECTION_NAME", "script_images")  # the earlier variable does
    assert ServiceConfig().to_settings().milvus.collection == "script_images"


def test_batch_sizes_are_the_default_ones_up_to_the_batch_size() -> None:
    settings = ServiceConfig(preprocess={"batch_size": 20}).to_settings()
    assert settings.preprocess.batch_sizes == (1, 4, 8, 16, 20)
    assert ServiceConfig().to_settings().preprocess.batch_sizes == PREPROCESS_BATCH_SIZES[:-1]


def test_the_file_wins_over_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("MILVUS_PORT", "1111")
    monkeypatch.setenv("TRITON_MODEL_NAME", "from_env")
    config = ServiceConfig.from_yaml(write(tmp_path, "milvus:\n  port: 2222\n"))
    assert config.milvus.port == 2222
    assert config.triton.model_name == "from_env"


def test_a_bad_environment_value_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MILVUS_PORT", "nineteen")
    with pytest.raises(ConfigurationError, match=r"milvus\.port.*MILVUS_PORT"):
        ServiceConfig()


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("milvus:\n  hots: localhost\n", "milvus.hots"),
        ("triton:\n  urls: x\n", "triton.urls"),
        ("preprocessing:\n  batch_size: 3\n", "preprocessing"),
    ],
)
def test_an_unknown_key_is_an_error_naming_it(tmp_path: Path, text: str, named: str) -> None:
    with pytest.raises(ConfigurationError, match=rf"unknown key {named}") as caught:
        ServiceConfig.from_yaml(write(tmp_path, text))
    assert "config.yaml" in str(caught.value)


def test_attributes_set_afterwards_are_validated_and_used() -> None:
    config = ServiceConfig()
    assert config.to_settings().preprocess.device == "cpu"
    config.preprocess.use_gpu = True
    assert config.to_settings().preprocess.device == "auto"
    config.preprocess.jax_platform = "cpu"
    assert config.to_settings().preprocess.device == "cpu"
    with pytest.raises(ConfigurationError, match=r"preprocess\.batch_size"):
        config.preprocess.batch_size = 0
    with pytest.raises(ConfigurationError, match=r"unknown key milvus\.hots"):
        config.milvus.hots = "x"  # type: ignore[attr-defined]


def test_index_parameters_go_to_their_index_type_and_are_validated() -> None:
    config = ServiceConfig(milvus={"index_type": "IVF_FLAT", "nlist": 128, "nprobe": 8, "M": 32})
    spec = config.to_settings().milvus.index_spec()
    assert (spec.index_type, spec.build_params(), spec.query_params()) == (
        "IVF_FLAT",
        {"nlist": 128},
        {"nprobe": 8},
    )
    config.milvus.index_type = "HNSW"
    config.milvus.efConstruction = 300
    config.milvus.ef = 99
    spec = config.to_settings().milvus.index_spec()
    assert spec.build_params() == {"M": 32, "efConstruction": 300}
    assert spec.query_params() == {"ef": 99}
    config.milvus.M = 1
    with pytest.raises(ConfigurationError, match=r"\bM=1\b"):
        config.to_settings()
    with pytest.raises(ConfigurationError, match=r"milvus\.index_type"):
        ServiceConfig(milvus={"index_type": "GPU_IVF_PQ"})


def test_user_and_password_become_the_token() -> None:
    settings = ServiceConfig(milvus={"user": "root", "password": "Milvus"}).to_settings()
    assert settings.milvus.token == "root:Milvus"
    explicit = ServiceConfig(milvus={"token": "abc", "user": "root", "password": "x"})
    assert explicit.to_settings().milvus.token == "abc"


def test_normalisation_and_sizes_map_onto_the_preprocess_settings() -> None:
    # A size other than the registered model's needs a model of its own (one the registry
    # lacks, described by these keys): the registered one refuses it, naming the key.
    with pytest.raises(ConfigurationError, match=r"preprocess\.image_size 256 does not fit"):
        ServiceConfig(preprocess={"image_size": 256}).to_settings()
    config = ServiceConfig(
        triton={"model_name": "my_model"},
        preprocess={"image_size": 256, "mean": [0.5] * 3, "std": [0.25] * 3},
    )
    settings = config.to_settings().preprocess
    # The model's resize ratio (ModelSpec), 256 for 224: round(256 * 256 / 224).
    assert (settings.image_size, settings.resize_short_side) == (256, 293)
    assert settings.resize_short_side == DEFAULT_MODEL_SPEC.resize_short_side_for(256)
    assert ServiceConfig().to_settings().preprocess.resize_short_side == 256
    assert settings.mean == (127.5, 127.5, 127.5)
    assert settings.std == (63.75, 63.75, 63.75)
    with pytest.raises(ConfigurationError, match="square"):
        ServiceConfig(preprocess={"image_size": [224, 300]}).to_settings()
    with pytest.raises(ConfigurationError, match=r"preprocess\.data_format"):
        ServiceConfig(preprocess={"data_format": "NHWC"})
