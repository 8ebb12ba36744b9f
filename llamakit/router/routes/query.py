"""Query parameters read through a pydantic model, which also describes them in `/openapi.json`.

A route's parameters are the fields of a `QueryModel`; `parse_query` reads them from the URL, strictly: an
integer is ASCII digits (`?limit=١` and `?limit=1_0` are 400, though Python's `int()` takes both), a number is
ASCII digits with an optional fraction, a boolean is `true`/`false`/`1`/`0`. A value out of its field's bounds is
a 400 that names the parameter and the range. Parameters the model has no field for are ignored.
"""

from __future__ import annotations

import re
import types
from typing import Any, TypeVar, Union, get_args, get_origin

from aiohttp import web
from annotated_types import Ge, Gt, Le, Lt
from pydantic import BaseModel, ConfigDict, ValidationError

from llamakit.wire.errors import ApiError

__all__ = ["QueryModel", "parse_query"]

_INT = re.compile(r"[0-9]{1,20}", re.ASCII)
_NUMBER = re.compile(r"[0-9]{1,20}(\.[0-9]{1,20})?", re.ASCII)
_BOOLS = {"true": True, "1": True, "false": False, "0": False}

_Query = TypeVar("_Query", bound="QueryModel")


class QueryModel(BaseModel):
    """The query parameters of a route: one field each, `int`, `float`, `bool` or `str` (or None for "not given")."""

    model_config = ConfigDict(extra="ignore", strict=True, frozen=True)


def parse_query(model: type[_Query], request: web.Request) -> _Query:
    """`model` from the request's query string; 400 naming the first parameter that is malformed or out of range."""
    values: dict[str, Any] = {}
    for name, field in model.model_fields.items():
        raw = request.query.get(name)
        if raw is not None:
            values[name] = _convert(name, raw, _scalar(field.annotation))
    try:
        return model.model_validate(values)
    except ValidationError as exc:
        first = exc.errors()[0]
        name = str(first["loc"][0]) if first["loc"] else ""
        found = model.model_fields.get(name)
        bounds = _bounds(found.metadata) if found is not None else None
        if bounds is not None and first["type"] in _RANGE_ERRORS:
            low, high = bounds
            said = f"must be between {low} and {high}, got {values[name]}"
        else:
            said = first["msg"].removeprefix("Value error, ")
        raise ApiError(400, f"query parameter {name!r} {said}", param=name) from None


_RANGE_ERRORS = frozenset({"greater_than", "greater_than_equal", "less_than", "less_than_equal"})


def _scalar(annotation: Any) -> Any:
    """`int` for `int | None`, and so on: the one type a parameter's text is read as."""
    if get_origin(annotation) in (Union, types.UnionType):
        kinds = [a for a in get_args(annotation) if a is not type(None)]
        return kinds[0] if len(kinds) == 1 else str
    return annotation


def _convert(name: str, raw: str, kind: Any) -> Any:
    if kind is bool:
        if raw.lower() not in _BOOLS:
            raise ApiError(400, f"query parameter {name!r} must be true or false, got {raw!r}", param=name)
        return _BOOLS[raw.lower()]
    if kind is int:
        if not _INT.fullmatch(raw):
            raise ApiError(400, f"query parameter {name!r} must be an integer in ASCII digits, got {raw!r}", param=name)
        return int(raw)
    if kind is float:
        if not _NUMBER.fullmatch(raw):
            raise ApiError(400, f"query parameter {name!r} must be a number such as 1 or 0.5, got {raw!r}", param=name)
        return float(raw)
    return raw


def _bounds(metadata: list[Any]) -> tuple[Any, Any] | None:
    low = high = None
    for item in metadata:
        if isinstance(item, Ge | Gt):
            low = item.ge if isinstance(item, Ge) else item.gt
        elif isinstance(item, Le | Lt):
            high = item.le if isinstance(item, Le) else item.lt
    return (low, high) if low is not None and high is not None else None
