"""The API's route handlers: health, collections, search, embed, insert and items (record,
status, thumbnail, deletes).

Handlers take typed bodies (pydantic models for JSON, dataclasses with an ``UploadFile`` for
multipart) and their collaborators through ``Provide`` (``service``, ``ingest``, ``metrics``);
blocking work runs in worker threads, one hop per request (a search by an uploaded image is
decoded, embedded and searched in one). Search and embed answers carry a ``Server-Timing``
header with the time of each stage (query_api.timing), also recorded in the metrics. Errors
are raised, never answered here (query_api.errors maps them). A multipart POST to ``/search``
or ``/embed`` is served by the ``/upload`` route beside it (see query_api.app), so the earlier
API's ``curl -F file=@…`` forms keep working.

Item ids may hold slashes (``cats/0001.jpg``), and are read from the raw request path
(:func:`item_address`), so that ids with empty segments (``/data/a.jpg``, a URL) come through
unchanged. ``GET /items/{collection}/{id}`` answers the record; a last segment ``status``,
``thumbnail`` or ``record`` asks for that view of the id before it. An id whose own last
segment is one of those is reached by naming the view (``.../x/status/record``) or by
percent-encoding the slash before it (``x%2Fstatus``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import unquote_to_bytes

import anyio
import orjson
from litestar import MediaType, Request, Response, delete, get, post
from litestar.datastructures import ResponseHeader, State, UploadFile
from litestar.di import NamedDependency
from litestar.openapi import ResponseSpec
from litestar.openapi.spec import (
    OpenAPIMediaType,
    OpenAPIResponse,
    OpenAPIType,
    Operation,
    Reference,
    RequestBody,
    Schema,
)
from litestar.params import FromPath, JSONBody, MultipartBody

from engine.errors import BrokerUnavailableError, PermanentError, Reason
from engine.health import Probe
from query_api.errors import ERROR_RESPONSES, RETRY_AFTER_S
from query_api.ingest import IngestGateway
from query_api.items import ItemService
from query_api.metrics import ApiMetrics
from query_api.security import CONSUMES, PUBLIC
from query_api.service import SearchAnswer, SearchService
from query_api.timing import SERVER_TIMING, StageTimings
from query_api.validation import EXPECTS
from schemas.api import (
    DELETE_SELECTION,
    CollectionCreated,
    CollectionList,
    CollectionStats,
    CreateCollectionRequest,
    DeleteItemsRequest,
    DeleteItemsResult,
    DeletePublished,
    Embedding,
    EmbedRequest,
    HealthReport,
    InsertAccepted,
    InsertRequest,
    ItemRecord,
    ItemStatus,
)
from schemas.search import QUERY_EXPECTED, SearchHit, SearchOptions, SearchRequest

JSON_BODY = {CONSUMES: ("application/json",)}
MULTIPART_BODY = {CONSUMES: ("multipart/form-data",)}
ItemView = Literal["record", "status", "thumbnail"]
ITEM_VIEWS: tuple[ItemView, ...] = ("record", "status", "thumbnail")
_VIEWS: dict[bytes, ItemView] = {view.encode(): view for view in ITEM_VIEWS}


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


# What answered a search, also when it found nothing (every hit says it too).
ANSWERED_BY = "Trident-Collection"
ANSWERED_MODEL = "Trident-Model"
ANSWERED_MODEL_TAG = "Trident-Model-Tag"
_SEARCH_HEADERS = [
    ResponseHeader(
        name=ANSWERED_BY,
        description="The collection that answered: the one the name searched (a collection or "
        "an alias) pointed at when the search began.",
        documentation_only=True,
    ),
    ResponseHeader(
        name=ANSWERED_MODEL,
        description="The model whose vectors that collection holds, which embedded the query.",
        documentation_only=True,
    ),
    ResponseHeader(name=ANSWERED_MODEL_TAG, description="Its tag.", documentation_only=True),
]


def _answer(answer: SearchAnswer, timings: StageTimings) -> Response[list[SearchHit]]:
    target = answer.target
    headers = {
        **_server_timing(timings),
        ANSWERED_BY: target.collection,
        ANSWERED_MODEL: target.model.name,
        ANSWERED_MODEL_TAG: target.model.tag,
    }
    return Response(answer.hits, headers=headers)


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
    """Create a collection bound to ``model`` (default: the configured model) (201), or leave an
    existing one of that dimension and model as it is (200). An unknown model or a ``dim``
    other than the model's is 422; an existing collection of another dimension or model 409.

    ``regions: true`` also stores a vector per region of each image (the model's region
    recipe), so that a search by a part of an image finds it, each hit's ``box`` saying where;
    422 for a model without a region recipe."""
    created = service.create_collection(data)
    return Response(
        CollectionCreated(name=data.name, created=created), status_code=201 if created else 200
    )


@get("/collections", tags=["collections"], sync_to_thread=True, responses=ERROR_RESPONSES)
def list_collections(service: NamedDependency[SearchService]) -> CollectionList:
    """Every collection's name and model (name, tag, dimension), and the one searched by
    default."""
    return service.collections()


@get(
    "/collections/{name:str}/stats",
    tags=["collections"],
    sync_to_thread=True,
    responses=ERROR_RESPONSES,
)
def collection_stats(
    name: FromPath[str], service: NamedDependency[SearchService]
) -> CollectionStats:
    """Row count, dimension, metric, index and its parameters, model (name, tag, dimension);
    404 if unknown."""
    return service.collection_stats(name)


@delete(
    "/collections/{name:str}", tags=["collections"], sync_to_thread=True, responses=ERROR_RESPONSES
)
def drop_collection(name: FromPath[str], service: NamedDependency[SearchService]) -> None:
    """Drop a collection and its data; 404 if unknown, 409 for an alias (what it points at
    serves: ``trident-reembed finish`` drops a replaced collection)."""
    service.drop_collection(name)


# Search and embed -----------------------------------------------------------------------------


@post(
    "/search",
    opt={**JSON_BODY, EXPECTS: QUERY_EXPECTED},
    operation_class=_also_multipart("SearchUpload"),
    tags=["search"],
    status_code=200,
    response_headers=_SEARCH_HEADERS,
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

    ``collection_name`` may be an alias: the search runs on the collection it points at when
    the search begins, the query embedded by that collection's model. Each hit, and the
    ``Trident-Collection``, ``Trident-Model`` and ``Trident-Model-Tag`` headers, name that
    collection and model.

    On a collection made with regions, a search by image (``query_input`` or an upload) also
    matches the regions of the stored images: each hit's ``box`` is where it matched
    (normalised ``[x0, y0, x1, y1]``; ``[0, 0, 1, 1]``: the whole image). Otherwise, and for
    searches by ``vector`` or ``id``, ``box`` is null.
    """
    with _timed(metrics) as timings:
        answer = service.query(data, timings)
    return _answer(answer, timings)


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
    response_headers=_SEARCH_HEADERS,
    responses=ERROR_RESPONSES,
)
async def search_upload(
    data: MultipartBody[SearchUpload],
    service: NamedDependency[SearchService],
    metrics: NamedDependency[ApiMetrics],
) -> Response[list[SearchHit]]:
    """Search by an uploaded image (multipart field ``file``); hits best first.

    ``Server-Timing`` says how long each stage took; the collection and model that answered
    are named as by ``POST /search``.
    """
    options = data.options()
    image = await data.file.read()
    with _timed(metrics) as timings:
        answer = await anyio.to_thread.run_sync(service.search_image, image, options, timings)
    return _answer(answer, timings)


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
    """Publish one ingest event per input; 202 with the ids, and where each event went (its
    partition and offset), once Kafka acknowledged them all.

    All or nothing: every input is checked first (a path under the allowed roots or an http(s)
    URL of a public host, as the workers' fetch fence requires; the collection exists and holds
    the model's dimension), and when any is refused the answer (400, 404 or 422) lists each
    refused input by index and reason, and nothing is published. Ingestion is asynchronous:
    the items become searchable when a worker has stored them
    (``GET /items/{collection}/{id}/status``).
    """
    return ingest.insert(data)


@dataclass
class _ItemViews(Operation):
    """The item route's 200: a record or a status (JSON), or a thumbnail (JPEG)."""

    def __post_init__(self) -> None:
        ok = self.responses.get("200") if self.responses else None
        if isinstance(ok, OpenAPIResponse) and ok.content is not None:
            jpeg = Schema(type=OpenAPIType.STRING, content_media_type="image/jpeg")
            ok.content["image/jpeg"] = OpenAPIMediaType(schema=jpeg)


@get(
    "/items/{collection:str}/{item_path:path}",
    tags=["items"],
    media_type=MediaType.JSON,
    operation_class=_ItemViews,
    responses=ERROR_RESPONSES,
)
async def item(
    request: Request[Any, Any, State],
    collection: FromPath[str],
    item_path: FromPath[str],
    items: NamedDependency[ItemService],
    service: NamedDependency[SearchService],
) -> Response[ItemRecord | ItemStatus]:
    """``/items/{collection}/{id}``: the stored record (id, metadata, source, version, model
    tag, content hash, when it was stored); 404 ``unknown_id`` when none is stored,
    ``unknown_collection`` for an unknown collection.

    ``/items/{collection}/{id}/status``: where the item is: ``stored`` (with its version),
    ``pending`` (published, not yet processed by the workers), ``dead_lettered`` (stage,
    reason, when), ``deleted`` or ``unknown``.

    ``/items/{collection}/{id}/thumbnail``: a JPEG thumbnail of the stored image, made from its
    source under the same path and URL rules as ingestion; 404 for an item sent inline.

    Ids may hold slashes. An id whose last segment is ``status``, ``thumbnail`` or ``record``
    needs its view named: ``/items/{collection}/{id}/record``.
    """
    # Async, the work in a thread: Litestar 2.25 answers 500 for a sync_to_thread handler that
    # returns a Response on a path where a handler of another method (DELETE) is too.
    item_id, view = item_address(request, collection, item_path)
    if view == "status":
        return Response(await anyio.to_thread.run_sync(items.status, collection, item_id))
    if view == "thumbnail":
        image: Response[Any] = Response(
            await anyio.to_thread.run_sync(service.thumbnail, collection, item_id),
            media_type="image/jpeg",
            headers={"Cache-Control": "private, max-age=300"},
        )
        return image
    return Response(await anyio.to_thread.run_sync(items.record, collection, item_id))


@delete(
    "/items/{collection:str}/{item_path:path}",
    tags=["items"],
    status_code=202,
    sync_to_thread=True,
    responses=ERROR_RESPONSES,
)
def delete_item(
    request: Request[Any, Any, State],
    collection: FromPath[str],
    item_path: FromPath[str],
    items: NamedDependency[ItemService],
) -> DeletePublished:
    """Publish the delete of an item (the whole path after the collection is its id); 202 with
    the delete's version and where it went, once Kafka acknowledged it. A worker removes the
    item (``/status`` then says ``deleted``); no upsert older than the delete brings it back.
    An id that is not stored is no error: its delete is published all the same.
    """
    item_id, _ = item_address(request, collection, item_path, views=False)
    return items.delete(collection, item_id)


@post(
    "/items/delete",
    opt={**JSON_BODY, EXPECTS: DELETE_SELECTION},
    tags=["items"],
    status_code=202,
    sync_to_thread=True,
    responses={
        **ERROR_RESPONSES,
        200: ResponseSpec(DeleteItemsResult, description="A dry run: what would be deleted"),
    },
)
def delete_items(
    data: JSONBody[DeleteItemsRequest], items: NamedDependency[ItemService]
) -> Response[DeleteItemsResult]:
    """Publish the deletes of ``ids``, or of the items a ``filter`` or ``filter_expr`` matches
    (the search's filters); 202 with the ids and where each delete went.

    A filter may delete at most ``max_items`` (default 1,000, at most 10,000): one matching
    more is refused (422 ``too_many_matches``) and nothing is deleted. ``dry_run``: 200 with
    the ids that would be deleted (the first ``max_items``, ``truncated`` when more match);
    nothing is published.
    """
    result = items.delete_many(data)
    return Response(result, status_code=200 if data.dry_run else 202)


def item_address(
    request: Request[Any, Any, State], collection: str, item_path: str, *, views: bool = True
) -> tuple[str, ItemView]:
    """The item id and view an ``/items/{collection}/...`` request names.

    Read from the raw path, percent-decoded as UTF-8: the routed path has empty segments
    collapsed and a trailing slash cut. With ``views``, a last segment ``record``, ``status``
    or ``thumbnail`` (after at least one of the id) names the view, else it is ``record``.

    Raises:
        PermanentError: (``bad_request``) no id, or one that is not UTF-8.
    """
    raw = request.scope.get("raw_path")
    prefix = f"/items/{collection}/".encode()
    # Litestar's test client leaves the query on the raw path; a "?" of an id is encoded.
    path = bytes(raw).split(b"?", 1)[0] if raw else b""
    at = path.find(prefix)
    rest = path[at + len(prefix) :] if at >= 0 else item_path.removeprefix("/").encode()
    segments = rest.split(b"/")
    view: ItemView = "record"
    if views and len(segments) > 1 and segments[-1] in _VIEWS:
        view = _VIEWS[segments[-1]]
        segments = segments[:-1]
    try:
        item_id = unquote_to_bytes(b"/".join(segments)).decode()
    except UnicodeDecodeError as exc:
        raise PermanentError(
            f"the item id in the path is not UTF-8 ({exc}): percent-encode its UTF-8 bytes",
            reason=Reason.BAD_REQUEST,
        ) from exc
    if not item_id:
        raise PermanentError(
            "the path names no item: /items/{collection}/{id}, then /status or /thumbnail",
            reason=Reason.BAD_REQUEST,
        )
    return item_id, view


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
    item,
    delete_item,
    delete_items,
]
