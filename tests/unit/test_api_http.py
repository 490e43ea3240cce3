"""The HTTP layer alone, on fake services: error statuses, upload dispatch, content types,
stage timings (``Server-Timing`` and the stage histogram), the heap frozen on request, the
server's HTTP parser and event loop."""

from __future__ import annotations

import gc
import re
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import uvicorn
from litestar.testing import TestClient
from pydantic import ValidationError

import query_api.cli
from engine.errors import (
    ConfigurationError,
    ImageContentError,
    ImageReferenceError,
    InvalidQueryError,
    StoreUnavailableError,
    TridentError,
    UnknownCollectionError,
)
from engine.health import Probe, Prober
from engine.settings import Settings
from query_api import SearchService, create_app
from query_api.ingest import IngestGateway
from query_api.items import ItemService
from query_api.service import SearchAnswer, Target
from query_api.timing import StageTimings
from schemas.api import CollectionModel, ServiceState
from schemas.search import (
    FILTER_SHAPE,
    QUERY_EXPECTED,
    SearchHit,
    SearchOptions,
    SearchRequest,
)

# What every fake search answers on: an alias and the collection it points at.
TARGET = Target(
    name="images", collection="images_v2", model=CollectionModel(name="m", tag="t", dim=4)
)


class FakeService(SearchService):
    """Answers like SearchService (Litestar checks the type injected); ``failure`` is raised by
    every JSON search."""

    def __init__(self) -> None:  # no clients: nothing here reaches a service
        self._settings = Settings()  # embedding() names the model tag
        self._prober = Prober()
        self.failure: Exception | None = None
        self.calls: list[tuple[str, Any]] = []

    def start(self) -> None: ...

    def close(self) -> None:
        self._prober.close()

    def probes(self) -> dict[str, Probe]:
        return {"triton": lambda: None, "milvus": lambda: None}

    def target(self, name: str | None, timings: StageTimings | None = None) -> Target:
        return TARGET

    def query(self, request: SearchRequest, timings: StageTimings) -> SearchAnswer:
        self.calls.append(("query", request))
        with timings.stage("lookup"):
            if self.failure is not None:
                raise self.failure
        with timings.stage("search"):
            return SearchAnswer([SearchHit(id="a", score=0.5)], TARGET)

    def embed_image(
        self, data: bytes, timings: StageTimings, collection: str | None = None
    ) -> np.ndarray[Any, Any]:
        self.calls.append(("embed_image", data))
        with timings.stage("embed"):
            return np.ones(4, dtype=np.float32)

    def search(
        self,
        vector: Any,
        options: SearchOptions,
        timings: StageTimings,
        *,
        exclude_id: str | None = None,
        target: Target | None = None,
    ) -> list[SearchHit]:
        self.calls.append(("search", options))
        with timings.stage("search"):
            return [SearchHit(id="b", score=0.9)]


class FakeIngest(IngestGateway):
    def __init__(self) -> None: ...

    def kafka_state(self) -> ServiceState:
        return ServiceState(state="up")

    def close(self) -> None: ...


class FakeItems(ItemService):
    def __init__(self) -> None: ...

    def start(self) -> None: ...

    def close(self) -> None: ...


@pytest.fixture
def fake() -> FakeService:
    return FakeService()


@pytest.fixture
def client(fake: FakeService) -> Iterator[TestClient[Any]]:
    app = create_app(Settings(), service=fake, ingest=FakeIngest(), items=FakeItems())
    with TestClient(app=app) as test_client:
        yield test_client


def test_a_multipart_search_is_served_by_the_upload_route(
    client: TestClient[Any], fake: FakeService
) -> None:
    response = client.post(
        "/search",
        files={"file": ("x.png", b"image bytes", "image/png")},
        data={"topk": "7", "offset": "2", "filter": '{"field": "k", "value": "v"}'},
    )
    assert response.status_code == 200, response.text
    assert response.json()[0]["id"] == "b"
    # What answered, named also when no hit could (an empty answer).
    assert response.headers["trident-collection"] == TARGET.collection
    assert (response.headers["trident-model"], response.headers["trident-model-tag"]) == ("m", "t")
    assert fake.calls[0] == ("embed_image", b"image bytes")
    options = fake.calls[1][1]
    assert (options.topk, options.offset, options.filter.field) == (7, 2, "k")
    bad = client.post("/search", files={"file": ("x.png", b"x", "image/png")}, data={"topk": "0"})
    assert (bad.status_code, bad.json()["error"]) == (422, "invalid_request")


@pytest.mark.parametrize(
    ("failure", "status", "reason"),
    [
        (UnknownCollectionError("no collection named 'c'"), 404, "unknown_collection"),
        (InvalidQueryError("no item", reason="unknown_id"), 404, "unknown_id"),
        (InvalidQueryError("bad", reason="wrong_dimension"), 422, "wrong_dimension"),
        (ImageContentError("big", reason="too_many_pixels"), 413, "too_many_pixels"),
        (ImageContentError("nope", reason="not_an_image"), 400, "not_an_image"),
        (ImageReferenceError("outside", reason="path_not_allowed"), 400, "path_not_allowed"),
        (StoreUnavailableError("down"), 503, "milvus_unavailable"),
    ],
)
def test_service_errors_map_to_statuses(
    client: TestClient[Any], fake: FakeService, failure: TridentError, status: int, reason: str
) -> None:
    fake.failure = failure
    response = client.post("/search", json={"vector": [1.0]})
    assert response.status_code == status
    assert response.json() == {"error": reason, "detail": str(failure)}
    assert ("Retry-After" in response.headers) == (status == 503)


@pytest.mark.parametrize(
    "failure",
    [ConfigurationError("secret path /etc/x is wrong"), RuntimeError("secret internals")],
)
def test_server_faults_answer_500_without_details(
    client: TestClient[Any], fake: FakeService, failure: Exception
) -> None:
    fake.failure = failure
    response = client.post("/search", json={"vector": [1.0]})
    assert response.status_code == 500
    assert response.json() == {"error": "internal_error", "detail": "the server failed to answer"}


def test_routes_refuse_content_types_they_do_not_take(client: TestClient[Any]) -> None:
    multipart = client.post("/insert", files={"file": ("x.png", b"x", "image/png")})
    assert (multipart.status_code, multipart.json()["error"]) == (415, "unsupported_media_type")
    no_type = client.post("/collections/create", content=b"{}")
    assert no_type.status_code == 415
    assert client.get("/").headers["content-type"].startswith("text/html")


def stage_counts(client: TestClient[Any]) -> dict[str, float]:
    """``trident_api_stage_seconds_count`` by stage, from ``/metrics``."""
    text = client.get("/metrics").text
    pattern = r'^trident_api_stage_seconds_count\{stage="(\w+)"\} (\S+)$'
    return {m[1]: float(m[2]) for m in re.finditer(pattern, text, re.MULTILINE)}


def test_searches_say_how_long_each_stage_took(client: TestClient[Any]) -> None:
    upload = client.post("/search", files={"file": ("x.png", b"image", "image/png")})
    assert upload.status_code == 200, upload.text
    # The upload's stages ran in one worker thread: embed, then search.
    assert re.fullmatch(r"embed;dur=\d+\.\d, search;dur=\d+\.\d", upload.headers["server-timing"])
    by_vector = client.post("/search", json={"vector": [1.0]})
    assert re.fullmatch(
        r"lookup;dur=\d+\.\d, search;dur=\d+\.\d", by_vector.headers["server-timing"]
    )
    embedded = client.post("/embed", files={"file": ("x.png", b"image", "image/png")})
    assert re.fullmatch(r"embed;dur=\d+\.\d", embedded.headers["server-timing"])
    assert stage_counts(client) == {"embed": 2.0, "search": 2.0, "lookup": 1.0}


def test_a_failed_search_still_records_the_stages_it_ran(
    client: TestClient[Any], fake: FakeService
) -> None:
    fake.failure = StoreUnavailableError("down")
    assert client.post("/search", json={"vector": [1.0]}).status_code == 503
    assert stage_counts(client) == {"lookup": 1.0}


def test_stage_timings_keep_order_and_time_a_block_that_raises() -> None:
    timings = StageTimings()
    with timings.stage("decode"):
        pass
    with pytest.raises(ValueError), timings.stage("embed"):
        raise ValueError("Triton said no")
    assert [name for name, _ in timings.stages] == ["decode", "embed"]
    assert all(seconds >= 0 for _, seconds in timings.stages)
    assert re.fullmatch(r"decode;dur=\d+\.\d, embed;dur=\d+\.\d", timings.header())


@pytest.mark.parametrize("freeze", [False, True])
def test_the_heap_is_frozen_once_started_only_when_asked(fake: FakeService, freeze: bool) -> None:
    gc.unfreeze()
    try:
        app = create_app(
            Settings(), service=fake, ingest=FakeIngest(), items=FakeItems(), freeze_heap=freeze
        )
        with TestClient(app=app) as test_client:
            assert test_client.get("/livez").status_code == 200
            assert (gc.get_freeze_count() > 0) == freeze
    finally:
        gc.unfreeze()


def test_trident_api_serves_with_the_c_http_parser_and_uvloop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    served: dict[str, Any] = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **options: served.update(options, app=app))
    monkeypatch.setattr(SearchService, "from_settings", lambda settings: FakeService())
    assert query_api.cli.main(["--port", "18999"]) == 0
    config = uvicorn.Config(**served)
    config.load()
    loop_factory = config.get_loop_factory()
    assert loop_factory is not None
    loop = loop_factory()
    try:
        assert type(loop).__module__.startswith("uvloop")
    finally:
        loop.close()
    assert config.http_protocol_class.__module__ == "uvicorn.protocols.http.httptools_impl"


# What a malformed search is told ---------------------------------------------------------------

JSON = {"content-type": "application/json"}


def test_a_search_without_a_query_says_what_to_give(client: TestClient[Any]) -> None:
    empty = client.post("/search", content=b"", headers=JSON)
    assert (empty.status_code, empty.json()) == (
        422,
        {"error": "invalid_request", "detail": f"the request has no body: {QUERY_EXPECTED}"},
    )
    nothing = client.post("/search", json={})
    assert nothing.json() == {"error": "invalid_request", "detail": QUERY_EXPECTED}
    both = client.post("/search", json={"vector": [1.0], "id": "a"})
    assert both.json()["detail"] == f"{QUERY_EXPECTED}; got vector, id"
    other_route = client.post("/embed", content=b"", headers=JSON)
    assert other_route.json()["detail"] == (
        "the request has no body: send a JSON object with this route's fields (see /docs)"
    )


@pytest.mark.parametrize(
    ("bad", "problem"),
    [
        ({"field": "k", "op": "like", "value": 1},
         "filter.op: Input should be 'eq', 'ne', 'lt', 'le', 'gt', 'ge', 'in' or 'not_in'"),
        ({"and": [{"field": "k"}]}, "filter.and.0.value: Field required"),
        ({"not": {"field": "k", "op": "in", "value": 1}},
         "filter.not: in takes a list of 1 to 100 values"),
        ({"field": "k", "value": 1, "colour": "red"},
         "filter.colour: Extra inputs are not permitted"),
    ],
)  # fmt: skip
def test_a_bad_filter_gets_one_short_message(
    client: TestClient[Any], bad: Any, problem: str
) -> None:
    response = client.post("/search", json={"vector": [1.0], "filter": bad})
    assert response.status_code == 422
    assert response.json() == {"error": "invalid_request", "detail": f"{problem}; {FILTER_SHAPE}"}


def test_a_filter_that_is_no_object_is_told_what_one_is(client: TestClient[Any]) -> None:
    expected = f"filter: {FILTER_SHAPE}"
    assert client.post("/search", json={"vector": [1.0], "filter": "k = 1"}).json()["detail"] == (
        expected
    )
    # The multipart form's filter is JSON text: not JSON at all, it is told the same.
    upload = client.post(
        "/search", files={"file": ("x.png", b"x", "image/png")}, data={"filter": "k"}
    )
    assert upload.json() == {"error": "invalid_request", "detail": expected}
    bad_op = client.post(
        "/search",
        files={"file": ("x.png", b"x", "image/png")},
        data={"filter": '{"field": "k", "op": "like", "value": 1}'},
    )
    assert bad_op.json()["detail"].startswith("filter.op: Input should be 'eq'")


def test_a_vector_without_direction_is_refused(client: TestClient[Any], fake: FakeService) -> None:
    zero = client.post("/search", json={"vector": [0.0, -0.0, 0.0]})
    assert (zero.status_code, zero.json()) == (
        422,
        {
            "error": "invalid_request",
            "detail": "vector: the vector is all zeros, so it matches nothing: give an embedding",
        },
    )
    assert fake.calls == []  # refused before any search
    # JSON cannot carry NaN or infinity; a number out of float range is malformed JSON.
    huge = client.post("/search", content=b'{"vector": [1e999]}', headers=JSON)
    assert huge.status_code == 400
    with pytest.raises(ValidationError, match="finite number"):
        SearchRequest(vector=[1.0, float("inf")])


# The interactive docs work offline ------------------------------------------------------------


def test_the_docs_page_loads_nothing_from_another_host(client: TestClient[Any]) -> None:
    page = client.get("/docs")
    assert page.status_code == 200
    head = page.text.split("<body", 1)[0]
    assert not re.findall(r"(?:https?:)?//[\w.-]+", head), head
    assets = re.findall(r"""(?:src|href)=["']([^"']+)""", head)
    assert sorted(assets) == [
        "/docs/assets/swagger-ui-bundle.js",
        "/docs/assets/swagger-ui-standalone-preset.js",
        "/docs/assets/swagger-ui.css",
        "data:,",
    ]
    for asset in assets:
        if asset.startswith("/"):
            served = client.get(asset)
            assert served.status_code == 200 and len(served.content) > 10_000, asset
