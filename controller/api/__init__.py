"""The controller's HTTP API, one module per area. Each module lists its routes in ``ROUTES``;
the app and the OpenAPI document are both built from those lists, so they cannot disagree."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Literal

from aiohttp import web

from controller.services import Refused

Role = Literal["admin", "node", "scraper", "controller", "enroll", "any"]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclasses.dataclass(frozen=True)
class Route:
    """One endpoint: who may call it (``node`` means the node named in the path) and what it does."""

    method: str
    path: str
    handler: Handler
    role: Role
    summary: str
    body: Mapping[str, str] | None = None  # request fields -> description, for the OpenAPI document


class ApiError(Refused):
    """A request the HTTP layer refuses before any service sees it (malformed, unknown field);
    answered like a service's :class:`controller.services.Refused`."""


def state(request: web.Request) -> Any:
    return request.app["kumo"]


PAGE_DEFAULT = 500
PAGE_MAX = 1000


def page_query(request: web.Request) -> tuple[int, str | None]:
    """A list endpoint's ``?limit=&after=``: how many items (1 to PAGE_MAX, default
    PAGE_DEFAULT) and the cursor the previous page's ``next`` gave."""
    raw = request.query.get("limit")
    try:
        limit = int(raw) if raw is not None else PAGE_DEFAULT
    except ValueError:
        limit = 0
    if not 1 <= limit <= PAGE_MAX:
        raise ApiError(400, f"limit must be an integer from 1 to {PAGE_MAX}, got {raw!r:.40}")
    after = request.query.get("after")
    if after is not None and not 0 < len(after) <= 256:
        raise ApiError(400, "after must be the next cursor of the previous page")
    return limit, after


def time_cursor(after: str | None) -> tuple[float, str] | None:
    """The (created_at, id) in a newest-first list's ``after`` cursor, ``"<created_at!r>/<id>"``."""
    if after is None:
        return None
    created, _, item_id = after.partition("/")
    try:
        when = float(created)
    except ValueError:
        when = math.nan
    if not math.isfinite(when):
        raise ApiError(400, "after must be the next cursor of the previous page")
    return when, item_id


def paged(rows: list[Any], limit: int, cursor: Callable[[Any], str]) -> tuple[list[Any], str | None]:
    """``rows`` (fetched with ``limit + 1``) cut to one page, and the cursor of the next page
    (None on the last)."""
    if len(rows) > limit:
        return rows[:limit], cursor(rows[limit - 1])
    return rows, None


def reply(data: Any, status: int = 200) -> web.Response:
    return web.json_response(data, status=status, dumps=lambda d: json.dumps(d, separators=(",", ":")))


async def json_body(request: web.Request) -> dict[str, Any]:
    """The request's JSON object; 400 naming the problem when it is not one."""
    if not request.body_exists:
        return {}
    raw = await request.read()  # over client_max_size: aiohttp raises 413, turned into JSON
    try:
        data = json.loads(raw or b"{}", parse_constant=_no_constant, parse_float=_finite)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ApiError(400, f"request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise ApiError(400, "request body is nested too deeply") from None
    if not isinstance(data, dict):
        raise ApiError(400, f"request body must be a JSON object, got {type(data).__name__}")
    return data


def _no_constant(name: str) -> Any:
    # Python's json reads NaN and Infinity, which JSON does not have; a NaN that reaches a
    # comparison (a size, a timeout) makes every check against it false.
    raise ApiError(400, f"request body is not valid JSON: {name} is not a JSON number")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e999
        raise ApiError(400, f"request body is not valid JSON: {text} is out of range")
    return value


def field(data: Mapping[str, Any], name: str, kind: type | tuple[type, ...], required: bool = True, default: Any = None) -> Any:
    """``data[name]`` checked against ``kind``; 400 naming the field otherwise."""
    if name not in data or data[name] is None:
        if required:
            raise ApiError(400, f"field {name!r} is required")
        return default
    value = data[name]
    if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise ApiError(400, f"field {name!r} must be {_names(kind)}, got {value!r}")
    if not isinstance(value, kind):
        raise ApiError(400, f"field {name!r} must be {_names(kind)}, got {type(value).__name__}")
    return value


def reject_unknown(data: Mapping[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ApiError(400, f"unknown field {unknown[0]!r} (allowed: {', '.join(sorted(allowed))})")


def _names(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    words = {str: "a string", int: "an integer", float: "a number", bool: "true or false", dict: "an object", list: "a list"}
    return " or ".join(words.get(k, k.__name__) for k in kinds)
