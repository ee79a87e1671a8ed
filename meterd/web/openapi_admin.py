"""The operators', agents' tools' routes of the OpenAPI document (`openapi.py`): `/admin/*` and
`/agents/*`, with their bodies and answers."""

from __future__ import annotations

from typing import Any

from meterd.web.openapi_parts import (
    DAY,
    ISO_TIME,
    JSON_OBJECT,
    PLAN,
    SID,
    TEXT,
    answer,
    errors,
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
_DIRECTION = {"type": "string", "enum": ["inbound", "outbound"]}  # outbound: a callback
_CALL = object_schema(
    {
        "call_sid": TEXT,
        "status": TEXT,
        "direction": _DIRECTION,
        "charges": JSON_OBJECT,
        "agents": JSON_OBJECT,
    },
    ("call_sid", "status", "direction", "charges", "agents"),
    closed=False,
)
_COUNT = {"type": "integer", "minimum": 0}
_STATEMENT = object_schema(
    {
        "account_id": TEXT,
        "currency": TEXT,
        "reconciled": {"type": "boolean"},
        "totals": object_schema(
            {"calls": _COUNT, "inbound_calls": _COUNT, "outbound_calls": _COUNT},
            ("calls", "inbound_calls", "outbound_calls"),
            closed=False,
        ),
        "days": {"type": "array", "items": JSON_OBJECT},
        # the calls files' rows, as the files write them (text), each with its direction
        "calls": {
            "type": "array",
            "items": object_schema(
                {"call_sid": TEXT, "direction": _DIRECTION}, ("call_sid", "direction"), closed=False
            ),
        },
    },
    ("account_id", "currency", "reconciled", "totals", "days", "calls"),
    closed=False,
)


def admin() -> dict[str, Any]:
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
    }


def admin_money() -> dict[str, Any]:
    account_id = [path_param("account_id")]
    return {
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
                {
                    "200": {
                        "description": "the statement, as `format` asks",
                        "content": {
                            "application/json": {"schema": _STATEMENT},
                            "text/csv": {"schema": TEXT},
                            "text/html": {"schema": TEXT},
                        },
                    }
                }
                | errors(400, 401, 403, 404, 409),
                parameters=[
                    *account_id,
                    query_param("from", DAY),
                    query_param("to", DAY),
                    query_param("format", {"type": "string", "enum": ["json", "csv", "html"]}),
                ],
                tag="admin",
            ),
        },
    }


def admin_calls() -> dict[str, Any]:
    return {
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
    }


def admin_ledger_rates() -> dict[str, Any]:
    return {
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


def agents() -> dict[str, Any]:
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
        **_callbacks(),
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


def _callbacks() -> dict[str, Any]:
    """`POST /agents/callbacks` and the callback's view (`meterd/services/callbacks.py`)."""
    nullable = {"type": "string", "nullable": True}
    view = object_schema(
        {
            "callback_id": TEXT,
            "client_reference": TEXT,
            "account_id": TEXT,
            "agent_id": TEXT,
            "to": TEXT,
            "status": {"type": "string", "enum": ["placing", "placed", "not_placed"]},
            "reason": nullable,
            "call_sid": nullable,
            "conference": nullable,
            "participant_label": TEXT,
            "outcome": TEXT,
            "requested_at": ISO_TIME,
        },
        ("callback_id", "client_reference", "status", "call_sid", "outcome"),
    )
    asked = object_schema(
        {
            "client_reference": TEXT,
            "account_id": TEXT,
            "caller_number": TEXT,
            "agent_id": TEXT,
            "to": TEXT,
        },
        ("client_reference", "agent_id"),
    )
    not_placed = object_schema(
        {"error": TEXT, "detail": TEXT, "callback": view}, ("error", "callback"), closed=False
    )
    return {
        "/agents/callbacks": {
            "post": operation(
                "Ring a customer back: metered like an incoming call",
                "agents",
                answer(view, "201")
                | answer(view)
                | {"502": {"description": "Twilio did not place it", **json_content(not_placed)}}
                | errors(400, 401, 403, 404, 409, 413, 503),
                body=asked,
                tag="agents",
            )
        },
        "/agents/callbacks/{callback_id}": {
            "get": operation(
                "A callback and its outcome",
                "agents",
                answer(view) | errors(401, 403, 404),
                parameters=[path_param("callback_id")],
                tag="agents",
            )
        },
    }
