"""A user's own embedding model, written here with the onnx package (bring your own model).

Unlike the project's models in every way a spec describes: other tensor names, size,
normalisation, layout and dimension. The embedding is a fixed random projection of an 8 x 8 grid
of mean colours of the normalised input: deterministic, content-dependent (an image and a copy
of it get the same vector, other images other ones), so searches by image find the image.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import yaml
from onnx import TensorProto, helper, numpy_helper

from devstack.stack import LocalStack
from devstack.triton import TritonService
from engine.models import ModelSpec, input_is_channels_last, input_is_pixels

GRID = 8
# CLIP's normalisation (0-255 scale): not the project's (127, 128).
CLIP_MEAN = (122.77, 116.75, 104.09)
CLIP_STD = (68.50, 66.63, 70.32)

FLOAT_NCHW: dict[str, Any] = {
    "name": "own_clip_tower",
    "input_name": "pixel_values",
    "input_format": "float32_nchw",
    "image_size": 96,
    "resize_short_side": 110,
    "input_mean": CLIP_MEAN,
    "input_std": CLIP_STD,
    "output_name": "feats",
    "output_dim": 64,
    "model_version_tag": "own-clip-tower-v1",
    "instance_count": 1,
}
"""The spec of the float32 NCHW model (96 px, CLIP's normalisation, 64 dimensions)."""
PIXELS_NHWC: dict[str, Any] = {
    **FLOAT_NCHW,
    "name": "own_pixel_model",
    "input_name": "image",
    "input_format": "uint8_nhwc",
    "image_size": 112,
    "resize_short_side": 112,
    "output_name": "vector",
    "output_dim": 48,
    "model_version_tag": "own-pixel-model-v1",
}
"""A uint8 NHWC variant that normalises inside its graph (112 px, 48 dimensions)."""


def spec_of(values: dict[str, Any]) -> ModelSpec:
    return ModelSpec(family="onnx", **values)


def build_model(spec: ModelSpec, *, seed: int = 7) -> onnx.ModelProto:
    """The ONNX graph ``spec`` describes: input as the spec says (normalised inside for uint8),
    output ``[N, output_dim]`` float32."""
    side, dim = spec.image_size, spec.output_dim
    rng = np.random.default_rng(seed)
    projection = rng.standard_normal((3 * GRID * GRID, dim)).astype(np.float32)
    nodes, inits = [], [numpy_helper.from_array(projection, "projection")]
    current = spec.input_name
    if input_is_pixels(spec.input_format):
        nodes.append(helper.make_node("Cast", [current], ["as_float"], to=TensorProto.FLOAT))
        mean = np.asarray(spec.input_mean, np.float32)
        std = np.asarray(spec.input_std, np.float32)
        shape = (1, 1, 1, 3) if input_is_channels_last(spec.input_format) else (1, 3, 1, 1)
        inits += [
            numpy_helper.from_array(mean.reshape(shape), "mean"),
            numpy_helper.from_array((1 / std).reshape(shape), "inv_std"),
        ]
        nodes += [
            helper.make_node("Sub", ["as_float", "mean"], ["centred"]),
            helper.make_node("Mul", ["centred", "inv_std"], ["normalised"]),
        ]
        current = "normalised"
    if input_is_channels_last(spec.input_format):
        nodes.append(helper.make_node("Transpose", [current], ["nchw"], perm=[0, 3, 1, 2]))
        current = "nchw"
    cell = side // GRID
    inits.append(numpy_helper.from_array(np.asarray([0, -1], np.int64), "flat_shape"))
    nodes += [
        helper.make_node(
            "AveragePool", [current], ["grid"], kernel_shape=[cell, cell], strides=[cell, cell]
        ),
        helper.make_node("Reshape", ["grid", "flat_shape"], ["flat"]),
        helper.make_node("MatMul", ["flat", "projection"], [spec.output_name]),
    ]
    elem = TensorProto.UINT8 if input_is_pixels(spec.input_format) else TensorProto.FLOAT
    graph = helper.make_graph(
        nodes,
        "own_model",
        [helper.make_tensor_value_info(spec.input_name, elem, ["N", *spec.input_dims])],
        [helper.make_tensor_value_info(spec.output_name, TensorProto.FLOAT, ["N", dim])],
        initializer=inits,
    )
    # Opset 13 and IR 8: what the Triton venv's onnxruntime reads.
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def write_files(folder: Path, values: dict[str, Any], model: onnx.ModelProto) -> tuple[Path, Path]:
    """``folder/spec.yaml`` (as a user writes it: no family) and ``folder/model.onnx``."""
    folder.mkdir(parents=True, exist_ok=True)
    spec_file, onnx_file = folder / "spec.yaml", folder / "model.onnx"
    plain = {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}
    spec_file.write_text(yaml.safe_dump(plain, sort_keys=False))
    onnx.save(model, str(onnx_file))
    return spec_file, onnx_file


@contextmanager
def second_triton(
    stack: LocalStack, root: Path, repository: Path, *, port_shift: int
) -> Iterator[TritonService]:
    """A real Triton of the stack's install serving ``repository`` on the stack's HTTP port
    plus ``port_shift`` (gRPC and metrics on the next two), data under ``root``; stopped after.
    The session's Triton keeps its own models (other tests assert on them)."""
    base = stack.config
    config = base.model_copy(
        update={
            "root": root,
            "cache": base.cache_folder("triton").parent,  # the stack's install, shared
            "triton_http_port": base.triton_http_port + port_shift,
            "triton_grpc_port": base.triton_http_port + port_shift + 1,
            "triton_metrics_port": base.triton_http_port + port_shift + 2,
        }
    )
    triton = TritonService(config, repository)
    triton.start()
    try:
        yield triton
    finally:
        triton.stop()
