"""The earlier JAX + Triton + Milvus pipeline's Python API and CLI, on this project's engine.

Scripts and notebooks written for the earlier pipeline run here with one change: the import
prefix ``src.`` becomes ``jax_embedding.`` (``from jax_embedding.pipeline import
ImageEmbeddingPipeline``, or ``from jax_embedding import ...``). The classes, functions and the
``jax-embedding`` command keep their earlier names.

This package depends on :mod:`engine`, never the reverse, and nothing in ``worker``,
``query_api`` or ``producer`` imports it (``tests/unit/test_layout.py``). The names below are
imported on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from jax_embedding.config import ServiceConfig
    from jax_embedding.pipeline import ImageEmbeddingPipeline
    from jax_embedding.preprocess_jax import BaseJAXPreprocessor, JAXImagePreprocessor
    from jax_embedding.triton_client import TritonClient

_EXPORTS = {
    "ImageEmbeddingPipeline": "jax_embedding.pipeline",
    "ServiceConfig": "jax_embedding.config",
    "TritonClient": "jax_embedding.triton_client",
    "BaseJAXPreprocessor": "jax_embedding.preprocess_jax",
    "JAXImagePreprocessor": "jax_embedding.preprocess_jax",
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
        raise AttributeError(f"module 'jax_embedding' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
