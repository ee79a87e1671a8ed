"""`GET /openapi.json`: the HTTP surface as an OpenAPI 3.0 document, every route with its
authentication, parameters, body and answers. docs/api.md says what each field means; this is
what tools read (client generators, the schema-driven fuzz test). A test fails when a route
exists that the document lacks, or the reverse (tests/integration/test_openapi.py)."""

from __future__ import annotations

import importlib.metadata
from typing import Any

from aiohttp import web

from meterd.web import openapi_admin
from meterd.web.openapi_parts import (
    DAY,
    JSON_OBJECT,
    TEXT,
    answer,
    errors,
    file_answer,
    json_content,
    object_schema,
    operation,
    path_param,
)

_TWILIO_FORM = {"type": "object", "additionalProperties": TEXT}
_TWIML = {"200": {"description": "TwiML", "content": {"text/xml": {"schema": TEXT}}}}
_PAGE = {"text/html": {"schema": TEXT}}
_HTML = {"200": {"description": "a page", "content": _PAGE}}
_SEE_OTHER = {"303": {"description": "on to the next page"}}


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
        "callback": "A callback answered: TwiML (the conference, or why not)",
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
    }


def _desk_forms() -> dict[str, Any]:
    session = "deskSession"
    form = object_schema({"csrf": TEXT}, closed=False)
    return {
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
                _HTML
                | _SEE_OTHER
                | errors(403)
                | {"404": {"description": "none", "content": _PAGE}},
                parameters=[path_param("account_id")],
                tag="desk",
            )
        },
        "/desk/accounts/{account_id}/statement": {
            "get": operation(
                "This month's statement (admins)",
                session,
                _HTML
                | _SEE_OTHER
                | errors(403)
                | {"404": {"description": "none", "content": _PAGE}},
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
        "paths": _ops()
        | _twilio()
        | openapi_admin.admin()
        | openapi_admin.admin_money()
        | openapi_admin.admin_calls()
        | openapi_admin.admin_ledger_rates()
        | openapi_admin.agents()
        | _finance()
        | _desk()
        | _desk_forms(),
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
