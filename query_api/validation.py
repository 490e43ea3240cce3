"""The message a request that fails validation gets: each problem once, where it is, and what is
expected instead, never the validator's internals (union branches, "Value error, " prefixes,
Litestar's name for the body).

A route may say what its body should hold with ``opt={EXPECTS: "..."}``: a request without a
body is told that.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from schemas.search import FILTER_SHAPE

EXPECTS = "expects"
_GENERIC_EXPECTATION = "send a JSON object with this route's fields (see /docs)"
# Labels of a union's kinds in a location (schemas.search's filter kinds): not a field.
_KIND_LABEL = re.compile(r"^<\w+>$")
_VALUE_ERROR_PREFIX = "Value error, "
# What Litestar reports when the body is absent: its name for the body, and a KeyError of it.
_BODY_NAME = "data"
_ABSENT_BODY = "'data'"


def body_problems(route_opt: Mapping[str, Any], extra: Iterable[Mapping[str, Any]]) -> str:
    """The message for Litestar's validation errors (``ValidationException.extra``)."""
    items = [item for item in extra if isinstance(item, Mapping)]
    if any(_is_absent_body(item) for item in items):
        return f"the request has no body: {route_opt.get(EXPECTS, _GENERIC_EXPECTATION)}"
    return _joined(
        (_location(str(item.get("key") or "").split(".")), str(item.get("message", "")))
        for item in items
    )


def model_problems(errors: Iterable[Mapping[str, Any]]) -> str:
    """The message for a pydantic ``ValidationError``'s ``errors()`` (a model validated in a
    handler: the multipart forms' options and filter)."""
    return _joined(
        (_location([str(part) for part in error.get("loc", ())]), str(error.get("msg", "")))
        for error in errors
    )


def _is_absent_body(item: Mapping[str, Any]) -> bool:
    return item.get("key") == _BODY_NAME and item.get("message") == _ABSENT_BODY


def _location(parts: Sequence[str]) -> str:
    kept = [part for part in parts if part and not _KIND_LABEL.match(part)]
    if kept[:1] == [_BODY_NAME]:
        kept = kept[1:]
    return ".".join(kept)


def _joined(problems: Iterable[tuple[str, str]]) -> str:
    lines: list[str] = []
    for location, message in problems:
        text = message.removeprefix(_VALUE_ERROR_PREFIX)
        line = f"{location}: {text}" if location else text
        if line not in lines:
            lines.append(line)
    # A filter's problems alone rarely say what a filter is; say it once.
    if any(line.startswith("filter") for line in lines) and not any(
        FILTER_SHAPE in line for line in lines
    ):
        lines.append(FILTER_SHAPE)
    return "; ".join(lines) or "the request is not valid (see /docs)"
