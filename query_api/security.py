"""Request guards: API keys, per-client rate limit, content types.

- **API keys** (header ``X-API-Key``): from ``api.api_keys`` and ``api.api_keys_file``.
  ``api.auth`` ``on`` requires one, ``off`` never does, ``auto`` (the default) requires one
  unless the API listens on loopback only (the local stack). Handlers marked ``opt={"public":
  True}`` (health, liveness, readiness, the search page, the API docs) stay open.
- **Rate limit**: Litestar's limiter, ``api.rate_limit_per_minute`` requests per client address
  and minute; 429 carries ``Retry-After`` (see query_api.errors).
- **Content types**: a route with a body declares ``opt={"consumes": (...)}``; any other content
  type is refused with 415 before the body is read.
"""

from __future__ import annotations

import hmac
import logging
from typing import Any

from litestar import Request
from litestar.enums import ScopeType
from litestar.exceptions import HTTPException, NotAuthorizedException
from litestar.middleware import ASGIMiddleware
from litestar.middleware.rate_limit import RateLimitConfig
from litestar.types import ASGIApp, Receive, Scope, Send

from engine.errors import ConfigurationError
from engine.settings import ApiSettings

logger = logging.getLogger(__name__)

API_KEY_HEADER = "X-API-Key"
PUBLIC = "public"
CONSUMES = "consumes"
_LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1"}
# Paths the limiter never counts: probes must keep answering under load.
_UNLIMITED = ["^/livez$", "^/readyz$", "^/health$", "^/metrics$"]


def api_keys(settings: ApiSettings) -> frozenset[str] | None:
    """The accepted keys, or None when authentication is off.

    Raises:
        ConfigurationError: authentication is on but no key is configured, or the key file
            cannot be read.
    """
    required = settings.auth == "on" or (
        settings.auth == "auto" and settings.host not in _LOOPBACK_HOSTS
    )
    if not required:
        return None
    keys = {key.strip() for key in settings.api_keys if key.strip()}
    if settings.api_keys_file is not None:
        try:
            lines = settings.api_keys_file.read_text().splitlines()
        except OSError as exc:
            raise ConfigurationError(f"cannot read api.api_keys_file: {exc}") from exc
        keys |= {line.strip() for line in lines if line.strip() and not line.startswith("#")}
    if not keys:
        raise ConfigurationError(
            f"the API listening on {settings.host} requires API keys: set api.api_keys or "
            "api.api_keys_file (or api.auth: off to run it open)"
        )
    return frozenset(keys)


class ApiKeyMiddleware(ASGIMiddleware):
    """Refuses requests without a valid ``X-API-Key`` (401), except on public handlers."""

    scopes = (ScopeType.HTTP,)
    exclude_opt_key = PUBLIC

    def __init__(self, keys: frozenset[str]) -> None:
        self._keys = [key.encode() for key in keys]
        # The interactive docs stay open too (the schema itself is the public /openapi.json).
        self.should_bypass_for_scope = _is_docs

    async def handle(self, scope: Scope, receive: Receive, send: Send, next_app: ASGIApp) -> None:
        given = _header(scope, API_KEY_HEADER.lower().encode())
        # Compare against every key, in constant time, so timing tells nothing about them.
        matches = [hmac.compare_digest(given, key) for key in self._keys]
        if not any(matches):
            raise NotAuthorizedException(
                detail=f"a valid {API_KEY_HEADER} header is required"
                if given
                else f"missing {API_KEY_HEADER} header"
            )
        await next_app(scope, receive, send)


def _is_docs(scope: Scope) -> bool:
    return scope["path"] == "/docs" or scope["path"].startswith("/docs/")


def _header(scope: Scope, name: bytes) -> bytes:
    for key, value in scope.get("headers", []):
        if key == name:
            return bytes(value)
    return b""


def rate_limit(settings: ApiSettings) -> RateLimitConfig | None:
    """Litestar's per-address limiter, or None when ``rate_limit_per_minute`` is 0."""
    if settings.rate_limit_per_minute == 0:
        return None
    return RateLimitConfig(
        rate_limit=("minute", settings.rate_limit_per_minute), exclude=_UNLIMITED
    )


def check_content_type(request: Request[Any, Any, Any]) -> None:
    """``before_request`` hook: 415 unless the body's type is one the route consumes."""
    consumes: tuple[str, ...] | None = request.route_handler.opt.get(CONSUMES)
    if consumes is None:
        return
    media_type = request.content_type[0] or "no content type"
    if media_type not in consumes:
        raise HTTPException(
            status_code=415, detail=f"this route takes {' or '.join(consumes)}, not {media_type}"
        )
