"""The Litestar application: health and similarity search.

Built by :func:`create_app` from settings (or a ready :class:`SearchService`, for tests). The
service's clients are opened in the lifespan and closed on shutdown; blocking work (decoding,
inference, Milvus calls) runs in worker threads so the event loop stays responsive.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import orjson
from litestar import Litestar, MediaType, Request, Response, get, post
from litestar.datastructures import State, UploadFile
from litestar.exceptions import HTTPException
from pydantic import ValidationError

from engine.errors import (
    ImageContentError,
    ImageReferenceError,
    InvalidQueryError,
    PermanentError,
    RetriableError,
    TridentError,
)
from engine.settings import Settings
from query_api.service import SearchService
from schemas import SearchRequest

logger = logging.getLogger(__name__)


def _service(state: State) -> SearchService:
    service: SearchService = state.search_service
    return service


@get("/health", sync_to_thread=True)
def health(state: State) -> Response[dict[str, Any]]:
    """Liveness plus the reachability of Triton and Milvus (503 when one is down)."""
    service = _service(state)
    triton = service.embedder.is_ready()
    try:
        service.store.list_collections()
        milvus = True
    except RetriableError:
        milvus = False
    ok = triton and milvus
    body = {"status": "ok" if ok else "degraded", "triton": triton, "milvus": milvus}
    return Response(body, status_code=200 if ok else 503)


@post("/search", status_code=200)
async def search(request: Request[Any, Any, State], state: State) -> list[dict[str, Any]]:
    """Search by an uploaded image (multipart field ``file``), or by JSON.

    JSON: ``{"query_input": "<path or URL>" | "vector": [...] | "id": "...", "topk": 10,
    "collection_name": "...", "filter_expr": "..."}``. Answers ``[{id, score, metadata}]``,
    best first.
    """
    service = _service(state)
    upload: UploadFile | None = None
    if request.content_type[0] == "multipart/form-data":
        form = await request.form()
        fields = {key: value for key, value in form.items() if not isinstance(value, UploadFile)}
        upload = form.get("file") or form.get("image")
        if not isinstance(upload, UploadFile):
            raise HTTPException(
                status_code=400, detail="multipart search needs an image in field 'file'"
            )
        query = _parse_request({**fields, "query_input": "<upload>"})
    else:
        try:
            raw = orjson.loads(await request.body())
        except orjson.JSONDecodeError as exc:
            raise HTTPException(status_code=400, detail=f"malformed JSON: {exc}") from exc
        query = _parse_request(raw)

    if upload is not None:
        data = await upload.read()
        vector = await anyio.to_thread.run_sync(service.embed_image, data)
    elif query.query_input is not None:
        vector = await anyio.to_thread.run_sync(service.embed_reference, query.query_input)
    elif query.id is not None:
        vector = await anyio.to_thread.run_sync(service.vector_of, query.id, query.collection_name)
    else:
        vector = query.vector  # type: ignore[assignment]

    def run() -> list[dict[str, Any]]:
        hits = service.search(
            vector,
            top_k=query.topk,
            filter_expr=query.filter_expr,
            collection=query.collection_name,
        )
        return [hit.model_dump() for hit in hits]

    return await anyio.to_thread.run_sync(run)


def _parse_request(raw: Any) -> SearchRequest:
    if not isinstance(raw, dict):
        raise HTTPException(status_code=400, detail="the request body must be a JSON object")
    try:
        return SearchRequest.model_validate(raw)
    except ValidationError as exc:
        raise HTTPException(
            status_code=400,
            detail="; ".join(
                f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in exc.errors()
            ),
        ) from exc


def _error_response(request: Request[Any, Any, State], exc: Exception) -> Response[dict[str, Any]]:
    assert isinstance(exc, TridentError)
    if isinstance(exc, RetriableError):
        status, headers = 503, {"Retry-After": "5"}
    elif isinstance(exc, InvalidQueryError) and exc.reason == "unknown_id":
        status, headers = 404, {}
    elif isinstance(exc, ImageContentError | ImageReferenceError | PermanentError):
        status, headers = 400, {}
    else:
        status, headers = 500, {}
    if status >= 500:
        logger.warning("%s %s failed: %s", request.method, request.url.path, exc)
    return Response(
        {"error": exc.reason, "detail": str(exc)},
        status_code=status,
        headers=headers,
        media_type=MediaType.JSON,
    )


def create_app(settings: Settings, *, service: SearchService | None = None) -> Litestar:
    """Build the application; ``service`` replaces the one built from settings (tests)."""

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        search_service = service or SearchService.from_settings(settings)
        await anyio.to_thread.run_sync(search_service.warmup)
        app.state.search_service = search_service
        try:
            yield
        finally:
            await anyio.to_thread.run_sync(search_service.close)

    return Litestar(
        route_handlers=[health, search],
        lifespan=[lifespan],
        exception_handlers={TridentError: _error_response},
        request_max_body_size=settings.api.max_upload_bytes,
    )
