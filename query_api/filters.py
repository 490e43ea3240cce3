"""Metadata filters: structured ones compiled into Milvus expressions, raw ones bounded.

A structured :data:`schemas.Filter` becomes an expression over ``metadata["<key>"]`` whose
values are written as literals only (strings JSON-quoted, which Milvus's parser reads with the
same escapes), so no value can add syntax. A raw ``filter_expr`` is passed to Milvus, which
parses it, after cheap checks that bound the parser's work: no control characters, closed
quotes, balanced and shallow parentheses.
"""

from __future__ import annotations

import math

import orjson

from engine.errors import InvalidQueryError
from schemas.search import AllOf, AnyOf, FieldCondition, Filter, NoneOf, Scalar

MAX_DEPTH = 8
MAX_CONDITIONS = 64
MAX_PARENTHESES_DEPTH = 32

_OPERATORS = {
    "eq": "==",
    "ne": "!=",
    "lt": "<",
    "le": "<=",
    "gt": ">",
    "ge": ">=",
    "in": "in",
    "not_in": "not in",
}


def combined_filter(filter_expr: str | None, structured: Filter | None) -> str:
    """The Milvus expression of both filters (``and``-ed), or ``""`` for none.

    Raises:
        InvalidQueryError: (``invalid_filter``) a raw expression failing the checks above, or a
            structured filter nested deeper than 8 or with more than 64 conditions.
    """
    parts = []
    if filter_expr is not None:
        parts.append(checked_expression(filter_expr))
    if structured is not None:
        parts.append(compile_filter(structured))
    if len(parts) == 2:
        return f"({parts[0]}) and ({parts[1]})"
    return parts[0] if parts else ""


def compile_filter(structured: Filter) -> str:
    """The Milvus expression of a structured filter (see :func:`combined_filter`)."""
    counter = [0]
    return _compile(structured, depth=1, counter=counter)


def _compile(node: Filter, *, depth: int, counter: list[int]) -> str:
    if depth > MAX_DEPTH:
        raise _invalid(f"the filter is nested deeper than {MAX_DEPTH} levels")
    match node:
        case FieldCondition():
            counter[0] += 1
            if counter[0] > MAX_CONDITIONS:
                raise _invalid(f"the filter has more than {MAX_CONDITIONS} conditions")
            return _condition(node)
        case AllOf(and_=children):
            return " and ".join(
                f"({_compile(c, depth=depth + 1, counter=counter)})" for c in children
            )
        case AnyOf(or_=children):
            return " or ".join(
                f"({_compile(c, depth=depth + 1, counter=counter)})" for c in children
            )
        case NoneOf(not_=child):
            return f"not ({_compile(child, depth=depth + 1, counter=counter)})"
    raise AssertionError(f"unknown filter node {node!r}")


def _condition(condition: FieldCondition) -> str:
    # The key matches ^[A-Za-z_][A-Za-z0-9_]*$ (schema), so quoting it cannot break out either.
    target = f'metadata["{condition.field}"]'
    operator = _OPERATORS[condition.op]
    if isinstance(condition.value, list):
        values = ", ".join(_literal(value) for value in condition.value)
        return f"{target} {operator} [{values}]"
    return f"{target} {operator} {_literal(condition.value)}"


def _literal(value: Scalar) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise _invalid("filter values must be finite numbers")
        return repr(value)
    return orjson.dumps(value).decode()


def checked_expression(expression: str) -> str:
    """``expression`` unchanged, once it passes the raw-filter checks.

    Raises:
        InvalidQueryError: (``invalid_filter``) a control character, an unclosed quote,
            unbalanced parentheses or parentheses nested deeper than 32.
    """
    if not expression.strip():
        raise _invalid("filter_expr is blank")
    if any(ord(char) < 32 and char not in " \t" for char in expression):
        raise _invalid("filter_expr holds a control character")
    depth, quote, escaped = 0, "", False
    for char in expression:
        if quote:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == quote:
                quote = ""
        elif char in "\"'":
            quote = char
        elif char in "([":
            depth += 1
            if depth > MAX_PARENTHESES_DEPTH:
                raise _invalid(f"filter_expr nests brackets deeper than {MAX_PARENTHESES_DEPTH}")
        elif char in ")]":
            depth -= 1
            if depth < 0:
                raise _invalid("filter_expr closes a bracket it never opened")
    if quote:
        raise _invalid("filter_expr has an unclosed quote")
    if depth:
        raise _invalid("filter_expr leaves a bracket open")
    return expression


def _invalid(message: str) -> InvalidQueryError:
    return InvalidQueryError(message, reason="invalid_filter")
