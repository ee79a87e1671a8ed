"""JSON in and out for every route: the error body, the strict reading of a JSON request, and the
NUL check (PostgreSQL's text cannot hold U+0000, and no value meterd keeps has a use for it).

A leaf of meterd.web: it imports no other module of it, so any of them may import it."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from meterd.services.errors import InvalidRequest

NUL = "\x00"
NUL_REFUSED = "a NUL character (U+0000) is not allowed in any value"


def json_error(
    status: int, code: str, detail: str, headers: dict[str, str] | None = None
) -> web.Response:
    return web.json_response({"error": code, "detail": detail}, status=status, headers=headers)


async def read_json(request: web.Request) -> Any:
    """The request's JSON body, strictly: JSON content type, UTF-8, no NaN or Infinity."""
    if request.content_type != "application/json":
        raise InvalidRequest("send the body as JSON with Content-Type: application/json")
    raw = await request.read()  # raises HTTPRequestEntityTooLarge past the cap
    try:
        document = json.loads(raw.decode("utf-8"), parse_constant=_refuse_constant)
    except UnicodeDecodeError:
        raise InvalidRequest("the body is not valid UTF-8") from None
    except ValueError as error:  # JSONDecodeError, and ints past Python's digit limit
        raise InvalidRequest(f"the body is not valid JSON: {error}"[:200]) from None
    except RecursionError:
        raise InvalidRequest("the body is nested too deeply") from None
    if has_nul(document):
        raise InvalidRequest(NUL_REFUSED)
    return document


def has_nul(value: Any) -> bool:
    """True if a string anywhere in `value` (a string, or decoded JSON: keys, values, items)
    holds U+0000."""
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, str):
            if NUL in item:
                return True
        elif isinstance(item, dict):
            pending.extend(item.keys())
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
    return False


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number")
