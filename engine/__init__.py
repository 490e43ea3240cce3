"""Shared engine code of Embedding Trident: settings, the error tree, and the adapters.

Modules: :mod:`engine.settings` (typed settings), :mod:`engine.errors` (retriable vs permanent),
:mod:`engine.fetch` and :mod:`engine.images` (following references, decoding),
:mod:`engine.preprocess` (JAX batch preprocessing), :mod:`engine.inference` (Triton),
:mod:`engine.store` (Milvus), :mod:`engine.kafka` (client configuration), :mod:`engine.model`
(the model's description, ONNX conversion, Triton repository).

The earlier pipeline's Python API is exported here (``from engine import ...``):
:class:`ImageEmbeddingPipeline`, :class:`ServiceConfig`, :class:`TritonClient`,
:class:`BaseJAXPreprocessor`, :class:`JAXImagePreprocessor`. They are imported on first use, so
that ``import engine.settings`` stays light for the roles that need none of them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from engine.config import ServiceConfig
    from engine.pipeline import ImageEmbeddingPipeline
    from engine.preprocess_jax import BaseJAXPreprocessor, JAXImagePreprocessor
    from engine.triton_client import TritonClient

_EXPORTS = {
    "ImageEmbeddingPipeline": "engine.pipeline",
    "ServiceConfig": "engine.config",
    "TritonClient": "engine.triton_client",
    "BaseJAXPreprocessor": "engine.preprocess_jax",
    "JAXImagePreprocessor": "engine.preprocess_jax",
}

__all__ = [
    "BaseJAXPreprocessor",
    "ImageEmbeddingPipeline",
    "JAXImagePreprocessor",
    "ServiceConfig",
    "TritonClient",
]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'engine' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
