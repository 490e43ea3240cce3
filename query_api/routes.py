"""The API's route handlers: health, collections, search, embed, insert, thumbnails.

Handlers take typed bodies (pydantic models for JSON, dataclasses with an ``UploadFile`` for
multipart) and their collaborators through ``Provide`` (``service``, ``ingest``, ``metrics``);
blocking work runs in worker threads, one hop per request (a search by an uploaded image is
decoded, embedded and searched in one). Search and embed answers carry a ``Server-Timing``
header with the time of each stage (query_api.timing), also recorded in the metrics. Errors
are raised, never answered here (query_api.errors maps them). A multipart POST to ``/search``
or ``/embed`` is served by the ``/upload`` route beside it (see query_api.app), so the earlier
API's ``curl -F file=@…`` forms keep working.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import anyio
import orjson
from litestar import Response, delete, get, post
from litestar.datastructures import UploadFile
from litestar.di import NamedDependency
from litestar.exceptions import NotFoundException
from litestar.openapi import ResponseSpec
from litestar.openapi.spec import OpenAPIMediaType, Operation, Reference, RequestBody
from litestar.params import FromPath, JSONBody, MultipartBody

from engine.errors import BrokerUnavailableError
from engine.health import Probe
from query_api.errors import ERROR_RESPONSES, RETRY_AFTER_S
from query_api.ingest import IngestGateway
from query_api.metrics import ApiMetrics
from query_api.security import CONSUMES, PUBLIC
from query_api.service import SearchService
from query_api.timing import SERVER_TIMING, StageTimings
from query_api.validation import EXPECTS
from schemas.api import (
    CollectionCreated,
    CollectionList,
    CollectionStats,
    CreateCollectionRequest,
    Embedding,
    EmbedRequest,
    HealthReport,
    InsertAccepted,
    InsertRequest,
)
from schemas.search import QUERY_EXPECTED, SearchHit, SearchOptions, SearchRequest

JSON_BODY = {CONSUMES: ("application/json",)}
MULTIPART_BODY = {CONSUMES: ("multipart/form-data",)}
THUMBNAIL_SUFFIX = "/thumbnail"


def _also_multipart(form: str) -> type[Operation]:
    """An OpenAPI operation that also documents the multipart ``form`` (a component's name).

    The JSON route's handler takes JSON only; its multipart form is served by the ``/upload``
    route beside it (query_api.app), and the schema says so on the earlier API's path.
    """

    @dataclass
    class WithUpload(Operation):
        def __post_init__(self) -> None:
            if isinstance(self.request_body, RequestBody):
                reference = Reference(ref=f"#/components/schemas/{form}")
                self.request_body.content["multipart/form-data"] = OpenAPIMediaType(
                    schema=reference
                )

    return WithUpload


@contextmanager
def _timed(metrics: ApiMetrics) -> Iterator[StageTimings]:
    """The request's stage timings, recorded in the metrics whether or not it succeeds."""
    timings = StageTimings()
    try:
        yield timings
    finally:
        metrics.observe_stages(timings)


def _server_timing(timings: StageTimings) -> dict[str, str]:
    return {SERVER_TIMING: timings.header()}


# Health ---------------------------------------------------------------------------------------


@get(
    "/health",
    opt={PUBLIC: True},
    tags=["health"],
    sync_to_thread=True,
    responses={**ERROR_RESPONSES, 503: ResponseSpec(HealthReport, description="Degraded")},
)
def health(
    service: NamedDependency[SearchService], ingest: NamedDependency[IngestGateway]
) -> Response[HealthReport]:
    """Triton, Milvus and Kafka, each ``up`` or ``down``, probed at once: the answer comes within
    3 s, and a service that has not answered by then is ``down``.

    ``status`` is ``degraded`` when any is down; the answer is 503 only when searches cannot be
    answered (Triton or Milvus down). Kafka down stops inserts alone, so probes that use this
    route (compose, Kubernetes) keep the API serving searches meanwhile.
    """
    states = service.states({**service.probes(), "kafka": _kafka_probe(ingest)})
    triton, milvus, kafka = states["triton"], states["milvus"], states["kafka"]
    down = [state for state in (triton, milvus, kafka) if state.state == "down"]
    report = HealthReport(
        status="degraded" if down else "ok", triton=triton, milvus=milvus, kafka=kafka
    )
    if "down" in (triton.state, milvus.state):
        return Response(report, status_code=503, headers={"Retry-After": str(RETRY_AFTER_S)})
    return Response(report)


def _kafka_probe(ingest: IngestGateway) -> Probe:
    def probe() -> None:
        state = ingest.kafka_state()
        if state.state == "down":
            raise BrokerUnavailableError(state.detail or "Kafka did not answer")

    return probe


@get("/livez", opt={PUBLIC: True}, tags=["health"], responses=ERROR_RESPONSES)
async def livez() -> dict[str, str]:
    """The process answers."""
    return {"status": "alive"}


@get(
    "/readyz",
    opt={PUBLIC: True},
    tags=["health"],
    sync_to_thread=True,
    responses={**ERROR_RESPONSES, 503: ResponseSpec(dict[str, str], description="Not ready")},
)
def readyz(service: NamedDependency[SearchService]) -> Response[dict[str, str]]:
    """Searches can be answered: Triton's model is ready and Milvus reachable (503 if not).

    Both are probed at once; the answer comes within 3 s, as ``/health``'s.
    """
    states = service.states(service.probes())
    triton, milvus = states["triton"], states["milvus"]
    if triton.state == milvus.state == "up":
        return Response({"status": "ready"})
    body = {"status": "not_ready", "triton": triton.state, "milvus": milvus.state}
    return Response(body, status_code=503, headers={"Retry-After": str(RETRY_AFTER_S)})


@get(
    "/metrics",
    opt={PUBLIC: True},
    tags=["health"],
    media_type="text/plain; version=0.0.4",
    responses=ERROR_RESPONSES,
)
async def metrics(metrics: NamedDependency[ApiMetrics]) -> bytes:
    """Prometheus text format: requests by route, method and status, latency, in flight."""
    return metrics.exposition()


# Collections ----------------------------------------------------------------------------------


@post(
    "/collections/create",
    opt=JSON_BODY,
    tags=["collections"],
    sync_to_thread=True,
    responses=ERROR_RESPONSES,
)
def create_collection(
    data: JSONBody[CreateCollectionRequest], service: NamedDependency[SearchService]
) -> Response[CollectionCreated]:
    """Create a collection (201), or leave an existing one as it is (200)."""
    created = service.create_collection(data)
    return Response(
        CollectionCreated(name=data.name, created=created), status_code=201 if created else 200
    )


@get("/collections", tags=["collections"], sync_to_thread=True, responses=ERROR_RESPONSES)
def list_collections(service: NamedDependency[SearchService]) -> CollectionList:
    """Every collection's name, and the one searched by default."""
    return CollectionList(
        collections=service.store.list_collections(), default=service.store.default_collection
    )


@get(
    "/collections/{name:str}/stats",
    tags=["collections"],
    sync_to_thread=True,
    responses=ERROR_RESPONSES,
)
def collection_stats(
    name: FromPath[str], service: NamedDependency[SearchService]
) -> CollectionStats:
    """Row count, dimension, metric, index and its parameters, model tag; 404 if unknown."""
    return service.collection_stats(name)


@delete(
    "/collections/{name:str}", tags=["collections"], sync_to_thread=True, responses=ERROR_RESPONSES
)
def drop_collection(name: FromPath[str], service: NamedDependency[SearchService]) -> None:
    """Drop a collection and its data; 404 if unknown."""
    service.store.drop_collection(name)


# Search and embed -----------------------------------------------------------------------------


@post(
    "/search",
    opt={**JSON_BODY, EXPECTS: QUERY_EXPECTED},
    operation_class=_also_multipart("SearchUpload"),
    tags=["search"],
    status_code=200,
    sync_to_thread=True,
    responses=ERROR_RESPONSES,
)
def search(
    data: JSONBody[SearchRequest],
    service: NamedDependency[SearchService],
    metrics: NamedDependency[ApiMetrics],
) -> Response[list[SearchHit]]:
    """Search by ``query_input`` (path or URL), ``vector`` or ``id``; hits best first.

    A multipart form with the image in field ``file`` is accepted here too (see
    ``POST /search/upload``). ``Server-Timing`` says how long each stage took.
    """
    with _timed(metrics) as timings:
        hits = service.query(data, timings)
    return Response(hits, headers=_server_timing(timings))


@dataclass
class SearchUpload:
    """A search by an uploaded image; ``filter`` is a structured filter as JSON text."""

    file: UploadFile
    topk: int = 10
    offset: int = 0
    collection_name: str | None = None
    filter_expr: str | None = None
    filter: str | None = None
    score_threshold: float | None = None

    def options(self) -> SearchOptions:
        """The search options of the form, validated like the JSON body's.

        Raises:
            pydantic.ValidationError: an option out of bounds, or a malformed filter.
        """
        return SearchOptions.model_validate(
            {
                "topk": self.topk,
                "offset": self.offset,
                "collection_name": self.collection_name or None,
                "filter_expr": self.filter_expr or None,
                # Not JSON: validated as it is, so the answer says what a filter looks like.
                "filter": _json_or_text(self.filter) if self.filter else None,
                "score_threshold": self.score_threshold,
            }
        )


def _json_or_text(text: str) -> Any:
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return text


@post(
    "/search/upload",
    opt=MULTIPART_BODY,
    tags=["search"],
    status_code=200,
    responses=ERROR_RESPONSES,
)
async def search_upload(
    data: MultipartBody[SearchUpload],
    service: NamedDependency[SearchService],
    metrics: NamedDependency[ApiMetrics],
) -> Response[list[SearchHit]]:
    """Search by an uploaded image (multipart field ``file``); hits best first.

    ``Server-Timing`` says how long each stage took.
    """
    options = data.options()
    image = await data.file.read()
    with _timed(metrics) as timings:
        hits = await anyio.to_thread.run_sync(service.search_image, image, options, timings)
    return Response(hits, headers=_server_timing(timings))


@post(
    "/embed",
    opt=JSON_BODY,
    operation_class=_also_multipart("EmbedUpload"),
    tags=["search"],
    status_code=200,
    sync_to_thread=True,
    responses=ERROR_RESPONSES,
)
def embed(
    data: JSONBody[EmbedRequest],
    service: NamedDependency[SearchService],
    metrics: NamedDependency[ApiMetrics],
) -> Response[Embedding]:
    """The embedding of the image at a path or URL (multipart uploads: ``/embed/upload``)."""
    with _timed(metrics) as timings:
        vector = service.embed_reference(data.query_input, timings)
    return Response(service.embedding(vector), headers=_server_timing(timings))


@dataclass
class EmbedUpload:
    file: UploadFile


@post(
    "/embed/upload", opt=MULTIPART_BODY, tags=["search"], status_code=200, responses=ERROR_RESPONSES
)
async def embed_upload(
    data: MultipartBody[EmbedUpload],
    service: NamedDependency[SearchService],
    metrics: NamedDependency[ApiMetrics],
) -> Response[Embedding]:
    """The embedding of an uploaded image (multipart field ``file``)."""
    image = await data.file.read()
    with _timed(metrics) as timings:
        vector = await anyio.to_thread.run_sync(service.embed_image, image, timings)
    return Response(service.embedding(vector), headers=_server_timing(timings))


# Ingest and items -----------------------------------------------------------------------------


@post(
    "/insert",
    opt=JSON_BODY,
    tags=["ingest"],
    status_code=202,
    sync_to_thread=True,
    responses=ERROR_RESPONSES,
)
def insert(data: JSONBody[InsertRequest], ingest: NamedDependency[IngestGateway]) -> InsertAccepted:
    """Publish one ingest event per input; 202 with the ids once Kafka acknowledged them.

    Ingestion is asynchronous: the items become searchable when a worker has stored them.
    """
    return ingest.insert(data)


@get(
    "/items/{collection:str}/{item_path:path}",
    tags=["ingest"],
    media_type="image/jpeg",
    sync_to_thread=True,
    responses=ERROR_RESPONSES,
)
def item_thumbnail(
    collection: FromPath[str], item_path: FromPath[str], service: NamedDependency[SearchService]
) -> Response[bytes]:
    """``/items/{collection}/{id}/thumbnail``: a JPEG thumbnail of a stored item's image.

    Ids may hold slashes. Made from the stored source under the same path and URL rules as
    ingestion; 404 for an unknown collection or item, or an item sent inline.
    """
    if not item_path.endswith(THUMBNAIL_SUFFIX) or item_path == THUMBNAIL_SUFFIX:
        raise NotFoundException(detail=f"no route for /items/{collection}{item_path}")
    item_id = item_path.removeprefix("/").removesuffix(THUMBNAIL_SUFFIX)
    image = service.thumbnail(collection, item_id)
    return Response(
        image, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=300"}
    )


ROUTES = [
    health,
    livez,
    readyz,
    metrics,
    create_collection,
    list_collections,
    collection_stats,
    drop_collection,
    search,
    search_upload,
    embed,
    embed_upload,
    insert,
    item_thumbnail,
]
