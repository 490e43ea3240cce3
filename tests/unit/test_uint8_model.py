"""The uint8-pixel model (issue 12.3): its graph against the float32 path, and how settings,
preprocessor and Triton adapter agree on what the model takes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort
import pytest
from PIL import Image

from devstack.config import StackConfig
from devstack.samples import skimage_images
from devstack.triton import TritonService
from engine.errors import ConfigurationError, InferenceConfigurationError
from engine.inference import TritonEmbedder
from engine.models import (
    DEFAULT_MODEL_SPEC,
    INT8_MODEL_SPEC,
    UINT8_MODEL_SPEC,
    ModelSpec,
)
from engine.preprocess import JAXImagePreprocessor, build_preprocessor
from engine.resampling import JaxPreprocessor, reference_pixels, reference_preprocess
from engine.settings import PreprocessSettings, Settings, TritonSettings, load_settings
from model_build.efficientnet_lite import build_embedding_model, load_packaged_weights

CUSTOM = "tests.support.custom_preprocessing:GreyscalePreprocessor"
Vectors = npt.NDArray[np.float32]


def _session(spec: ModelSpec, weights: dict[str, np.ndarray]) -> ort.InferenceSession:
    model = build_embedding_model(weights, spec)
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def sessions() -> tuple[ort.InferenceSession, ort.InferenceSession]:
    weights = load_packaged_weights()
    return _session(DEFAULT_MODEL_SPEC, weights), _session(UINT8_MODEL_SPEC, weights)


@pytest.fixture(scope="module")
def photos() -> list[npt.NDArray[np.uint8]]:
    """The repository's sample photos (scikit-image's, as the quick start publishes them)."""
    images = []
    for path in skimage_images():
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("RGB"))
        if min(pixels.shape[:2]) >= 64:
            images.append(pixels)
    assert len(images) >= 15
    return images


def _cosines(a: Vectors, b: Vectors) -> Vectors:
    dots: Vectors = np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return dots


# ------------------------------------------------------------------------------- the graph


def test_the_uint8_graph_takes_nhwc_pixels_and_keeps_the_float32_tensors() -> None:
    model = build_embedding_model(load_packaged_weights(), UINT8_MODEL_SPEC)
    (graph_input,) = model.graph.input
    dims = [d.dim_value or d.dim_param for d in graph_input.type.tensor_type.shape.dim]
    assert graph_input.name == DEFAULT_MODEL_SPEC.input_name
    assert graph_input.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert dims == ["batch", 224, 224, 3]
    assert [n.op_type for n in model.graph.node[:4]] == ["Transpose", "Cast", "Sub", "Mul"]
    assert [o.name for o in model.graph.output] == [DEFAULT_MODEL_SPEC.output_name]
    tags = {p.key: p.value for p in model.metadata_props}
    assert tags["model_version_tag"] == DEFAULT_MODEL_SPEC.model_version_tag


def test_uint8_model_on_reference_pixels_matches_the_float32_path(
    sessions: tuple[ort.InferenceSession, ort.InferenceSession],
    photos: list[npt.NDArray[np.uint8]],
) -> None:
    float32, uint8 = sessions
    pixels = np.stack([reference_pixels(p) for p in photos])
    normalised = np.stack([reference_preprocess(p) for p in photos])
    expected = float32.run(None, {"images": normalised})[0]
    got = uint8.run(None, {"images": pixels})[0]
    assert _cosines(got, expected).min() >= 0.999


def test_jax_uint8_output_through_the_uint8_model_matches_jax_float32_through_float32(
    sessions: tuple[ort.InferenceSession, ort.InferenceSession],
    photos: list[npt.NDArray[np.uint8]],
) -> None:
    float32, uint8 = sessions
    images = photos[:8]
    as_float = JaxPreprocessor(batch_sizes=(8,), device="cpu").preprocess(images)
    as_pixels = JaxPreprocessor(batch_sizes=(8,), device="cpu", output="uint8_nhwc").preprocess(
        images
    )
    assert as_pixels.dtype == np.uint8 and as_pixels.shape == (8, 224, 224, 3)
    expected = float32.run(None, {"images": as_float})[0]
    got = uint8.run(None, {"images": as_pixels})[0]
    assert _cosines(got, expected).min() >= 0.999


# ------------------------------------------------------------------ settings and adapters


def test_by_default_the_built_in_preprocessing_feeds_the_uint8_model() -> None:
    settings = Settings()
    assert settings.triton.model_name == UINT8_MODEL_SPEC.name
    assert settings.triton.input_format == settings.preprocess.output == "uint8_nhwc"
    assert settings.triton.model_tag == DEFAULT_MODEL_SPEC.model_version_tag


@pytest.mark.parametrize(
    "preprocess",
    [{"class": CUSTOM}, {"mean": (120.0, 120.0, 120.0)}, {"output": "float32_nchw"}],
    ids=["custom class", "custom mean", "float32 output"],
)
def test_float32_preprocessing_falls_back_to_the_float32_model(
    preprocess: dict[str, object],
) -> None:
    settings = Settings(triton={"url": "triton:8001"}, preprocess=preprocess)
    assert settings.triton.model_name == DEFAULT_MODEL_SPEC.name
    assert settings.triton.input_format == settings.preprocess.output == "float32_nchw"
    assert settings.triton.url == "triton:8001"


@pytest.mark.parametrize("model", [DEFAULT_MODEL_SPEC.name, INT8_MODEL_SPEC.name, "my_model"])
def test_a_chosen_float32_model_makes_the_built_in_preprocessing_output_float32(model: str) -> None:
    settings = Settings(triton={"model_name": model})
    assert settings.preprocess.output == settings.triton.input_format == "float32_nchw"


def test_another_model_may_say_it_takes_pixels() -> None:
    settings = Settings(triton={"model_name": "my_model", "input_format": "uint8_nhwc"})
    assert settings.preprocess.output == "uint8_nhwc"


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (
            {"triton": {"model_name": UINT8_MODEL_SPEC.name}, "preprocess": {"class": CUSTOM}},
            "takes",
        ),
        (
            {"triton": {"model_name": UINT8_MODEL_SPEC.name}, "preprocess": {"std": (60, 60, 60)}},
            "mean/std other than",
        ),
        ({"preprocess": {"output": "uint8_nhwc", "mean": (0.0, 0.0, 0.0)}}, "normalisation"),
        (
            {"triton": {"model_name": DEFAULT_MODEL_SPEC.name, "input_format": "uint8_nhwc"}},
            "does not fit",
        ),
    ],
    ids=["class vs uint8 model", "std vs uint8 model", "uint8 with a mean", "wrong format"],
)
def test_a_mismatch_is_a_configuration_error_at_startup(
    values: dict[str, dict[str, object]], message: str, tmp_path: Path
) -> None:
    path = tmp_path / "trident.yaml"
    path.write_text(json.dumps(values))  # JSON is YAML
    with pytest.raises(ConfigurationError, match=message):
        load_settings(path)


def test_resolved_settings_survive_a_round_trip() -> None:
    for settings in (Settings(), Settings(preprocess={"class": CUSTOM})):
        again = Settings(**settings.model_dump(by_alias=True))
        assert again.triton == settings.triton and again.preprocess == settings.preprocess


def test_build_preprocessor_outputs_what_the_settings_say() -> None:
    uint8 = build_preprocessor(Settings().preprocess, batch_sizes=(1,))
    assert uint8.output_format == "uint8_nhwc"
    pixels = uint8.preprocess([np.full((300, 400, 3), 9, np.uint8)])
    assert pixels.dtype == np.uint8 and pixels.shape == (1, 224, 224, 3)
    legacy = JAXImagePreprocessor(cache_compiled=False, batch_sizes=(1,))
    assert legacy.output_format == "float32_nchw"
    with pytest.raises(ConfigurationError, match="outputs 'float32_nchw'"):
        build_preprocessor(
            PreprocessSettings.model_validate({"class": CUSTOM, "output": "uint8_nhwc"})
        )


@pytest.mark.parametrize(
    ("fmt", "batch"),
    [
        ("uint8_nhwc", np.zeros((2, 3, 224, 224), np.float32)),
        ("uint8_nhwc", np.zeros((2, 3, 224, 224), np.uint8)),
        ("float32_nchw", np.zeros((2, 224, 224, 3), np.uint8)),
    ],
    ids=["float32 to uint8 model", "uint8 NCHW", "uint8 to float32 model"],
)
def test_the_adapter_refuses_a_batch_the_model_does_not_take(
    fmt: str, batch: npt.NDArray[np.generic]
) -> None:
    # Port 9 (discard): nothing must be sent, so nothing must answer.
    settings = TritonSettings(url="127.0.0.1:9", model_name="m", input_format=fmt)
    with (
        TritonEmbedder(settings) as embedder,
        pytest.raises(InferenceConfigurationError, match="takes"),
    ):
        embedder.embed(batch)


# ----------------------------------------------------------------------- the local stack


def test_triton_fingerprint_follows_model_files_but_not_pycache(tmp_path: Path) -> None:
    repository = tmp_path / "models"
    (repository / "m" / "1" / "__pycache__").mkdir(parents=True)
    (repository / "m" / "config.pbtxt").write_text("a")
    service = TritonService(StackConfig(root=tmp_path / "stack", cache=tmp_path), repository)
    before = service.repository_fingerprint()
    (repository / "m" / "1" / "__pycache__" / "model.cpython-311.pyc").write_bytes(b"x")
    assert service.repository_fingerprint() == before
    (repository / "n" / "1").mkdir(parents=True)
    (repository / "n" / "config.pbtxt").write_text("b")
    assert set(service.repository_fingerprint()) == {"m/config.pbtxt", "n/config.pbtxt"}
