"""The one description of the served embedding model.

Everything that must agree between the ONNX graph, the Triton ``config.pbtxt`` (python and
onnxruntime backends alike), the worker's inference client and the vectors stored in Milvus is
derived from a :class:`ModelSpec`: the model repository is generated from it, and the settings'
defaults (``TritonSettings``, ``MilvusSettings.dimension``) come from :data:`DEFAULT_MODEL_SPEC`.
Settings that override those defaults must still match the served model: Triton refuses a
mismatched request (``InferenceConfigurationError``), the store a vector of the wrong size.
This module imports only pydantic: the worker can read it without onnx installed.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

InstanceKind = Literal["KIND_AUTO", "KIND_CPU", "KIND_GPU"]


class ModelSpec(BaseModel):
    """Name, tensors, batching and version tag of the embedding model served by Triton."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field("efficientnet_lite0_embedding", pattern=r"^[A-Za-z0-9_.-]+$")
    version: int = Field(1, ge=1)
    input_name: str = Field("images", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    input_dims: tuple[int, int, int] = (3, 224, 224)
    input_dtype: Literal["FP32"] = "FP32"
    output_name: str = Field("embedding", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    output_dim: int = Field(1280, ge=1)
    output_dtype: Literal["FP32"] = "FP32"
    max_batch_size: int = Field(64, ge=1)
    preferred_batch_sizes: tuple[int, ...] = (8, 16, 32, 64)
    max_queue_delay_microseconds: int = Field(2000, ge=0)
    instance_count: int = Field(1, ge=1)
    # Only the native onnxruntime backend can use a GPU; the python backend always runs on CPU.
    onnxruntime_instance_kind: InstanceKind = "KIND_AUTO"
    # 0 lets onnxruntime choose (one thread per core).
    intra_op_threads: int = Field(0, ge=0)
    # Stored next to every vector so that vectors of different models are never mixed.
    model_version_tag: str = Field("efficientnet_lite0-imagenet-v1", min_length=1)

    @model_validator(mode="after")
    def _check_consistency(self) -> ModelSpec:
        if self.input_dims[0] != 3 or min(self.input_dims) < 1:
            raise ValueError(f"input_dims must be (3, H, W) with H, W >= 1, got {self.input_dims}")
        bad = [b for b in self.preferred_batch_sizes if not 1 <= b <= self.max_batch_size]
        if bad:
            raise ValueError(f"preferred_batch_sizes {bad} outside 1..{self.max_batch_size}")
        if self.input_name == self.output_name:
            raise ValueError("input_name and output_name must differ")
        return self


DEFAULT_MODEL_SPEC = ModelSpec()
