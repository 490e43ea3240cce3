"""The one description of each embedding model served by Triton.

Everything that must agree between the ONNX graph, the Triton ``config.pbtxt`` (python and
onnxruntime backends alike), the worker's inference client and the vectors stored in Milvus is
derived from a :class:`ModelSpec`: the model repository is generated from it, and the settings'
defaults (``TritonSettings``, ``MilvusSettings.dimension``) come from the specs below.

The project serves one set of weights under two inputs (issue 12.3):

- :data:`UINT8_MODEL_SPEC` (the worker's and query API's default): uint8 RGB pixels
  ``[N, 224, 224, 3]`` as the built-in preprocessing leaves them after resizing and cropping;
  the graph itself casts, normalises (``(x - 127) / 128``) and transposes to NCHW. 150 KB per
  image on the wire instead of 602 KB.
- :data:`DEFAULT_MODEL_SPEC` (today's model, kept under its name): float32 NCHW, normalised by
  the caller. The earlier pipeline's API and custom ``preprocess.class`` preprocessors use it.

Both store their vectors under one ``model_version_tag``: same weights, same embedding space
(the uint8 graph starts from exactly the float32 path's input values, so the two agree to
cosine >= 0.999, tested), and one collection may hold vectors of either. The optional int8
model (:data:`INT8_MODEL_SPEC`) takes float32 input and has a tag of its own.

:data:`SERVED_MODEL_SPECS` lets settings know which input a project model takes, so a
preprocessing that does not produce it is refused at startup. This module imports only
pydantic and numpy's typing: the worker reads it without onnx installed.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field, model_validator

InstanceKind = Literal["KIND_AUTO", "KIND_CPU", "KIND_GPU"]
InputFormat = Literal["uint8_nhwc", "float32_nchw"]
"""What a model takes: uint8 RGB pixels ``[N, H, W, 3]``, or normalised float32 ``[N, 3, H, W]``."""

ModelBatch = npt.NDArray[Any]
"""A batch in the served model's input format (see :data:`InputFormat`): uint8 NHWC pixels or
float32 NCHW. Preprocessors return it, the Triton adapter sends it as it is."""

_DTYPES: dict[InputFormat, str] = {"uint8_nhwc": "UINT8", "float32_nchw": "FP32"}

PREPROCESS_BATCH_SIZES: tuple[int, ...] = (1, 4, 8, 16, 32, 64)
"""The batch sizes the preprocessing pads a batch to unless told otherwise (each one is a shape
compiled per scale bucket, see engine/resampling.py); the largest is the models' max_batch_size.
``PreprocessSettings.batch_sizes``, the preprocessors and the earlier API's config default to it."""


class ModelSpec(BaseModel):
    """Name, tensors, batching, runtime tuning and version tag of one served embedding model."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field("efficientnet_lite0_embedding", pattern=r"^[A-Za-z0-9_.-]+$")
    version: int = Field(1, ge=1)
    input_name: str = Field("images", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    input_format: InputFormat = "float32_nchw"
    image_size: int = Field(224, ge=1)
    # The built-in preprocessing resizes the shorter side to this, then crops the centre
    # image_size square (the usual 224/256 crop); resize_short_side_for keeps the ratio for
    # another crop size.
    resize_short_side: int = Field(256, ge=1)
    # Folded into the uint8 graph (per RGB channel, 0-255 scale); float32 callers normalise.
    input_mean: tuple[float, float, float] = (127.0, 127.0, 127.0)
    input_std: tuple[float, float, float] = (128.0, 128.0, 128.0)
    output_name: str = Field("embedding", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    output_dim: int = Field(1280, ge=1)
    output_dtype: Literal["FP32"] = "FP32"
    # Runtime settings below: docs/PERFORMANCE.md, "Triton tuning" (measured on the project's
    # 2-core machine): spinning off; one single-threaded instance per core, which keeps its
    # speed when other work takes part of a core (one instance with 2 threads does not). The
    # workers' triton.parallel_requests splits each batch over the instances. A 16-row half
    # batch is a preferred size, so the two halves are not merged back into one execution.
    max_batch_size: int = Field(64, ge=1)
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
    # Stored next to every vector so that vectors of different models are never mixed.
    model_version_tag: str = Field("efficientnet_lite0-imagenet-v1", min_length=1)

    @property
    def input_dims(self) -> tuple[int, int, int]:
        """The input's dims without the batch dimension, in its layout."""
        side = self.image_size
        return (side, side, 3) if self.input_format == "uint8_nhwc" else (3, side, side)

    def resize_short_side_for(self, image_size: int) -> int:
        """The shorter side an image is resized to before its centre ``image_size`` crop: the
        model's own ratio, ``resize_short_side / self.image_size``, rounded to a pixel."""
        return round(image_size * self.resize_short_side / self.image_size)

    @property
    def input_dtype(self) -> str:
        """The input's Triton data type name (``UINT8`` or ``FP32``)."""
        return _DTYPES[self.input_format]

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
        return self


DEFAULT_MODEL_SPEC = ModelSpec()
UINT8_MODEL_SPEC = DEFAULT_MODEL_SPEC.model_copy(
    update={"name": f"{DEFAULT_MODEL_SPEC.name}_uint8", "input_format": "uint8_nhwc"}
)
INT8_MODEL_SPEC = DEFAULT_MODEL_SPEC.model_copy(
    update={
        "name": f"{DEFAULT_MODEL_SPEC.name}_int8",
        "model_version_tag": f"{DEFAULT_MODEL_SPEC.model_version_tag}-int8",
    }
)
SERVED_MODEL_SPECS: dict[str, ModelSpec] = {
    spec.name: spec for spec in (UINT8_MODEL_SPEC, DEFAULT_MODEL_SPEC, INT8_MODEL_SPEC)
}
"""The project's own models by name (the int8 one only when written with ``--int8``)."""


def project_model_for(input_format: InputFormat) -> ModelSpec:
    """The project's float32-weights model taking ``input_format``."""
    return UINT8_MODEL_SPEC if input_format == "uint8_nhwc" else DEFAULT_MODEL_SPEC
