"""An optional int8 variant of the embedding model (onnxruntime static quantization).

Contract:

- :data:`INT8_MODEL_SPEC` (defined in :mod:`engine.models`) is the float32 spec with its
  own Triton model name and its own
  ``model_version_tag``: vectors of the int8 model are stored under another tag, so the two
  never mix in one collection (the tag is checked where collections are used).
- :func:`quantize_embedding_model` turns the float32 ONNX model into a QDQ int8 model:
  per-channel int8 weights and uint8 activations for the convolutions, calibrated on
  preprocessed images (percentile calibration). The stem convolution, the 1280-channel head
  convolution and the depthwise convolutions stay float32: measured on scikit-image's photos,
  quantizing them costs the most embedding fidelity (mean cosine to float32 0.77-0.88 with
  them, 0.90-0.93 without; MinMax and entropy calibration did worse than percentile).
  The int8 model is NOT a drop-in: on held-out textures (grass, gravel) its embeddings are
  only ~0.7 cosine from float32, which is why it has its own tag; benchmarks/bench_int8.py
  measures what that costs in retrieval.
  Tensor names, shapes and the unit-norm output are those of the float32 model.
- :func:`sample_calibration` gives a small calibration set from scikit-image's bundled photos
  (a dev dependency): plain and mirrored.

onnxruntime is imported only when quantizing: the worker never needs it.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx

from engine.errors import ConfigurationError

# The spec lives with the others (settings read it without onnx); re-exported here.
from engine.models import INT8_MODEL_SPEC, ModelSpec

__all__ = ["INT8_MODEL_SPEC", "float_nodes", "quantize_embedding_model", "sample_calibration"]

# scikit-image photos used for calibration: varied colour, texture and exposure.
CALIBRATION_PHOTOS = (
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
    "camera",
    "coins",
    "cat",
    "page",
    "horse",
)

Batch = npt.NDArray[np.float32]


def float_nodes(model: onnx.ModelProto) -> list[str]:
    """The convolutions kept in float32: stem, head and every depthwise (grouped) one."""
    convs = [node for node in model.graph.node if node.op_type == "Conv"]
    if not convs:
        raise ConfigurationError("the model has no Conv node: not the embedding model")
    depthwise = [
        node.name
        for node in convs
        if any(attr.name == "group" and attr.i > 1 for attr in node.attribute)
    ]
    return sorted({convs[0].name, convs[-1].name, *depthwise})


def sample_calibration() -> list[Batch]:
    """Preprocessed ``[1, 3, 224, 224]`` batches of scikit-image's photos, plain and mirrored.

    Raises:
        ConfigurationError: scikit-image is not installed (it is in the dev extra).
    """
    try:
        from skimage import data  # noqa: PLC0415 (dev dependency, only for calibration)
    except ImportError as exc:
        raise ConfigurationError("calibration needs scikit-image (pip install -e .[dev])") from exc
    from engine.resampling import reference_preprocess  # noqa: PLC0415 (pulls in JAX)

    batches = []
    for name in CALIBRATION_PHOTOS:
        image = np.asarray(getattr(data, name)())
        if image.ndim == 2:
            image = np.stack([image] * 3, axis=-1)
        image = image[..., :3].astype(np.uint8)
        for variant in (image, image[:, ::-1]):
            tensor = reference_preprocess(np.ascontiguousarray(variant))
            batches.append(tensor[np.newaxis].astype(np.float32))
    return batches


def quantize_embedding_model(
    model: onnx.ModelProto,
    calibration: Sequence[Batch],
    spec: ModelSpec = INT8_MODEL_SPEC,
) -> onnx.ModelProto:
    """Return the static-int8 (QDQ) version of the float32 embedding ``model``.

    Args:
        model: the float32 embedding model (:func:`build_embedding_model`).
        calibration: preprocessed batches ``[N, 3, H, W]`` that look like production inputs.
        spec: names the input tensor the calibration batches are fed to.

    Raises:
        ConfigurationError: no calibration data, or the model is not the embedding model.
        ImportError: onnxruntime is not installed.
    """
    from onnxruntime.quantization import (  # noqa: PLC0415 (optional, heavy)
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    if not calibration:
        raise ConfigurationError("int8 quantization needs at least one calibration batch")
    excluded = float_nodes(model)

    class Reader(CalibrationDataReader):  # type: ignore[misc]
        def __init__(self) -> None:
            self._batches: Iterator[Batch] = iter(calibration)

        def get_next(self) -> dict[str, Any] | None:
            batch = next(self._batches, None)
            return None if batch is None else {spec.input_name: batch}

    # quantize_static takes paths: handing it a ModelProto makes it write the weights as
    # external data into a temporary folder it has deleted by the time it reads them back.
    with tempfile.TemporaryDirectory(prefix="trident-quantize-") as folder:
        source, target = Path(folder) / "float32.onnx", Path(folder) / "int8.onnx"
        onnx.save(model, str(source))
        quantize_static(
            str(source),
            str(target),
            Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            op_types_to_quantize=["Conv"],
            nodes_to_exclude=excluded,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.Percentile,
        )
        quantized = onnx.load(str(target))
    onnx.checker.check_model(quantized)
    return quantized
