"""`GET /openapi.json`: the HTTP surface as an OpenAPI 3.0 document, every route with its
authentication, parameters, body and answers. docs/api.md says what each field means; this is
what tools read (client generators, the schema-driven fuzz test). A test fails when a route
exists that the document lacks, or the reverse (tests/integration/test_openapi.py)."""

from __future__ import annotations

import importlib.metadata
from typing import Any

from aiohttp import web

from meterd.web.openapi_parts import (
    DAY,
    ISO_TIME,
    JSON_OBJECT,
    PLAN,
    SID,
    TEXT,
    answer,
    errors,
    file_answer,
    json_content,
    object_schema,
    operation,
    path_param,
    query_param,
)

_PRODUCT = object_schema(
    {
        "product": {"type": "string", "maxLength": 40},
        "kind": {"type": "string", "enum": ["license", "subscription"]},
        "active_until": {"type": "string", "nullable": True},
        "ump_until": {"type": "string", "nullable": True},
    },
    ("product", "kind"),
)
_ACCOUNT_FIELDS: dict[str, Any] = {
    "name": {"type": "string", "maxLength": 200},
    "plan": PLAN,
    "fallback_plan": PLAN,
    "caller_ids": {"type": "array", "items": TEXT, "maxItems": 50},
    "pin": {"type": "string", "nullable": True},
    "products": {"type": "array", "items": _PRODUCT, "maxItems": 50},
    "valid_until": {"type": "string", "nullable": True},
}
_THRESHOLDS = {
    name: {"type": "integer", "minimum": 0, "nullable": True}
    for name in (
        "alert_bank_minutes_below",
        "alert_deposit_minor_below",
        "auto_top_up_below_minutes",
    )
}
_ACCOUNT = object_schema(
    {
        "account_id": TEXT,
        "bank_minutes": {"type": "integer"},
        "deposit_minor": {"type": "integer"},
        "currency": TEXT,
        "card_on_file": {"type": "boolean"},
    },
    ("account_id", "bank_minutes", "deposit_minor", "currency"),
    closed=False,
)
_MONEY_IN = object_schema(
    {"account_id": TEXT, "transaction_id": {"type": "integer"}, "replayed": {"type": "boolean"}},
    ("account_id", "transaction_id", "replayed"),
    closed=False,
)
_CALL = object_schema(
    {"call_sid": TEXT, "status": TEXT, "charges": JSON_OBJECT, "agents": JSON_OBJECT},
    ("call_sid", "status", "charges", "agents"),
    closed=False,
)
_TWILIO_FORM = {"type": "object", "additionalProperties": TEXT}
_TWIML = {"200": {"description": "TwiML", "content": {"text/xml": {"schema": TEXT}}}}
_PAGE = {"text/html": {"schema": TEXT}}
_HTML = {"200": {"description": "a page", "content": _PAGE}}
_SEE_OTHER = {"303": {"description": "on to the next page"}}


def _admin() -> dict[str, Any]:
    account_id = [path_param("account_id")]
    return {
        "/admin/accounts": {
            "post": operation(
                "Create an account",
                "admin",
                answer(_ACCOUNT, "201") | errors(400, 401, 403, 409, 413),
                body=object_schema(
                    {"account_id": TEXT, "currency": TEXT, **_ACCOUNT_FIELDS},
                    ("account_id", "name", "plan"),
                ),
                tag="admin",
            ),
            "get": operation(
                "List account ids",
                "admin",
                answer(
                    object_schema(
                        {"account_ids": {"type": "array", "items": TEXT}}, ("account_ids",)
                    )
                )
                | errors(401, 403),
                tag="admin",
            ),
        },
        "/admin/accounts/{account_id}": {
            "get": operation(
                "An account's view",
                "admin",
                answer(_ACCOUNT) | errors(401, 403, 404),
                parameters=account_id,
                tag="admin",
            ),
            "patch": operation(
                "Change an account",
                "admin",
                answer(_ACCOUNT) | errors(400, 401, 403, 404, 409, 413),
                body=object_schema({**_ACCOUNT_FIELDS, **_THRESHOLDS}),
                parameters=account_id,
                tag="admin",
            ),
        },
        "/admin/accounts/{account_id}/deposits": {
            "post": operation(
                "Record money paid in",
                "admin",
                answer(_MONEY_IN) | answer(_MONEY_IN, "201") | errors(400, 401, 403, 404, 409, 413),
                body=object_schema(
                    {"amount_minor": {"type": "integer"}, "reference": TEXT},
                    ("amount_minor", "reference"),
                ),
                parameters=account_id,
                tag="admin",
            ),
        },
        "/admin/accounts/{account_id}/minutes": {
            "post": operation(
                "Grant banked minutes",
                "admin",
                answer(_MONEY_IN) | answer(_MONEY_IN, "201") | errors(400, 401, 403, 404, 409, 413),
                body=object_schema(
                    {"minutes": {"type": "integer"}, "reference": TEXT}, ("minutes", "reference")
                ),
                parameters=account_id,
                tag="admin",
            ),
        },
        "/admin/accounts/{account_id}/statement": {
            "get": operation(
                "An account's statement over business days",
                "admin",
                answer(JSON_OBJECT) | errors(400, 401, 403, 404, 409),
                parameters=[
                    *account_id,
                    query_param("from", DAY),
                    query_param("to", DAY),
                    query_param("format", {"type": "string", "enum": ["json", "csv", "html"]}),
                ],
                tag="admin",
            ),
        },
        "/admin/calls": {
            "get": operation(
                "Open or ended calls, paged",
                "admin",
                answer(
                    object_schema(
                        {
                            "calls": {"type": "array", "items": _CALL},
                            "next_after": {"type": "string", "nullable": True},
                        },
                        ("calls", "next_after"),
                    )
                )
                | errors(400, 401, 403),
                parameters=[
                    query_param("state", {"type": "string", "enum": ["open", "ended"]}),
                    query_param("account_id", TEXT),
                    query_param("since", ISO_TIME),
                    query_param("after", SID),
                    query_param("limit", {"type": "integer", "minimum": 1, "maximum": 200}),
                ],
                tag="admin",
            ),
        },
        "/admin/calls/{call_sid}": {
            "get": operation(
                "A call as a person reads it",
                "admin",
                answer(_CALL) | errors(401, 403, 404),
                parameters=[path_param("call_sid")],
                tag="admin",
            ),
        },
        "/admin/ledger": {
            "get": operation(
                "Ledger transactions, paged",
                "admin",
                answer(
                    object_schema(
                        {
                            "transactions": {"type": "array"},
                            "next_after_id": {"type": "integer", "nullable": True},
                        },
                        ("transactions", "next_after_id"),
                    )
                )
                | errors(400, 401, 403),
                parameters=[
                    query_param("after_id", {"type": "integer", "minimum": 0}),
                    query_param("limit", {"type": "integer", "minimum": 1}),
                    query_param("account_id", TEXT),
                    query_param("call_sid", TEXT),
                    query_param("since", ISO_TIME),
                ],
                tag="admin",
            ),
        },
        "/admin/rates": {
            "post": operation(
                "Add a rate from a moment on",
                "admin",
                answer(JSON_OBJECT, "201") | errors(400, 401, 403, 409, 413),
                body=object_schema(
                    {
                        "kind": TEXT,
                        "currency": TEXT,
                        "amount_minor": {"type": "integer"},
                        "effective_from": ISO_TIME,
                    },
                    ("kind", "currency", "amount_minor", "effective_from"),
                ),
                tag="admin",
            ),
            "get": operation(
                "Every rate",
                "admin",
                answer(object_schema({"rates": {"type": "array"}}, ("rates",))) | errors(401, 403),
                tag="admin",
            ),
        },
    }


def _agents() -> dict[str, Any]:
    research = object_schema(
        {
            "call_sid": SID,
            "agent_id": TEXT,
            "action": {"type": "string", "enum": ["start", "stop"]},
            "start": ISO_TIME,
            "end": ISO_TIME,
        },
        ("call_sid", "agent_id"),
    )
    answers = answer(JSON_OBJECT) | errors(400, 401, 403, 404, 409, 413)
    return {
        "/agents/research": {
            "post": operation("Flag research time", "agents", answers, body=research, tag="agents")
        },
        "/agents/waiver": {
            "post": operation(
                "Waive a call's charges",
                "agents",
                answers,
                body=object_schema(
                    {"call_sid": SID, "agent_id": TEXT, "reason": TEXT},
                    ("call_sid", "agent_id", "reason"),
                ),
                tag="agents",
            )
        },
        "/agents/incident-link": {
            "post": operation(
                "Link a follow-up call to an earlier incident",
                "agents",
                answers,
                body=object_schema(
                    {"call_sid": SID, "incident_call_sid": SID}, ("call_sid", "incident_call_sid")
                ),
                tag="agents",
            )
        },
    }


def _finance() -> dict[str, Any]:
    day = [path_param("day", DAY)]
    refusals = errors(400, 401, 403, 404, 409)
    csv_file = file_answer("text/csv")
    json_file = answer(JSON_OBJECT)
    return {
        f"/finance/{route}": {
            "get": operation(summary, "finance", kind | refusals, parameters=day, tag="finance")
        }
        for route, summary, kind in (
            ("usage/{day}.csv", "A business day's usage per account, CSV", csv_file),
            ("usage/{day}.json", "The same as JSON, with totals", json_file),
            ("usage/{day}/calls.csv", "A business day's usage per call, CSV", csv_file),
            ("reconciliation/{day}.json", "The day against Twilio's call records", json_file),
            ("reconciliation/{day}.csv", "The same, one line per finding, CSV", csv_file),
        )
    }


def _twilio() -> dict[str, Any]:
    routes = {
        "voice": "A call comes in: TwiML (menu, <Pay> or the conference)",
        "pin": "The caller's PIN digits",
        "pay": "The result of <Pay>",
        "pay-status": "<Pay> progress",
        "conference": "Conference events",
        "call-status": "Call status callbacks",
        "fallback": "Twilio's fallback URL",
        "announcement": "The announcement a conference hears",
    }
    return {
        f"/twilio/{name}": {
            "post": operation(
                summary,
                "twilioSignature",
                _TWIML | {"204": {"description": "recorded"}} | errors(400, 403, 413, 503),
                body=_TWILIO_FORM,
                form=True,
                tag="twilio",
            )
        }
        for name, summary in routes.items()
    }


def _desk() -> dict[str, Any]:
    session = "deskSession"
    form = object_schema({"csrf": TEXT}, closed=False)
    return {
        "/desk": {
            "get": operation("On to /desk/", None, {"301": {"description": "moved"}}, tag="desk")
        },
        "/desk/": {
            "get": operation("The live calls page", session, _HTML | _SEE_OTHER, tag="desk")
        },
        "/desk/events": {
            "get": operation(
                "The calls region, as server-sent events",
                session,
                {
                    "200": {
                        "description": "a stream",
                        "content": {"text/event-stream": {"schema": TEXT}},
                    }
                }
                | {"401": {"description": "sign in first"}},
                tag="desk",
            )
        },
        "/desk/sign-in": {
            "get": operation("The sign-in form", None, _HTML, tag="desk"),
            "post": operation(
                "A token exchanged for a session cookie",
                None,
                _SEE_OTHER
                | _HTML
                | {
                    "401": {"description": "wrong token", "content": _PAGE},
                    "403": {"description": "a sign-in form not ours", "content": _PAGE},
                }
                | errors(400),
                body=object_schema({"token": TEXT, "csrf": TEXT}, ("token", "csrf")),
                form=True,
                tag="desk",
            ),
        },
        "/desk/sign-out": {
            "post": operation(
                "Sign out", session, _SEE_OTHER | errors(400, 403), body=form, form=True, tag="desk"
            )
        },
        "/desk/calls/{call_sid}/waive": {
            "post": operation(
                "Waive a call from the page",
                session,
                _SEE_OTHER | errors(400, 403),
                body=object_schema({"csrf": TEXT, "reason": TEXT, "agent_id": TEXT}),
                form=True,
                parameters=[path_param("call_sid")],
                tag="desk",
            )
        },
        "/desk/accounts/{account_id}": {
            "get": operation(
                "An account (admins)",
                session,
                _HTML | _SEE_OTHER | errors(403),
                parameters=[path_param("account_id")],
                tag="desk",
            )
        },
        "/desk/accounts/{account_id}/statement": {
            "get": operation(
                "This month's statement (admins)",
                session,
                _HTML | _SEE_OTHER | errors(403),
                parameters=[path_param("account_id")],
                tag="desk",
            )
        },
    }


def _ops() -> dict[str, Any]:
    return {
        "/healthz": {
            "get": operation(
                "Health",
                None,
                answer(object_schema({"status": TEXT}, ("status",), closed=False))
                | {"503": {"description": "unhealthy", **json_content(JSON_OBJECT)}},
                tag="operations",
            )
        },
        "/metrics": {
            "get": operation(
                "Prometheus metrics",
                None,
                {
                    "200": {
                        "description": "text format",
                        "content": {"text/plain": {"schema": TEXT}},
                    }
                },
                tag="operations",
            )
        },
        "/openapi.json": {
            "get": operation("This document", None, answer(JSON_OBJECT), tag="operations")
        },
    }


def _version() -> str:
    try:
        return importlib.metadata.version("meterd")
    except importlib.metadata.PackageNotFoundError:  # run from a checkout not installed
        return "0"


def document() -> dict[str, Any]:
    bearer = {"type": "http", "scheme": "bearer"}
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "meterd",
            "version": _version(),
            "description": "Telephony call metering; docs/api.md is the reference.",
        },
        "paths": _ops() | _twilio() | _admin() | _agents() | _finance() | _desk(),
        "components": {
            "securitySchemes": {
                "admin": bearer | {"description": "METERD_ADMIN_TOKEN"},
                "agents": bearer | {"description": "METERD_AGENTS_TOKEN"},
                "finance": bearer | {"description": "METERD_FINANCE_TOKEN"},
                "twilioSignature": {"type": "apiKey", "in": "header", "name": "X-Twilio-Signature"},
                "deskSession": {"type": "apiKey", "in": "cookie", "name": "meterd_desk"},
            },
            "schemas": {
                "Error": object_schema(
                    {"error": TEXT, "detail": TEXT}, ("error", "detail"), closed=False
                )
            },
        },
    }


DOCUMENT = document()


async def openapi_json(request: web.Request) -> web.Response:
    return web.json_response(DOCUMENT)
