"""The runtime engine of Embedding Trident: settings, the error tree, and the adapters.

The worker, the query API and the producer are built on this package; nothing here imports them,
the earlier pipeline's API (:mod:`jax_embedding`) or the model build tooling (:mod:`model_build`).

Modules:

- :mod:`engine.settings`: the typed settings, read once at each entry point (``load_settings``);
- :mod:`engine.errors`: the one error tree (retriable versus permanent), drawn in its docstring;
- :mod:`engine.fetch`, :mod:`engine.images`: following image references, decoding them;
- :mod:`engine.preprocess`: the preprocessors the settings describe (``build_preprocessor``),
  on :mod:`engine.resampling`, the JAX resize, crop and normalise kernel (jit + vmap);
- :mod:`engine.models`: the model registry, one description of each servable model
  (:class:`ModelSpec`, ``model_registry``, ``model_spec``);
- :mod:`engine.inference`: the Triton adapter (:class:`TritonEmbedder`);
- :mod:`engine.store`, :mod:`engine.records`, :mod:`engine.indexes`: the Milvus adapter, the
  records it stores, the index types and their parameter ranges;
- :mod:`engine.kafka`: Kafka client configuration and topics.

The names below are imported on first use, so ``import engine.settings`` stays light (no JAX,
pymilvus or tritonclient) for the roles that need none of them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from engine.errors import (
        ConfigurationError,
        ModelMismatchError,
        ModelSpecError,
        PermanentError,
        Reason,
        RetriableError,
        Stage,
        TridentError,
        UnknownModelError,
    )
    from engine.fetch import ImageFetcher
    from engine.images import DecodedImage, decode_image
    from engine.indexes import IndexSpec
    from engine.inference import TritonEmbedder
    from engine.models import ModelSpec, model_registry, model_spec
    from engine.preprocess import BaseJAXPreprocessor, JAXImagePreprocessor, build_preprocessor
    from engine.records import Hit, VectorRecord
    from engine.settings import Settings, load_settings
    from engine.store import VectorStore

_EXPORTS = {
    "ConfigurationError": "engine.errors",
    "ModelMismatchError": "engine.errors",
    "ModelSpecError": "engine.errors",
    "UnknownModelError": "engine.errors",
    "PermanentError": "engine.errors",
    "Reason": "engine.errors",
    "RetriableError": "engine.errors",
    "Stage": "engine.errors",
    "TridentError": "engine.errors",
    "ImageFetcher": "engine.fetch",
    "DecodedImage": "engine.images",
    "decode_image": "engine.images",
    "IndexSpec": "engine.indexes",
    "TritonEmbedder": "engine.inference",
    "ModelSpec": "engine.models",
    "model_registry": "engine.models",
    "model_spec": "engine.models",
    "BaseJAXPreprocessor": "engine.preprocess",
    "JAXImagePreprocessor": "engine.preprocess",
    "build_preprocessor": "engine.preprocess",
    "Hit": "engine.records",
    "VectorRecord": "engine.records",
    "Settings": "engine.settings",
    "load_settings": "engine.settings",
    "VectorStore": "engine.store",
}

__all__ = [
    "BaseJAXPreprocessor",
    "ConfigurationError",
    "DecodedImage",
    "Hit",
    "ImageFetcher",
    "IndexSpec",
    "JAXImagePreprocessor",
    "ModelMismatchError",
    "ModelSpec",
    "ModelSpecError",
    "PermanentError",
    "Reason",
    "RetriableError",
    "Settings",
    "Stage",
    "TridentError",
    "TritonEmbedder",
    "UnknownModelError",
    "VectorRecord",
    "VectorStore",
    "build_preprocessor",
    "decode_image",
    "load_settings",
    "model_registry",
    "model_spec",
]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'engine' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
