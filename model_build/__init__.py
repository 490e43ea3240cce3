"""Build-time model tooling: ONNX conversion, quantisation, the Triton model repository.

Used by the local stack (``devstack``), the container build (``docker/triton.Dockerfile``) and
the ``trident-model-repository`` command; never imported by the worker or the query API at run
time (``tests/unit/test_layout.py``), which read only the models' descriptions in
:mod:`engine.models`. Needs the ``model`` extra (``onnx`` and the packaged weights).

- :mod:`model_build.torch_pickle`: reads the legacy torch pickle of the weights without torch;
- :mod:`model_build.efficientnet_lite`: builds the ONNX embedding graph of an EfficientNet-Lite
  (Lite0, Lite1, Lite2: the architecture read from the weights' shapes) from them;
- :mod:`model_build.quantize`: the optional int8 model;
- :mod:`model_build.triton_repository`: writes a Triton model repository from the specs (Lite0's
  models, and any other built-in model asked for).
"""

__all__: list[str] = []
