"""``TritonClient``: the earlier pipeline's Triton client, on the project's Triton adapter.

Every request goes through :class:`engine.inference.TritonEmbedder`, so errors are the
project's: :class:`InferenceUnavailableError` (retriable: down, loading, overloaded, timed out)
and :class:`InferenceConfigurationError` (a model the server does not serve, a wrong tensor
name, shape or dtype).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Literal, Self

import numpy as np
import numpy.typing as npt
from pydantic import ValidationError

from engine.errors import ConfigurationError
from engine.inference import TritonEmbedder
from engine.models import DEFAULT_MODEL_SPEC
from engine.settings import TritonSettings
from schemas.errors import validation_problems

logger = logging.getLogger(__name__)

# The local quick-start stack's Triton (README "What listens where").
TRITON_PORTS = {"http": 18000, "grpc": 18001}

Embeddings = npt.NDArray[np.float32]
Callback = Callable[[Embeddings | Exception], object]


class TritonClient:
    """Embeddings of preprocessed batches from a model served by Triton, over HTTP or gRPC.

    The tensor names given here are defaults that each :meth:`infer` call may override.
    Thread-safe (several threads may infer at once, each on a connection of its own); use it as
    a context manager or call :meth:`close`.
    """

    def __init__(
        self,
        url: str | None = None,
        model_name: str = DEFAULT_MODEL_SPEC.name,
        protocol: Literal["http", "grpc"] = "http",
        input_name: str | None = None,
        output_name: str | None = None,
        *,
        model_version: str = "",
        timeout: float = 30.0,
    ) -> None:
        """``url`` is ``host:port`` (default: the local stack's port for ``protocol``).
        ``input_name`` and ``output_name`` default to the model's own (its spec's in the
        registry, ``engine.models``; the default model's for a model the registry lacks).

        Raises:
            ConfigurationError: an unknown protocol, or a tensor name that contradicts the
                model's spec.
        """
        if protocol not in TRITON_PORTS:
            raise ConfigurationError(f"protocol must be 'http' or 'grpc', got {protocol!r}")
        names = {"input_name": input_name, "output_name": output_name}
        try:
            self._settings = TritonSettings(
                url=url or f"127.0.0.1:{TRITON_PORTS[protocol]}",
                protocol=protocol,
                model_name=model_name,
                model_version=model_version,
                request_timeout_s=timeout,
                **{key: value for key, value in names.items() if value is not None},
            )
        except ValidationError as exc:  # a tensor name the model's spec contradicts
            raise ConfigurationError(validation_problems(exc, whole="Triton client")) from exc
        # Thread-safe, with a connection per thread: the background thread has its own.
        self._embedder = TritonEmbedder(self._settings)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="triton-async")

    @property
    def url(self) -> str:
        return self._settings.url

    @property
    def model_name(self) -> str:
        return self._settings.model_name

    def is_ready(self) -> bool:
        """True when the server is up and the model loaded; never raises."""
        return self._embedder.is_ready()

    def infer(
        self,
        inputs: npt.NDArray[np.float32],
        input_name: str | None = None,
        output_name: str | None = None,
    ) -> Embeddings:
        """The model's output ``[N, D]`` for a preprocessed batch ``[N, 3, H, W]``.

        Raises:
            InferenceUnavailableError: Triton is unreachable, not ready, overloaded or slow.
            InferenceConfigurationError: Triton does not serve the model (the message lists
                the models it serves), or refused the request (tensor names, shape or dtype do
                not match the model).
        """
        return self._embedder.embed(inputs, input_name=input_name, output_name=output_name)

    def async_infer(
        self, inputs: npt.NDArray[np.float32], callback: Callback
    ) -> Future[Embeddings]:
        """Start :meth:`infer` in the background; ``callback`` gets the result array or the
        error (one of :meth:`infer`'s). The returned future holds the same outcome."""

        def run() -> Embeddings:
            try:
                result = self._embedder.embed(inputs)
            except Exception as exc:
                _notify(callback, exc)
                raise
            _notify(callback, result)
            return result

        return self._executor.submit(run)

    def close(self) -> None:
        """Wait for background requests, then close the connections."""
        self._executor.shutdown(wait=True)
        self._embedder.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _notify(callback: Callback, outcome: Embeddings | Exception) -> None:
    try:
        callback(outcome)
    except Exception:  # the caller's bug must not be mistaken for Triton's
        logger.exception("async_infer callback raised")
