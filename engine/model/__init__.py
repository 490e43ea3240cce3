"""The embedding model: its one description (:mod:`.spec`), ONNX conversion, Triton repository.

Only the spec is imported here: the worker reads it without onnx installed. Conversion lives in
:mod:`engine.model.efficientnet_lite` and :mod:`engine.model.triton_repository`.
"""

from engine.model.spec import DEFAULT_MODEL_SPEC, ModelSpec

__all__ = ["DEFAULT_MODEL_SPEC", "ModelSpec"]
