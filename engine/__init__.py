"""The runtime engine of Embedding Trident: settings, the error tree, and the adapters.

The worker, the query API and the producer are built on this package; nothing here imports them,
the earlier pipeline's API (:mod:`jax_embedding`) or the model build tooling (:mod:`model_build`).

Modules:

- :mod:`engine.settings`: the typed settings, read once at each entry point (``load_settings``);
- :mod:`engine.errors`: the one error tree (retriable versus permanent), drawn in its docstring;
- :mod:`engine.fetch`, :mod:`engine.images`: following image references, decoding them;
- :mod:`engine.preprocess`: the preprocessors the settings describe (``build_preprocessor``),
  on :mod:`engine.resampling`, the JAX resize, crop and normalise kernel (jit + vmap);
- :mod:`engine.models`: the one description of each served model (:class:`ModelSpec`);
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
        PermanentError,
        Reason,
        RetriableError,
        Stage,
        TridentError,
    )
    from engine.fetch import ImageFetcher
    from engine.images import DecodedImage, decode_image
    from engine.indexes import IndexSpec
    from engine.inference import TritonEmbedder
    from engine.models import ModelSpec
    from engine.preprocess import BaseJAXPreprocessor, JAXImagePreprocessor, build_preprocessor
    from engine.records import Hit, VectorRecord
    from engine.settings import Settings, load_settings
    from engine.store import VectorStore

_EXPORTS = {
    "ConfigurationError": "engine.errors",
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
    "ModelSpec",
    "PermanentError",
    "Reason",
    "RetriableError",
    "Settings",
    "Stage",
    "TridentError",
    "TritonEmbedder",
    "VectorRecord",
    "VectorStore",
    "build_preprocessor",
    "decode_image",
    "load_settings",
]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'engine' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
