"""Triton adapter: send a preprocessed batch, get embeddings back.

The batch is sent as the served model takes it (``TritonSettings.input_format``): uint8
``[N, H, W, 3]`` pixels (``UINT8``) or float32 ``[N, 3, H, W]`` (``FP32``; other float dtypes
are cast). A batch of the other kind, e.g. float32 for the uint8 model, is refused before
anything is sent (:class:`InferenceConfigurationError`): settings check that preprocessing and
model agree at startup, so this only happens when code hands over something else.

Owns tritonclient's errors: everything that means "Triton is down, starting, overloaded or slow"
becomes :class:`InferenceUnavailableError` (retriable); a request Triton rejects as malformed or a
model it does not serve becomes :class:`InferenceConfigurationError`, because no retry and no
dead letter can fix a deployment that does not match the settings. "Not served" is decided by the
server's repository index, never by a "not found" alone, which a loading server answers too.

Readiness (:meth:`TritonEmbedder.check_ready`) asks with a deadline on a client of its own;
:meth:`TritonEmbedder.wait_until_ready` is what the worker and the query API do at start-up
(``triton.ready_timeout_s``). Given the model's spec, it then checks that the served model is
that one (:meth:`TritonEmbedder.check_model`: Triton's model metadata, tensor names, dims and
data types), and refuses with :class:`ModelMismatchError` otherwise.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from functools import partial
from typing import Any

import gevent
import numpy as np
import numpy.typing as npt
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from engine.errors import (
    InferenceConfigurationError,
    InferenceUnavailableError,
    ModelMismatchError,
    Reason,
    Stage,
)
from engine.models import (
    ModelBatch,
    ModelSpec,
    TensorDescription,
    input_is_channels_last,
    input_is_pixels,
    tensor_problems,
)
from engine.priorities import PRIORITY, Role
from engine.settings import TritonSettings

logger = logging.getLogger(__name__)

# Statuses that describe a request the server understood and refused for good. NOT_FOUND is
# not one of them: a server that is shutting down or still loading reports its model as unknown.
_CONFIGURATION_STATUSES = frozenset({"StatusCode.INVALID_ARGUMENT", "400"})
# "Unknown model": a configuration error only if the server's repository index agrees.
_NOT_FOUND_STATUSES = frozenset({"StatusCode.NOT_FOUND", "404"})
# Each readiness question's own deadline while waiting for the model at start-up.
_READY_PROBE_TIMEOUT_S = 5.0


class TritonEmbedder:
    """Embeds preprocessed image batches with a model served by Triton.

    A batch goes out in ``parallel_requests`` equal parts sent at once (more parts when one
    would exceed the model's ``max_batch_size``), so that each model instance runs one; the
    result always has one row per input row, in order.

    Thread-safe: every thread gets a client of its own, opened on its first call (the query API
    embeds from many request threads, the worker from its loop and its probes). tritonclient's
    HTTP client must stay on one thread: it runs its requests as greenlets on the calling
    thread's gevent hub. A client per thread also means that one thread's failure drops only its
    own connection, never one another thread is in the middle of using. The clients of threads
    that have ended are closed when the next thread connects; :meth:`close` (from any thread)
    closes them all. Readiness probes (:meth:`check_ready`) use a short-lived client of their own.
    """

    def __init__(
        self, settings: TritonSettings, *, model: ModelSpec | None = None, role: Role = "ingest"
    ) -> None:
        """``model``: the spec the served model must match (``Settings.model``), checked by
        :meth:`wait_until_ready`; None checks only that it is served. ``role``: whom the
        requests are for; a ``"query"`` embedder's requests leave Triton's queue before the
        ingest's (:mod:`engine.priorities`)."""
        self._settings = settings
        self._model = model
        self._priority = PRIORITY[role]
        self._clients: dict[threading.Thread, Any] = {}
        self._lock = threading.Lock()

    def _connect(self) -> Any:
        """This thread's client, opened on first use."""
        thread = threading.current_thread()
        with self._lock:
            client = self._clients.get(thread)
            if client is not None:
                return client
            ended = [self._clients.pop(t) for t in list(self._clients) if not t.is_alive()]
        for old in ended:
            _close_quietly(old)
        client = self._new_client(self._settings.request_timeout_s)
        with self._lock:
            self._clients[thread] = client
        return client

    def _new_client(self, timeout_s: float) -> Any:
        s = self._settings
        if s.protocol == "grpc":
            # gRPC calls take their deadline per call (client_timeout).
            return grpcclient.InferenceServerClient(url=s.url)
        return httpclient.InferenceServerClient(
            url=s.url,
            concurrency=s.parallel_requests,
            connection_timeout=timeout_s,
            network_timeout=timeout_s,
        )

    def close(self) -> None:
        """Close every thread's client; the next call reconnects. Never raises."""
        with self._lock:
            clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            _close_quietly(client)

    def __enter__(self) -> TritonEmbedder:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # Readiness ------------------------------------------------------------------------------

    def check_ready(self, timeout_s: float | None = None) -> None:
        """Return when the server is up and the model loaded; otherwise raise, saying why.

        Asks on a client of its own, closed after, each call bounded by ``timeout_s`` (default
        ``request_timeout_s``), so a probe never touches the clients embedding.

        Raises:
            InferenceUnavailableError: the server is unreachable, starting or stopping, did not
                answer in time, or has the model but not ready (loading, unloading, failed).
            InferenceConfigurationError: the server is ready and does not know the model; the
                message names the models it serves.
        """
        timeout = timeout_s if timeout_s is not None else self._settings.request_timeout_s
        client = self._new_client(timeout)
        try:
            self._check_ready(client, timeout)
        finally:
            _close_quietly(client)

    def _check_ready(self, client: Any, timeout_s: float) -> None:
        s = self._settings
        where = f"Triton at {s.url} ({s.protocol})"
        deadline = self._call_deadline(timeout_s)
        try:
            if not client.is_server_ready(**deadline):
                raise InferenceUnavailableError(f"{where} is not ready (starting or stopping)")
            if client.is_model_ready(s.model_name, s.model_version, **deadline):
                return
            served = self._served_models(client, deadline)
        except InferenceUnavailableError:
            raise
        except Exception as exc:  # any failure to answer means "unavailable"
            raise self._unanswered(exc) from exc
        if s.model_name not in served:
            listed = ", ".join(sorted(served)) or "none"
            raise InferenceConfigurationError(
                f"{where} does not serve model {s.model_name!r} (it serves: {listed}): "
                "fix triton.model_name or add the model to Triton's repository"
            )
        raise InferenceUnavailableError(
            f"model {s.model_name!r} on {where} is not ready ({served[s.model_name]})"
        )

    def served_models(self, timeout_s: float | None = None) -> dict[str, str]:
        """Every model Triton's repository index lists, with its state (``READY``,
        ``UNAVAILABLE <reason>``, ...), asked on a client of its own within ``timeout_s``
        (default ``request_timeout_s``).

        Raises:
            InferenceUnavailableError: the server did not answer in time, or is unreachable.
        """
        timeout = timeout_s if timeout_s is not None else self._settings.request_timeout_s
        client = self._new_client(timeout)
        try:
            return self._served_models(client, self._call_deadline(timeout))
        except Exception as exc:  # any failure to answer means "unavailable"
            raise self._unanswered(exc) from exc
        finally:
            _close_quietly(client)

    def _call_deadline(self, timeout_s: float) -> dict[str, float]:
        """The per-call deadline keyword: the HTTP client's deadline is its network_timeout
        (set when it was made); gRPC's is given per call."""
        return {"client_timeout": timeout_s} if self._settings.protocol == "grpc" else {}

    def _unanswered(self, exc: BaseException) -> InferenceUnavailableError:
        """What any failure to answer a probe means: the server is unavailable."""
        s = self._settings
        why = str(exc) or type(exc).__name__
        return InferenceUnavailableError(f"Triton at {s.url} ({s.protocol}) did not answer: {why}")

    def _served_models(self, client: Any, deadline: dict[str, float]) -> dict[str, str]:
        """The repository index: every model the server knows (loaded or not) and its state."""
        if self._settings.protocol == "grpc":
            entries = client.get_model_repository_index(as_json=True, **deadline).get("models", [])
        else:
            entries = client.get_model_repository_index()
        return {
            str(entry["name"]): " ".join(
                str(entry[key]) for key in ("state", "reason") if entry.get(key)
            )
            or "not loaded"
            for entry in entries
        }

    def is_ready(self, timeout_s: float | None = None) -> bool:
        """True when the server is up and the model is loaded (:meth:`check_ready`); never
        raises."""
        try:
            self.check_ready(timeout_s)
        except (InferenceUnavailableError, InferenceConfigurationError) as exc:
            logger.debug("Triton readiness probe: %s", exc)
            return False
        return True

    def wait_until_ready(self, timeout_s: float, *, poll_s: float = 1.0) -> None:
        """Block until the model is ready, for at most ``timeout_s`` (``triton.ready_timeout_s``;
        0 does not wait, nor ask). Logs once when it has to wait, and when the wait is over.

        Then, given the model's spec, checks the served model against it (:meth:`check_model`).

        Raises:
            InferenceConfigurationError: the server is up and does not know the model (at once:
                waiting cannot help).
            ModelMismatchError: the served model is not the one its spec describes.
            InferenceUnavailableError: not ready within ``timeout_s``; the message names the
                model, the URL and the last reason.
        """
        if timeout_s <= 0:
            return
        self._wait_for_model(timeout_s, poll_s)
        if self._model is not None:
            self.check_model(self._model, min(_READY_PROBE_TIMEOUT_S, timeout_s))

    def _wait_for_model(self, timeout_s: float, poll_s: float) -> None:
        s = self._settings
        began = time.monotonic()
        deadline = began + timeout_s
        waited = False
        while True:
            left = deadline - time.monotonic()
            try:
                self.check_ready(min(_READY_PROBE_TIMEOUT_S, max(left, 0.1)))
            except InferenceUnavailableError as exc:
                if time.monotonic() + poll_s >= deadline:
                    raise InferenceUnavailableError(
                        f"Triton model {s.model_name!r} at {s.url} was not ready within "
                        f"{timeout_s:g} s (triton.ready_timeout_s): {exc}; start Triton, or "
                        "check triton.url and triton.protocol"
                    ) from exc
                if not waited:
                    logger.info(
                        "waiting up to %g s for Triton model %r at %s: %s",
                        timeout_s,
                        s.model_name,
                        s.url,
                        exc,
                    )
                    waited = True
                time.sleep(poll_s)
                continue
            if waited:
                logger.info(
                    "Triton model %r at %s ready after %.1f s",
                    s.model_name,
                    s.url,
                    time.monotonic() - began,
                )
            return

    def served_tensors(
        self, timeout_s: float | None = None
    ) -> tuple[list[TensorDescription], list[TensorDescription]]:
        """The served model's inputs and outputs as Triton's model metadata describes them.

        Raises:
            InferenceUnavailableError: Triton did not answer (in ``timeout_s``, default
                ``request_timeout_s``).
            InferenceConfigurationError: Triton refused the question (e.g. an unknown model).
        """
        s = self._settings
        timeout = timeout_s if timeout_s is not None else s.request_timeout_s
        client = self._new_client(timeout)
        try:
            with self._translated_errors():
                json = {"as_json": True} if s.protocol == "grpc" else {}
                metadata = client.get_model_metadata(
                    s.model_name, s.model_version, **json, **self._call_deadline(timeout)
                )
        finally:
            _close_quietly(client)

        def tensors(key: str) -> list[TensorDescription]:
            # gRPC's JSON writes int64 dims as strings.
            return [
                (str(t["name"]), str(t["datatype"]), tuple(int(d) for d in t.get("shape", [])))
                for t in metadata.get(key, [])
            ]

        return tensors("inputs"), tensors("outputs")

    def check_model(self, spec: ModelSpec, timeout_s: float | None = None) -> None:
        """Return when the model Triton serves under ``triton.model_name`` has ``spec``'s
        tensors (names, dims, data types: :func:`engine.models.tensor_problems`).

        Raises:
            ModelMismatchError: it does not; the message lists every difference.
            InferenceUnavailableError, InferenceConfigurationError: as :meth:`served_tensors`.
        """
        inputs, outputs = self.served_tensors(timeout_s)
        problems = tensor_problems(spec, inputs, outputs)
        if problems:
            s = self._settings
            raise ModelMismatchError(
                f"Triton at {s.url} serves model {s.model_name!r} unlike its spec "
                f"({spec.family}, tag {spec.model_version_tag}): {'; '.join(problems)}. Serve the "
                "model the spec describes (trident-models add checks one), or fix the spec or "
                "the settings naming it"
            )

    # Embedding ------------------------------------------------------------------------------

    def embed(
        self,
        batch: ModelBatch,
        *,
        input_name: str | None = None,
        output_name: str | None = None,
    ) -> npt.NDArray[np.float32]:
        """Return the embeddings ``[N, D]`` of a preprocessed batch in the model's input format.

        ``input_name`` and ``output_name`` override the settings' tensor names for this call.

        Raises:
            InferenceUnavailableError: Triton is unreachable, not ready, overloaded or timed out.
            InferenceConfigurationError: the batch is not in the model's input format, or Triton
                refused the request as invalid for its model.
        """
        if batch.shape[0] == 0:
            return np.zeros((0, 0), dtype=np.float32)
        batch = self._as_model_input(batch)
        names = (input_name or self._settings.input_name, output_name or self._settings.output_name)
        parts = [batch[rows] for rows in self._parts(batch.shape[0])]
        if len(parts) == 1:
            # A blocking call: no hand-off to gRPC's callback thread on the API's batch-1 path.
            return self._infer(parts[0], *names)
        return np.concatenate(self._infer_at_once(parts, *names))

    def _parts(self, rows: int) -> list[slice]:
        """Equal parts, one per parallel request, none over the model's ``max_batch_size``."""
        s = self._settings
        size = min(s.max_batch_size, -(-rows // s.parallel_requests))  # ceiling division
        return [slice(start, start + size) for start in range(0, rows, size)]

    def _as_model_input(self, batch: ModelBatch) -> ModelBatch:
        fmt = self._settings.input_format
        pixels = input_is_pixels(fmt)
        if pixels:
            channels = batch.shape[-1] if input_is_channels_last(fmt) else batch.shape[1]
            fits = batch.dtype == np.uint8 and batch.ndim == 4 and channels == 3
        else:
            fits = bool(np.issubdtype(batch.dtype, np.floating))
        if not fits:
            raise InferenceConfigurationError(
                f"model {self._settings.model_name!r} takes {fmt}, got a {batch.dtype} batch "
                f"{list(batch.shape)}: the preprocessing does not match triton.input_format",
                stage=Stage.EMBED,
            )
        return np.ascontiguousarray(batch, dtype=np.uint8 if pixels else np.float32)

    def _inputs(self, data: ModelBatch, input_name: str, output_name: str) -> tuple[Any, Any]:
        module: Any = grpcclient if self._settings.protocol == "grpc" else httpclient
        datatype = "UINT8" if data.dtype == np.uint8 else "FP32"
        tensor = module.InferInput(input_name, list(data.shape), datatype)
        tensor.set_data_from_numpy(data)
        return tensor, module.InferRequestedOutput(output_name)

    def _infer(
        self, data: ModelBatch, input_name: str, output_name: str
    ) -> npt.NDArray[np.float32]:
        s = self._settings
        tensor, output = self._inputs(data, input_name, output_name)
        with self._translated_errors():
            client = self._connect()
            if s.protocol == "grpc":
                result = client.infer(
                    s.model_name,
                    [tensor],
                    model_version=s.model_version,
                    outputs=[output],
                    priority=self._priority,
                    client_timeout=s.request_timeout_s,
                )
            else:
                result = client.infer(
                    s.model_name,
                    [tensor],
                    model_version=s.model_version,
                    outputs=[output],
                    priority=self._priority,
                )
        return self._embeddings(result, output_name, data.shape[0])

    def _infer_at_once(
        self, parts: list[ModelBatch], input_name: str, output_name: str
    ) -> list[npt.NDArray[np.float32]]:
        """Send every part before waiting for any: each of the model's instances runs one."""
        s = self._settings
        requests = [self._inputs(part, input_name, output_name) for part in parts]
        with self._translated_errors():
            client = self._connect()
            if s.protocol == "grpc":
                results = _GrpcAnswers(len(parts), s.request_timeout_s)
                for n, (tensor, output) in enumerate(requests):
                    client.async_infer(
                        s.model_name,
                        [tensor],
                        partial(results.answer, n),
                        model_version=s.model_version,
                        outputs=[output],
                        priority=self._priority,
                        client_timeout=s.request_timeout_s,
                    )
                answers = results.wait()
            else:
                pending = [
                    client.async_infer(
                        s.model_name,
                        [tensor],
                        model_version=s.model_version,
                        outputs=[output],
                        priority=self._priority,
                    )
                    for tensor, output in requests
                ]
                try:
                    answers = [req.get_result(timeout=s.request_timeout_s) for req in pending]
                finally:
                    _settle_http_requests(pending, s.request_timeout_s)
        return [
            self._embeddings(answer, output_name, part.shape[0])
            for answer, part in zip(answers, parts, strict=True)
        ]

    @contextmanager
    def _translated_errors(self) -> Iterator[None]:
        """Triton's errors and the HTTP client's socket errors as ours (see :meth:`_translate`)."""
        try:
            yield
        except InferenceServerException as exc:
            raise self._translate(exc) from exc
        except (OSError, TimeoutError) as exc:  # the HTTP client's socket errors
            self._drop_client()
            raise InferenceUnavailableError(
                f"Triton at {self._settings.url} unreachable: {exc!r}", stage=Stage.EMBED
            ) from exc

    @staticmethod
    def _embeddings(result: Any, output_name: str, rows: int) -> npt.NDArray[np.float32]:
        embeddings = result.as_numpy(output_name)
        if embeddings is None or embeddings.shape[0] != rows:
            # Seen when the server's python backend runs with an incompatible numpy: a
            # server-side fault, so retry rather than store garbage.
            raise InferenceUnavailableError(
                f"Triton returned {None if embeddings is None else embeddings.shape} "
                f"for a batch of {rows}",
                stage=Stage.EMBED,
            )
        return np.asarray(embeddings, dtype=np.float32)

    def _translate(self, exc: InferenceServerException) -> Exception:
        status = str(exc.status() or "")
        text = f"Triton {self._settings.url} model {self._settings.model_name!r}: {exc}"
        if status in _CONFIGURATION_STATUSES:
            return InferenceConfigurationError(text, stage=Stage.EMBED)
        if status in _NOT_FOUND_STATUSES and (unknown := self._unknown_model()) is not None:
            return unknown
        self._drop_client()
        overloaded = "queue" in str(exc).lower()
        reason = Reason.TRITON_OVERLOADED if overloaded else Reason.TRITON_UNAVAILABLE
        return InferenceUnavailableError(text, reason=reason, stage=Stage.EMBED)

    def _unknown_model(self) -> InferenceConfigurationError | None:
        """The configuration error when a ready server does not know the model, else None.

        "Model not found" alone cannot tell: a server still loading, or shutting down, says it
        too. Its repository index can: a model it has never heard of will not appear by waiting.
        """
        try:
            self.check_ready(min(_READY_PROBE_TIMEOUT_S, self._settings.request_timeout_s))
        except InferenceConfigurationError as exc:
            return InferenceConfigurationError(str(exc), stage=Stage.EMBED)
        except InferenceUnavailableError:
            return None
        return None  # ready by now: the request raced a load

    def _drop_client(self) -> None:
        # A broken channel can stay broken; this thread's next call reconnects from scratch.
        with self._lock:
            client = self._clients.pop(threading.current_thread(), None)
        if client is not None:
            _close_quietly(client)


def _close_quietly(client: Any) -> None:
    try:
        client.close()
    except Exception as exc:  # closing a broken connection may fail; nothing is lost
        logger.debug("closing Triton client failed: %s", exc)


def _settle_http_requests(pending: list[Any], timeout_s: float) -> None:
    """Wait until every HTTP request has finished and left the client's greenlet pool.

    tritonclient's HTTP client runs ``async_infer`` requests as greenlets on the calling
    thread's gevent hub, and its ``close()`` joins that pool. A request still running (another
    part failed first) or finished but not yet released (its hub has not run since) would make
    a ``close()`` from another thread, e.g. a shutdown, fail with gevent's ``LoopExit``.
    """
    for request in pending:
        with suppress(Exception):  # the caller already has the first failure
            request.get_result(timeout=timeout_s)
    gevent.sleep(0)  # one turn of this thread's hub runs the pool's release callbacks


class _GrpcAnswers:
    """Collects the callbacks of ``count`` gRPC ``async_infer`` calls (on gRPC's threads)."""

    def __init__(self, count: int, timeout_s: float) -> None:
        self._results: list[Any] = [None] * count
        self._error: InferenceServerException | None = None
        self._left = count
        self._timeout_s = timeout_s
        self._done = threading.Condition()

    def answer(self, n: int, result: Any, error: InferenceServerException | None) -> None:
        with self._done:
            self._results[n] = result
            self._error = self._error or error
            self._left -= 1
            self._done.notify_all()

    def wait(self) -> list[Any]:
        """Every answer, in order of the requests.

        Raises:
            InferenceServerException: a request failed (the first failure), or some answer
                did not come within the timeout (each request has that timeout too).
        """
        with self._done:
            # Each call times out on its own after timeout_s; the margin covers its callback.
            if not self._done.wait_for(lambda: self._left == 0, self._timeout_s + 5.0):
                raise InferenceServerException(
                    f"no answer within {self._timeout_s:.0f}s",
                    status="StatusCode.DEADLINE_EXCEEDED",
                )
            if self._error is not None:
                raise self._error
            return self._results
