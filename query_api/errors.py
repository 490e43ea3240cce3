"""One JSON error shape for every failure: ``{"error": "<reason>", "detail": "<message>"}``.

Statuses: 400 malformed requests and unusable images or references, 401 a missing or wrong API
key, 404 unknown routes, collections and items, 405, 409 a collection that exists but not as
asked (another dimension, no vector index), 413 bodies or images over the limits,
415 a content type the route does not take, 422 well-formed requests that make no sense (schema
violations, wrong vector dimension, bad filters or index parameters), 429 and 503 with
``Retry-After``. Anything unexpected is a 500 whose body names no internals; it is logged here.
"""

from __future__ import annotations

import logging
from typing import Any

import pydantic
from litestar import MediaType, Request, Response
from litestar.exceptions import HTTPException, ValidationException
from litestar.openapi import ResponseSpec
from litestar.types import ExceptionHandlersMap

from engine.errors import (
    CollectionConflictError,
    InvalidQueryError,
    PermanentError,
    RetriableError,
    TridentError,
    UnknownCollectionError,
)
from query_api.validation import body_problems, model_problems
from schemas.api import ErrorBody

logger = logging.getLogger(__name__)

RETRY_AFTER_S = 5
_TOO_LARGE_REASONS = {"too_many_bytes", "too_many_pixels"}
_NOT_FOUND_REASONS = {"unknown_id", "no_source"}
_HTTP_REASONS = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "too_large",
    415: "unsupported_media_type",
    429: "rate_limited",
}

# Documented on every route, so the OpenAPI schema describes each answer the API can give.
ERROR_RESPONSES = {
    status: ResponseSpec(data_container=ErrorBody, description=description)
    for status, description in {
        400: "Malformed request, unusable image or reference",
        401: "Missing or wrong API key (when keys are required)",
        404: "Unknown route, collection or item",
        405: "Method not allowed",
        409: "The collection exists, but not as asked (another dimension, no vector index)",
        413: "Body, upload or image over the limits",
        415: "Unsupported content type",
        422: "Invalid request (schema, vector dimension, filter, index parameters)",
        429: "Rate limited (see Retry-After)",
        503: "A dependency is unavailable (see Retry-After)",
    }.items()
}


def error_response(
    status: int, reason: str, detail: str, headers: dict[str, str] | None = None
) -> Response[dict[str, str]]:
    return Response(
        {"error": reason, "detail": detail},
        status_code=status,
        headers=headers or {},
        media_type=MediaType.JSON,
    )


def _status_of(exc: TridentError) -> int:
    if isinstance(exc, RetriableError):
        return 503
    if not isinstance(exc, PermanentError):  # a configuration error: ours, not the caller's
        return 500
    if isinstance(exc, UnknownCollectionError) or exc.reason in _NOT_FOUND_REASONS:
        return 404
    if isinstance(exc, CollectionConflictError):
        return 409
    if exc.reason in _TOO_LARGE_REASONS:
        return 413
    if isinstance(exc, InvalidQueryError):
        return 422
    return 400


def _trident_error(request: Request[Any, Any, Any], exc: Exception) -> Response[dict[str, str]]:
    assert isinstance(exc, TridentError)
    status = _status_of(exc)
    if status == 500:
        logger.error("%s %s failed: %s", request.method, request.url.path, exc)
        return error_response(500, "internal_error", "the server failed to answer")
    headers = {"Retry-After": str(RETRY_AFTER_S)} if status == 503 else {}
    if status == 503:
        logger.warning("%s %s: dependency unavailable: %s", request.method, request.url.path, exc)
    return error_response(status, exc.reason, str(exc), headers)


def _validation_error(request: Request[Any, Any, Any], exc: Exception) -> Response[dict[str, str]]:
    assert isinstance(exc, ValidationException)
    extra = exc.extra if isinstance(exc.extra, list) else []
    if not extra:  # Litestar could not even read the body (malformed JSON or form)
        return error_response(400, "malformed_body", str(exc.detail))
    handler = request.scope.get("route_handler")  # what the route says its body should hold
    opt = handler.opt if handler is not None else {}
    return error_response(422, "invalid_request", body_problems(opt, extra))


def _model_error(request: Request[Any, Any, Any], exc: Exception) -> Response[dict[str, str]]:
    # A model validated in a handler (the multipart search's options and filter).
    assert isinstance(exc, pydantic.ValidationError)
    return error_response(422, "invalid_request", model_problems(exc.errors()))


def _http_error(request: Request[Any, Any, Any], exc: Exception) -> Response[dict[str, str]]:
    assert isinstance(exc, HTTPException)
    status = exc.status_code
    headers = dict(exc.headers or {})
    if status == 429:
        # Litestar's limiter sends RateLimit-Reset (seconds until the window resets).
        headers["Retry-After"] = str(max(1, int(headers.get("RateLimit-Reset", "1") or 1)))
    if status >= 500:
        logger.error("%s %s failed: %s", request.method, request.url.path, exc.detail)
        return error_response(status, "internal_error", "the server failed to answer", headers)
    reason = _HTTP_REASONS.get(status, "bad_request")
    return error_response(status, reason, str(exc.detail), headers)


def _unexpected_error(request: Request[Any, Any, Any], exc: Exception) -> Response[dict[str, str]]:
    logger.error("%s %s failed unexpectedly", request.method, request.url.path, exc_info=exc)
    return error_response(500, "internal_error", "the server failed to answer")


EXCEPTION_HANDLERS: ExceptionHandlersMap = {
    TridentError: _trident_error,
    ValidationException: _validation_error,
    pydantic.ValidationError: _model_error,
    HTTPException: _http_error,
    Exception: _unexpected_error,
}
