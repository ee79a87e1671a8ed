"""Strict readers for JSON request fields. Every failure is an `InvalidRequest` naming the field.

Integers must be JSON integers: a float (`1.0`, `1e3`), a string or a boolean is refused, so no
amount of money ever passes through a float.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Mapping
from typing import Any

from meterd.services.errors import InvalidRequest

REFERENCE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:/-]{0,127}$")


def require_object(body: Any) -> Mapping[str, Any]:
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object")
    return body


def positive_int(body: Mapping[str, Any], field: str, *, maximum: int) -> int:
    if field not in body:
        raise InvalidRequest(f"{field} is required")
    value = body[field]
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequest(f"{field} must be a whole number (JSON integer), got {value!r}"[:200])
    if value <= 0:
        raise InvalidRequest(f"{field} must be greater than zero, got {value}")
    if value > maximum:
        raise InvalidRequest(f"{field} must be at most {maximum}, got {value}")
    return value


def text(
    body: Mapping[str, Any],
    field: str,
    *,
    pattern: re.Pattern[str] | None = None,
    max_chars: int = 200,
    required: bool = True,
    default: str | None = None,
) -> str | None:
    if field not in body or body[field] is None:
        if required:
            raise InvalidRequest(f"{field} is required")
        return default
    value = body[field]
    if not isinstance(value, str) or not value.strip():
        raise InvalidRequest(f"{field} must be non-empty text")
    if len(value) > max_chars:
        raise InvalidRequest(f"{field} must be at most {max_chars} characters")
    if pattern is not None and not pattern.fullmatch(value):
        raise InvalidRequest(f"{field} has an invalid format: {value!r}"[:200])
    return value


def required_text(body: Mapping[str, Any], field: str, **kwargs: Any) -> str:
    value = text(body, field, required=True, **kwargs)
    if value is None:  # text() raises for a missing required field; this only narrows the type
        raise InvalidRequest(f"{field} is required")
    return value


def iso_date(body: Mapping[str, Any], field: str) -> dt.date | None:
    value = body.get(field)
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidRequest(f"{field} must be an ISO 8601 date such as 2027-01-31")
    try:
        return (
            dt.date.fromisoformat(value[:10])
            if len(value) > 10 and value[10] == "T"
            else dt.date.fromisoformat(value)
        )
    except ValueError:
        raise InvalidRequest(f"{field} must be an ISO 8601 date such as 2027-01-31") from None


def reference(body: Mapping[str, Any], field: str = "reference") -> str:
    return required_text(body, field, pattern=REFERENCE, max_chars=128)


def only_fields(body: Mapping[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise InvalidRequest(f"unknown field(s): {', '.join(unknown)}"[:300])
