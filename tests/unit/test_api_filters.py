"""Structured filters compile to Milvus expressions whose values are only ever literals; raw
expressions are bounded before Milvus parses them."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from pydantic import TypeAdapter, ValidationError

from engine.errors import InvalidQueryError
from query_api.filters import checked_expression, combined_filter, compile_filter
from schemas.search import Filter

FILTER = TypeAdapter[Filter](Filter)


def compiled(raw: Any) -> str:
    return compile_filter(FILTER.validate_python(raw))


def test_conditions_and_combinators_compile_to_milvus_syntax() -> None:
    assert compiled({"field": "category", "value": "cats"}) == 'metadata["category"] == "cats"'
    assert compiled({"field": "rank", "op": "ge", "value": 3}) == 'metadata["rank"] >= 3'
    assert compiled({"field": "ok", "op": "ne", "value": True}) == 'metadata["ok"] != true'
    assert compiled({"field": "w", "op": "lt", "value": 0.5}) == 'metadata["w"] < 0.5'
    assert (
        compiled({"field": "tag", "op": "not_in", "value": ["a", 2]})
        == 'metadata["tag"] not in ["a", 2]'
    )
    nested = {
        "and": [
            {"field": "a", "value": 1},
            {"or": [{"field": "b", "value": 2}, {"not": {"field": "c", "value": 3}}]},
        ]
    }
    assert compiled(nested) == (
        '(metadata["a"] == 1) and ((metadata["b"] == 2) or (not (metadata["c"] == 3)))'
    )


@pytest.mark.parametrize(
    "value",
    ['x" or id != "', 'back\\slash"', "new\nline", 'unicode é " ]) or (', "\u0000nul"],
)
def test_string_values_stay_one_quoted_literal(value: str) -> None:
    expression = compiled({"field": "name", "value": value})
    prefix = 'metadata["name"] == '
    assert expression.startswith(prefix)
    literal = expression.removeprefix(prefix)
    # One JSON string literal that decodes back to the value: nothing leaked out of the quotes.
    assert orjson.loads(literal) == value
    assert "\n" not in literal and "\u0000" not in literal


@pytest.mark.parametrize(
    "raw",
    [
        {"field": 'name"] == 1 or metadata["x', "value": 1},  # field names are identifiers
        {"field": "a", "op": "in", "value": 1},
        {"field": "a", "op": "in", "value": []},
        {"field": "a", "op": "eq", "value": [1, 2]},
        {"field": "a", "op": "lt", "value": True},
        {"field": "a", "op": "like", "value": "x%"},
        {"and": []},
        {"field": "a", "value": {"nested": 1}},
    ],
)
def test_malformed_structured_filters_are_refused_by_the_schema(raw: Any) -> None:
    with pytest.raises(ValidationError):
        FILTER.validate_python(raw)


def test_structured_filters_are_bounded_in_depth_and_size() -> None:
    deep: Any = {"field": "a", "value": 1}
    for _ in range(8):
        deep = {"not": deep}
    with pytest.raises(InvalidQueryError, match="nested deeper") as caught:
        compiled(deep)
    assert caught.value.reason == "invalid_filter"
    wide = {"or": [{"and": [{"field": "a", "value": i}] * 3} for i in range(30)]}
    with pytest.raises(InvalidQueryError, match="more than 64 conditions"):
        compiled(wide)


def test_raw_and_structured_filters_are_and_ed() -> None:
    structured = FILTER.validate_python({"field": "a", "value": 1})
    assert combined_filter("id != 'x'", structured) == "(id != 'x') and (metadata[\"a\"] == 1)"
    assert combined_filter(None, None) == ""
    assert combined_filter("id != 'x'", None) == "id != 'x'"


@pytest.mark.parametrize(
    ("expression", "problem"),
    [
        ('metadata["a"] == ("x"', "bracket open"),
        ('metadata["a"] == "x', "unclosed quote"),
        ("a == 1)", "never opened"),
        ("a == 1\n or b == 2", "control character"),
        ("(" * 33 + "a" + ")" * 33, "deeper than 32"),
        ("   ", "blank"),
    ],
)
def test_raw_expressions_failing_the_checks_are_refused(expression: str, problem: str) -> None:
    with pytest.raises(InvalidQueryError, match=problem) as caught:
        checked_expression(expression)
    assert caught.value.reason == "invalid_filter"


def test_raw_expressions_passing_the_checks_are_unchanged() -> None:
    text = 'metadata["a"] in ["x)", "y\\"("] and (b > 1)'
    assert checked_expression(text) == text
