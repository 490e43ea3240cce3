"""EfficientNet-Lite1 and Lite2 beside Lite0 (issue 23.2): the architecture read from the
weights' shapes, and each converted model checked against references.

- Shapes -> stages: :func:`read_architecture` against the family's published rule
  (``efficientnet_lite()``'s blocks_args scaled by a width and a depth coefficient, the first and
  last stage's repeats and the stem and head unscaled), on the packaged weights and on
  shape-only weights of other coefficients.
- The ImageNet classifier that comes with each model's weights, on scikit-image's photographs.
  ImageNet-1k class indices (as in every ImageNet label list); the top-5 each model gives on
  the uint8 path (reference_pixels at the spec's size), for a human to check:

  image    model top-5 (index, name)
  chelsea  Lite0 282 tiger cat, 285 Egyptian cat, 281 tabby, 287 lynx, 904
  chelsea  Lite1 285 Egyptian cat, 282 tiger cat, 281 tabby, 287 lynx, 942
  chelsea  Lite2 285 Egyptian cat, 282 tiger cat, 281 tabby, 287 lynx, 622
  coffee   Lite0 967 espresso, 968 cup, 925 consomme, 960 chocolate sauce, 504 coffee mug
  coffee   Lite1 967 espresso, 968 cup, 925 consomme, 809 soup bowl, 504 coffee mug
  coffee   Lite2 967 espresso, 968 cup, 925 consomme, 960 chocolate sauce, 504 coffee mug
  camera   Lite0 872 tripod, 593, 447 binoculars, 650 microphone, 759 reflex camera
  camera   Lite1 872 tripod, 593, 447 binoculars, 650 microphone, 875
  camera   Lite2 872 tripod, 759 reflex camera, 447 binoculars, 593, 523
  rocket   Lite0 657 missile, 744 projectile, 540 drilling platform, 812 space shuttle, 668
  rocket   Lite1 812 space shuttle, 657 missile, 540 drilling platform, 744 projectile, 517 crane
  rocket   Lite2 540 drilling platform, 657 missile, 744 projectile, 812 space shuttle, 517 crane

  Lite2 calls the rocket on its launch tower a drilling platform (its rocket classes follow),
  so for the rocket a rocket class must be in the top 3; for the others the top-1 must be right.
- Numerically, Lite1 and Lite2 against a literal numpy forward pass of the PyTorch model, with
  its blocks laid out by the published rule (not by the reader under test).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import onnxruntime as ort
import pytest
from skimage import data

from engine.errors import ConfigurationError
from engine.models import LITE1_MODEL_SPEC, LITE2_MODEL_SPEC, UINT8_MODEL_SPEC, ModelSpec
from engine.resampling import reference_pixels, reference_preprocess
from model_build.efficientnet_lite import (
    BASE_STAGES,
    BN_EPS,
    LOGITS_NAME,
    Architecture,
    Stage,
    build_embedding_model,
    load_packaged_weights,
    read_architecture,
)

# efficientnet_lite()'s blocks_args, as published (efficientnet-lite-pytorch, TF's builder).
BLOCKS_ARGS = (
    "r1_k3_s11_e1_i32_o16",
    "r2_k3_s22_e6_i16_o24",
    "r2_k5_s22_e6_i24_o40",
    "r3_k3_s22_e6_i40_o80",
    "r3_k5_s11_e6_i80_o112",
    "r4_k5_s22_e6_i112_o192",
    "r1_k3_s11_e6_i192_o320",
)
STEM, HEAD = 32, 1280
# (width, depth) coefficients of efficientnet_lite_params().
COEFFICIENTS = {"lite0": (1.0, 1.0), "lite1": (1.0, 1.1), "lite2": (1.1, 1.2), "lite4": (1.4, 1.8)}
SPECS = {"lite0": UINT8_MODEL_SPEC, "lite1": LITE1_MODEL_SPEC, "lite2": LITE2_MODEL_SPEC}

# ImageNet-1k class indices.
CATS = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat
COFFEE = {967, 968, 504}  # espresso, cup, coffee mug
CAMERA = {872, 759, 732}  # tripod, reflex camera, Polaroid camera
ROCKET = {657, 744, 812}  # missile, projectile, space shuttle
TOP1 = {"chelsea": CATS, "coffee": COFFEE, "camera": CAMERA}


def round_filters(filters: int, width: float) -> int:
    """utils.round_filters: scale, round to a multiple of 8, never below 90 % of the scaled."""
    scaled = filters * width
    rounded = max(8, int(scaled + 4) // 8 * 8)
    return rounded + 8 if rounded < 0.9 * scaled else rounded


def published_stages(width: float, depth: float) -> tuple[Stage, ...]:
    """The stages of the EfficientNet-Lite of these coefficients, by the published rule."""
    stages = []
    channels = STEM  # the stem is not scaled
    for index, text in enumerate(BLOCKS_ARGS):
        fields = {part[0]: part[1:] for part in text.split("_")}
        repeats = int(fields["r"])
        if 0 < index < len(BLOCKS_ARGS) - 1:  # Lite keeps the first and last stage's repeats
            repeats = math.ceil(depth * repeats)
        out = round_filters(int(fields["o"]), width)
        stage = Stage(
            repeats, int(fields["k"]), int(fields["s"][0]), int(fields["e"]), channels, out
        )
        stages.append(stage)
        channels = out
    return tuple(stages)


def shapes_only(stages: tuple[Stage, ...], head: int = HEAD) -> dict[str, np.ndarray]:
    """A state dict of the right shapes for ``stages``, holding no data (broadcast zeros)."""
    shapes: dict[str, tuple[int, ...]] = {"_conv_stem.weight": (STEM, 3, 3, 3)}
    index = 0
    for stage in stages:
        for repeat in range(stage.repeats):
            in_ch = stage.in_channels if repeat == 0 else stage.out_channels
            hidden = in_ch * stage.expand
            prefix = f"_blocks.{index}"
            if stage.expand != 1:
                shapes[f"{prefix}._expand_conv.weight"] = (hidden, in_ch, 1, 1)
            shapes[f"{prefix}._depthwise_conv.weight"] = (hidden, 1, stage.kernel, stage.kernel)
            shapes[f"{prefix}._project_conv.weight"] = (stage.out_channels, hidden, 1, 1)
            index += 1
    shapes["_conv_head.weight"] = (head, stages[-1].out_channels, 1, 1)
    return {key: np.broadcast_to(np.float32(0), shape) for key, shape in shapes.items()}


@pytest.fixture(scope="module")
def packaged() -> Callable[[str], dict[str, np.ndarray]]:
    cache: dict[str, dict[str, np.ndarray]] = {}

    def load(variant: str) -> dict[str, np.ndarray]:
        if variant not in cache:
            cache[variant] = load_packaged_weights(SPECS[variant])
        return cache[variant]

    return load


# --- shapes -> stages ----------------------------------------------------------------------


def test_the_published_rule_gives_the_base_stages_at_coefficients_one() -> None:
    assert published_stages(1.0, 1.0) == BASE_STAGES


@pytest.mark.parametrize("variant", ["lite0", "lite1", "lite2"])
def test_reads_the_packaged_weights_as_the_published_architecture(
    variant: str, packaged: Callable[[str], dict[str, np.ndarray]]
) -> None:
    architecture = read_architecture(packaged(variant))
    assert architecture == Architecture(STEM, published_stages(*COEFFICIENTS[variant]), HEAD)
    assert architecture.head_channels == SPECS[variant].output_dim


def test_lite1_and_lite2_scale_as_the_issue_says(
    packaged: Callable[[str], dict[str, np.ndarray]],
) -> None:
    lite1, lite2 = (read_architecture(packaged(v)).stages for v in ("lite1", "lite2"))
    assert [s.repeats for s in lite1] == [1, 3, 3, 4, 4, 5, 1]  # depth 1.1, widths as Lite0
    assert [s.out_channels for s in lite1] == [s.out_channels for s in BASE_STAGES]
    assert [s.repeats for s in lite2] == [1, 3, 3, 4, 4, 5, 1]  # depth 1.2
    assert [s.out_channels for s in lite2] == [16, 24, 48, 88, 120, 208, 352]  # width 1.1


@pytest.mark.parametrize(("width", "depth"), [(1.0, 1.4), (1.2, 1.0), (1.4, 1.8)])
def test_reads_other_coefficients_from_shapes_alone(width: float, depth: float) -> None:
    stages = published_stages(width, depth)
    architecture = read_architecture(shapes_only(stages))
    assert architecture.stages == stages
    assert architecture.blocks == sum(s.repeats for s in stages)


def _replace(stages: tuple[Stage, ...], index: int, **changes: int) -> tuple[Stage, ...]:
    fields = {**vars(stages[index]), **changes}
    return (*stages[:index], Stage(**fields), *stages[index + 1 :])


def test_refuses_shapes_that_are_not_the_family() -> None:
    base = published_stages(1.1, 1.2)
    cases = {
        "kernel 7 in stage 2": (shapes_only(_replace(base, 2, kernel=7)), "not EfficientNet"),
        "expansion 4 in stage 3": (shapes_only(_replace(base, 3, expand=4)), "not EfficientNet"),
        "a stage missing": (shapes_only(base[:-1]), "not EfficientNet"),
    }
    broken_chain = shapes_only(base)
    broken_chain["_blocks.4._expand_conv.weight"] = np.broadcast_to(np.float32(0), (144, 48, 1, 1))
    cases["a block not fed by the one before"] = (broken_chain, r"_blocks\.4 takes 48 channels")
    gap = {k: v for k, v in shapes_only(base).items() if not k.startswith("_blocks.3.")}
    cases["a block missing"] = (gap, r"_blocks\.3\.")
    for name, (weights, message) in cases.items():
        with pytest.raises(ConfigurationError, match=message):
            read_architecture(weights)
        assert name


def test_a_spec_of_another_dimension_is_refused(
    packaged: Callable[[str], dict[str, np.ndarray]],
) -> None:
    spec = LITE1_MODEL_SPEC.model_copy(update={"output_dim": 1024})
    with pytest.raises(ConfigurationError, match="embed in 1280 dims"):
        build_embedding_model(packaged("lite1"), spec)


# --- the ImageNet classifier on reference images -------------------------------------------


def _session(spec: ModelSpec, weights: dict[str, np.ndarray]) -> ort.InferenceSession:
    model = build_embedding_model(weights, spec, with_classifier=True)
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("variant", ["lite0", "lite1", "lite2"])
def test_the_classifier_names_the_reference_images(
    variant: str, packaged: Callable[[str], dict[str, np.ndarray]]
) -> None:
    spec = SPECS[variant]
    session = _session(spec, packaged(variant))
    names = [*TOP1, "rocket"]
    pixels = np.stack(
        [
            reference_pixels(
                getattr(data, name)() if name != "camera" else np.dstack([data.camera()] * 3),
                image_size=spec.image_size,
                resize_short_side=spec.resize_short_side,
            )
            for name in names
        ]
    )
    assert pixels.shape[1:] == spec.input_dims
    embedding, logits = session.run([spec.output_name, LOGITS_NAME], {spec.input_name: pixels})
    top = np.argsort(-logits, axis=1)
    for row, name in enumerate(names[:-1]):
        assert int(top[row, 0]) in TOP1[name], (variant, name, top[row, :5].tolist())
    assert ROCKET & set(top[-1, :3].tolist()), (variant, "rocket", top[-1, :5].tolist())
    assert embedding.shape == (len(names), spec.output_dim)
    np.testing.assert_allclose(np.linalg.norm(embedding, axis=1), 1.0, atol=1e-5)


# --- against a literal numpy forward pass ----------------------------------------------------


def _conv(x: np.ndarray, w: np.ndarray, stride: int, depthwise: bool) -> np.ndarray:
    """Conv2dStaticSamePadding.forward for one CHW image: TF-SAME zero padding, then conv."""
    k, (_, h, wd) = w.shape[-1], x.shape
    pads = [max((-(-n // stride) - 1) * stride + k - n, 0) for n in (h, wd)]
    x = np.pad(x, [(0, 0), *((p // 2, p - p // 2) for p in pads)])
    win = np.lib.stride_tricks.sliding_window_view(x, (k, k), axis=(1, 2))[:, ::stride, ::stride]
    out: np.ndarray = (
        np.einsum("chwij,cij->chw", win, w[:, 0])
        if depthwise
        else np.einsum("chwij,ocij->ohw", win, w, optimize=True)
    )
    return out


def _reference_logits(
    weights: dict[str, np.ndarray], stages: tuple[Stage, ...], image: np.ndarray
) -> np.ndarray:
    """EfficientNet.forward (eval mode), BatchNorm unfolded, in float64."""
    w = {k: v.astype(np.float64) for k, v in weights.items()}

    def bn(x: np.ndarray, name: str) -> np.ndarray:
        g, b, m, v = (
            w[f"{name}.{p}"][:, None, None]
            for p in ("weight", "bias", "running_mean", "running_var")
        )
        out: np.ndarray = (x - m) / np.sqrt(v + BN_EPS) * g + b
        return out

    def relu6(x: np.ndarray) -> np.ndarray:
        return np.clip(x, 0.0, 6.0)

    x = relu6(bn(_conv(image.astype(np.float64), w["_conv_stem.weight"], 2, False), "_bn0"))
    strides = [s.stride if r == 0 else 1 for s in stages for r in range(s.repeats)]
    for i, stride in enumerate(strides):
        p, inputs = f"_blocks.{i}", x
        if f"{p}._expand_conv.weight" in w:
            x = relu6(bn(_conv(x, w[f"{p}._expand_conv.weight"], 1, False), f"{p}._bn0"))
        x = relu6(bn(_conv(x, w[f"{p}._depthwise_conv.weight"], stride, True), f"{p}._bn1"))
        x = bn(_conv(x, w[f"{p}._project_conv.weight"], 1, False), f"{p}._bn2")
        if x.shape == inputs.shape:
            x = x + inputs
    x = relu6(bn(_conv(x, w["_conv_head.weight"], 1, False), "_bn1"))
    logits: np.ndarray = w["_fc.weight"] @ x.mean(axis=(1, 2)) + w["_fc.bias"]
    return logits


@pytest.mark.parametrize("variant", ["lite1", "lite2"])
def test_matches_a_literal_forward_pass(
    variant: str, packaged: Callable[[str], dict[str, np.ndarray]]
) -> None:
    spec = SPECS[variant].model_copy(update={"input_format": "float32_nchw"})
    image = reference_preprocess(
        data.coffee(), image_size=spec.image_size, resize_short_side=spec.resize_short_side
    )
    _, logits = _session(spec, packaged(variant)).run(
        [spec.output_name, LOGITS_NAME], {spec.input_name: image[None]}
    )
    expected = _reference_logits(packaged(variant), published_stages(*COEFFICIENTS[variant]), image)
    np.testing.assert_allclose(logits[0], expected, rtol=0, atol=2e-4)


def test_every_input_format_gives_the_same_vectors(
    packaged: Callable[[str], dict[str, np.ndarray]],
) -> None:
    """The registry's four input formats: pixels or normalised floats, NHWC or NCHW."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (2, *LITE1_MODEL_SPEC.input_dims), dtype=np.uint8)
    floats = (pixels.astype(np.float32) - 127.0) / 128.0  # the family's normalisation
    inputs = {
        "uint8_nhwc": pixels,
        "uint8_nchw": pixels.transpose(0, 3, 1, 2),
        "float32_nhwc": floats,
        "float32_nchw": floats.transpose(0, 3, 1, 2),
    }
    vectors = {}
    for input_format, batch in inputs.items():
        spec = LITE1_MODEL_SPEC.model_copy(update={"input_format": input_format})
        model = build_embedding_model(packaged("lite1"), spec)
        session = ort.InferenceSession(
            model.SerializeToString(), providers=["CPUExecutionProvider"]
        )
        feed = {spec.input_name: np.ascontiguousarray(batch)}
        vectors[input_format] = session.run([spec.output_name], feed)[0]
    for input_format, got in vectors.items():
        np.testing.assert_allclose(got, vectors["uint8_nhwc"], atol=1e-6, err_msg=input_format)
