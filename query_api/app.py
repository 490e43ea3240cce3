"""The Litestar application: :func:`create_app` builds it from settings.

The lifespan owns the clients (:class:`SearchService`: Milvus, Triton, the fetcher;
:class:`IngestGateway`: the Kafka producer; :class:`ItemService`: item records, deletes and
statuses, with its dead-letter index), starts the service (waiting for Triton's model) and the
index, and closes them on shutdown; handlers receive them through ``Provide``. With
``freeze_heap`` (the ``trident-api`` process asks for it), the lifespan freezes the heap once
the service is warm (see :func:`_freeze_heap`). Middleware, outermost first: metrics, rate
limit, API key. The OpenAPI schema is generated from the handlers' types and served at
``/openapi.json`` (interactive docs at ``/docs``, Swagger UI's files served by the API itself:
no CDN); the search page is ``GET /``.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib import metadata, resources
from pathlib import Path
from typing import Any

import anyio
import litestar_offline_docs
from litestar import Litestar, MediaType, Request, Router, get
from litestar.config.cors import CORSConfig
from litestar.datastructures import State
from litestar.di import Provide
from litestar.enums import ScopeType
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import SwaggerRenderPlugin
from litestar.openapi.spec import Components, SecurityRequirement, SecurityScheme
from litestar.static_files import create_static_files_router
from litestar.types import ASGIApp, Receive, Scope, Send

from engine.settings import Settings
from query_api.errors import EXCEPTION_HANDLERS
from query_api.ingest import IngestGateway
from query_api.items import ItemService
from query_api.metrics import ApiMetrics, MetricsMiddleware
from query_api.routes import ROUTES
from query_api.security import (
    API_KEY_HEADER,
    PUBLIC,
    ApiKeyMiddleware,
    api_keys,
    check_content_type,
    rate_limit,
)
from query_api.service import SearchService

logger = logging.getLogger(__name__)

TITLE = "Embedding Trident"
# Routes whose multipart form is served by the "/upload" route beside them.
_UPLOAD_ROUTES = {"/search", "/embed"}
_SEARCH_PAGE = resources.files("query_api").joinpath("static/index.html").read_text()
# Swagger UI's files, served by the API itself: /docs works without internet access (Litestar
# would load them from a CDN). Swagger UI 5, which renders OpenAPI 3.1, as packaged on PyPI.
DOCS_ASSETS = "/docs/assets"
_SWAGGER_UI = Path(litestar_offline_docs.__file__).parent / "static"
# An empty icon, so that the page asks no other host (Litestar's default is on a CDN).
_NO_FAVICON = "<link rel='icon' href='data:,'>"


@get("/", opt={PUBLIC: True}, include_in_schema=False, media_type=MediaType.HTML)
async def search_page() -> str:
    """The search page (plain HTML and JavaScript, no build step)."""
    return _SEARCH_PAGE


@get("/openapi.json", opt={PUBLIC: True}, include_in_schema=False)
async def openapi_json(request: Request[Any, Any, State]) -> dict[str, Any]:
    """The OpenAPI 3.1 schema of every route."""
    return request.app.openapi_schema.to_schema()


def _state_value(name: str) -> Provide:
    def provide(state: State) -> Any:
        return getattr(state, name)

    return Provide(provide, sync_to_thread=False)


def create_app(
    settings: Settings,
    *,
    service: SearchService | None = None,
    ingest: IngestGateway | None = None,
    items: ItemService | None = None,
    freeze_heap: bool = False,
) -> Litestar:
    """Build the application; ``service``/``ingest``/``items`` replace the ones built from
    settings (tests).

    ``freeze_heap``: once started, move every object alive to the collector's permanent
    generation. It acts on the whole process, so only the process's owner asks for it.

    Raises:
        ConfigurationError: API keys are required (``api.auth``) but none is configured.

    Starting the app (its lifespan) waits for Triton's model, up to ``triton.ready_timeout_s``;
    it fails with :class:`InferenceConfigurationError` if Triton does not serve the model, or
    :class:`InferenceUnavailableError` if it is not ready in time (``trident-api`` checks both
    before serving, to say so in one line).
    """
    keys = api_keys(settings.api)
    api_metrics = ApiMetrics()

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        search_service = service or SearchService.from_settings(settings)
        gateway = ingest or IngestGateway(
            settings.kafka,
            search_service.store,
            fetch=settings.fetch,
            dimension=settings.milvus.dimension,
        )
        item_service = items or ItemService.from_settings(settings, search_service.store, gateway)
        try:
            # Reads the dead-letter topic in the background from now on (statuses wait for it).
            item_service.start()
            # Compiles the preprocessing and waits for Triton's model (triton.ready_timeout_s).
            await anyio.to_thread.run_sync(search_service.start)
            if freeze_heap:
                _freeze_heap()
            app.state.search_service, app.state.ingest = search_service, gateway
            app.state.item_service = item_service
            yield
        finally:
            await anyio.to_thread.run_sync(item_service.close)
            await anyio.to_thread.run_sync(gateway.close)
            await anyio.to_thread.run_sync(search_service.close)

    middleware: list[Any] = [MetricsMiddleware(api_metrics)]
    limiter = rate_limit(settings.api)
    if limiter is not None:
        middleware.append(limiter.middleware)
    if keys is not None:
        middleware.append(ApiKeyMiddleware(keys))
    app = Litestar(
        route_handlers=[*ROUTES, search_page, openapi_json, _docs_assets()],
        dependencies={
            "service": _state_value("search_service"),
            "ingest": _state_value("ingest"),
            "items": _state_value("item_service"),
            "metrics": Provide(lambda: api_metrics, sync_to_thread=False),
        },
        lifespan=[lifespan],
        middleware=middleware,
        before_request=check_content_type,
        exception_handlers=EXCEPTION_HANDLERS,
        request_max_body_size=settings.api.max_upload_bytes,
        cors_config=(
            CORSConfig(allow_origins=settings.api.cors_origins, allow_headers=[API_KEY_HEADER])
            if settings.api.cors_origins
            else None
        ),
        openapi_config=_openapi_config(authenticated=keys is not None),
        # Logging is the entry point's (engine.cli_support): Litestar's default would replace
        # the root logger's handlers and level when the app is built.
        logging_config=None,
    )
    app.asgi_handler = _uploads_to_their_routes(app.asgi_handler)
    return app


def _docs_assets() -> Router:
    """Swagger UI's scripts and styles at ``DOCS_ASSETS``, open like ``/docs`` itself."""
    return create_static_files_router(
        path=DOCS_ASSETS,
        directories=[_SWAGGER_UI],
        name="docs-assets",
        opt={PUBLIC: True},
        include_in_schema=False,
    )


def _freeze_heap() -> None:
    """Keep the objects of start-up (modules, JAX, Litestar, pydantic) out of every collection.

    The started process holds ~230k long-lived objects; each full (generation 2) collection
    walks them all, 100-900 ms on 2 cores, and pauses whichever request is running. Frozen,
    they are never scanned again; objects made by requests are collected as before. Collected
    first so that start-up's garbage is freed rather than frozen.
    """
    began = time.perf_counter()
    gc.collect()
    gc.freeze()
    logger.info(
        "froze %d start-up objects out of garbage collection in %.2f s",
        gc.get_freeze_count(),
        time.perf_counter() - began,
    )


def _openapi_config(*, authenticated: bool) -> OpenAPIConfig:
    scheme = SecurityScheme(type="apiKey", name=API_KEY_HEADER, security_scheme_in="header")
    security: list[SecurityRequirement] | None = [{"ApiKey": []}] if authenticated else None
    return OpenAPIConfig(
        title=TITLE,
        version=metadata.version("embedding-trident"),
        description="Similarity search over images embedded by the Embedding Trident workers.",
        path="/docs",
        render_plugins=[
            SwaggerRenderPlugin(
                path="/",
                js_url=f"{DOCS_ASSETS}/swagger-ui-bundle.js",
                css_url=f"{DOCS_ASSETS}/swagger-ui.css",
                standalone_preset_js_url=f"{DOCS_ASSETS}/swagger-ui-standalone-preset.js",
                favicon=_NO_FAVICON,
            )
        ],
        components=Components(security_schemes={"ApiKey": scheme})
        if authenticated
        else Components(),
        security=security,
    )


def _uploads_to_their_routes(app: ASGIApp) -> ASGIApp:
    """Send multipart POSTs to ``/search`` and ``/embed`` to the typed ``/upload`` routes.

    Litestar reads one body type per handler; this keeps the earlier API's single path for
    both JSON and uploads while each handler's body stays typed (and documented).
    """

    async def dispatch(scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] == ScopeType.HTTP
            and scope["method"] == "POST"
            and scope["path"] in _UPLOAD_ROUTES
            and _is_multipart(scope)
        ):
            path = scope["path"] + "/upload"
            scope = {**scope, "path": path, "raw_path": path.encode()}
        await app(scope, receive, send)

    return dispatch


def _is_multipart(scope: Scope) -> bool:
    for key, value in scope.get("headers", []):
        if key == b"content-type":
            return bytes(value).lower().startswith(b"multipart/form-data")
    return False
