"""Shared engine code of Embedding Trident: settings, the error tree, and the adapters.

Modules: :mod:`engine.settings` (typed settings), :mod:`engine.errors` (retriable vs permanent),
:mod:`engine.fetch` and :mod:`engine.images` (following references, decoding),
:mod:`engine.preprocess` (JAX batch preprocessing), :mod:`engine.inference` (Triton),
:mod:`engine.store` (Milvus), :mod:`engine.kafka` (client configuration), :mod:`engine.model`
(the model's description, ONNX conversion, Triton repository).
"""
