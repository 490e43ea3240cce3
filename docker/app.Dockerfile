# syntax=docker/dockerfile:1
# One image for the three Python roles: the worker (default CMD), the query API
# (`trident-api --host 0.0.0.0`) and the producer (`trident-produce ...`).
# Build from the repository root: docker build -f docker/app.Dockerfile -t embedding-trident .
# Pinned by tag (same Python minor as CI and the local venv); bump deliberately.
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

# --- build: install the distribution into a self-contained venv -------------------------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
# The venv keeps the same path in both stages: console-script shebangs point into it.
RUN python -m venv /opt/venv
WORKDIR /src
# Only what the wheel needs (README.m[d]: pyproject names it; the glob tolerates its absence).
# Not devstack/: the local stack is for source checkouts (make up, make test), never a container;
# without its folder the wheel built here has no devstack package, so its console script goes.
COPY pyproject.toml README.m[d] ./
COPY schemas/ schemas/
COPY engine/ engine/
COPY jax_embedding/ jax_embedding/
COPY model_build/ model_build/
COPY producer/ producer/
COPY worker/ worker/
COPY query_api/ query_api/
COPY reembed/ reembed/
# Runtime dependencies only: no [dev], no [model] (the model is built into the Triton image).
RUN /opt/venv/bin/pip install . \
    && rm /opt/venv/bin/trident-stack /opt/venv/bin/trident-model-repository

# --- runtime ----------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE}
# Non-root: the roles need no privileges, and a compromised image decoder (untrusted images
# arrive from Kafka) should not own the container.
RUN useradd --system --uid 10001 --create-home --home-dir /home/trident --shell /usr/sbin/nologin trident
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
USER 10001
WORKDIR /home/trident
# 9400: worker /livez /readyz /metrics (worker.health_port); 8080: query API (api.port).
EXPOSE 9400 8080
# Worker liveness (slim has no curl). The API and the producer override or disable this in
# compose. A non-2xx answer raises, so the check fails. The worker opens its health port only
# after creating topics and compiling every JAX batch shape: hence the long start period.
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/livez' % os.environ.get('TRIDENT_WORKER__HEALTH_PORT', '9400'), timeout=4)"]
# No fixed ENTRYPOINT: compose picks the role with `command`.
CMD ["trident-worker"]
