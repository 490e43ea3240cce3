"""Property-based tests of the query API's OpenAPI schema (schemathesis) on the real stack.

Requests generated from ``/openapi.json`` (valid ones, and bodies breaking the schema) must
never get a 5xx, an undocumented status, a wrong content type, or a body that breaks the
documented response schema. Creating and deleting collections are left out: generated names
would act on the shared Milvus (both are covered by example tests in test_api_routes.py).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from engine.settings import Settings
from engine.store import VectorStore
from query_api import create_app
from tests.integration.api_support import served

pytestmark = pytest.mark.stack

MAX_EXAMPLES = 25
POSITIVE = schemathesis.GenerationMode.POSITIVE
CHECKS = (
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
)


@pytest.fixture
def api_schema(settings: Settings, store: VectorStore) -> Iterator[schemathesis.BaseSchema]:
    """The schema of an API served by uvicorn on this test's collection and topics."""
    quick = settings.model_copy(
        update={
            "api": settings.api.model_copy(update={"rate_limit_per_minute": 0}),
            "fetch": settings.fetch.model_copy(update={"timeout_s": 2.0}),
        }
    )
    with served(create_app(quick)) as base:
        schema = schemathesis.openapi.from_url(f"{base}/openapi.json")
        yield schema.exclude(path="/collections/create").exclude(method="DELETE")


def test_generated_requests_get_documented_answers(api_schema: schemathesis.BaseSchema) -> None:
    failures = []
    for result in api_schema.get_all_operations():
        operation = result.ok()
        # Valid requests, then (for operations taking a body) schema-breaking bodies.
        modes = list(schemathesis.GenerationMode) if len(operation.body) else [POSITIVE]
        for mode in modes:

            @given(case=operation.as_strategy(generation_mode=mode))
            @hypothesis_settings(
                max_examples=MAX_EXAMPLES,
                deadline=None,
                database=None,
                suppress_health_check=list(HealthCheck),
            )
            def check(case: schemathesis.Case) -> None:
                case.call_and_validate(checks=CHECKS)

            try:
                check()
            except Exception as exc:  # collect every operation's failure, then report them all
                failures.append(f"{operation.label} ({mode.value}):\n{exc}")
    assert not failures, "\n\n".join(failures)
