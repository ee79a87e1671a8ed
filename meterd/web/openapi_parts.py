"""The pieces `openapi.py` builds its document from: an operation, its parameters, bodies and
answers, as OpenAPI 3.0 wants them."""

from __future__ import annotations

from typing import Any

ERROR = {"$ref": "#/components/schemas/Error"}
JSON_OBJECT = {"type": "object"}
TEXT = {"type": "string"}
ISO_TIME = {"type": "string", "format": "date-time"}
DAY = {"type": "string", "pattern": r"^\d{4}-\d{2}-\d{2}$"}
SID = {"type": "string", "maxLength": 64}
PLAN = {"type": "string", "enum": ["service_agreement", "per_incident", "per_minute"]}


def json_content(schema: dict[str, Any]) -> dict[str, Any]:
    return {"content": {"application/json": {"schema": schema}}}


def errors(*statuses: int) -> dict[str, Any]:
    return {str(s): {"description": "a clear refusal", **json_content(ERROR)} for s in statuses}


def object_schema(
    properties: dict[str, Any], required: tuple[str, ...] = (), *, closed: bool = True
) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "object", "properties": properties}
    if required:
        schema["required"] = list(required)
    if closed:
        schema["additionalProperties"] = False
    return schema


def operation(
    summary: str,
    security: str | None,
    responses: dict[str, Any],
    *,
    body: dict[str, Any] | None = None,
    form: bool = False,
    parameters: list[dict[str, Any]] | None = None,
    tag: str,
) -> dict[str, Any]:
    op: dict[str, Any] = {"summary": summary, "tags": [tag], "responses": responses}
    op["security"] = [{security: []}] if security else []
    if parameters:
        op["parameters"] = parameters
    if body is not None:
        media = "application/x-www-form-urlencoded" if form else "application/json"
        op["requestBody"] = {"required": True, "content": {media: {"schema": body}}}
    return op


def path_param(name: str, schema: dict[str, Any] = SID) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": schema}


def query_param(name: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "schema": schema}


def answer(schema: dict[str, Any], status: str = "200") -> dict[str, Any]:
    return {status: {"description": "done", **json_content(schema)}}


def file_answer(media: str) -> dict[str, Any]:
    return {"200": {"description": "the file", "content": {media: {"schema": TEXT}}}}
