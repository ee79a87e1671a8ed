"""`/admin/*`: operators and the desk's CRM manage accounts, deposits and minutes."""

from __future__ import annotations

from aiohttp import web

from meterd.core.usage import InvalidBusinessDay, parse_business_day
from meterd.core.usage.statement import StatementDoesNotReconcile
from meterd.core.usage.statement_render import statement_csv, statement_html, statement_json
from meterd.services.accounts import MoneyIn
from meterd.services.errors import InvalidRequest
from meterd.services.research import parse_instant
from meterd.services.usage import UsageNotReady, UsageRefused
from meterd.store import ledger_store
from meterd.web.auth import bearer_token
from meterd.web.json_io import json_error, read_json
from meterd.web.keys import SERVICES

PREFIX = "/admin"
authenticate = bearer_token("admin_token", PREFIX + "/")


def _money_in_response(result: MoneyIn, amount_field: str, balance_field: str) -> web.Response:
    body = {
        "account_id": result.account_id,
        "transaction_id": result.transaction_id,
        amount_field: result.amount,
        balance_field: result.balance,
        "replayed": result.replayed,
    }
    if result.unit != "agent_minute":
        body["currency"] = result.unit
    return web.json_response(body, status=200 if result.replayed else 201)


async def create_account(request: web.Request) -> web.Response:
    view = await request.config_dict[SERVICES].accounts.create(await read_json(request))
    return web.json_response(view, status=201)


async def get_account(request: web.Request) -> web.Response:
    return web.json_response(
        await request.config_dict[SERVICES].accounts.view(request.match_info["account_id"])
    )


async def list_accounts(request: web.Request) -> web.Response:
    return web.json_response(
        {"account_ids": await request.config_dict[SERVICES].accounts.list_ids()}
    )


async def change_account(request: web.Request) -> web.Response:
    return web.json_response(
        await request.config_dict[SERVICES].accounts.change(
            request.match_info["account_id"], await read_json(request)
        )
    )


async def add_deposit(request: web.Request) -> web.Response:
    result = await request.config_dict[SERVICES].accounts.deposit(
        request.match_info["account_id"], await read_json(request)
    )
    return _money_in_response(result, "amount_minor", "deposit_minor")


async def add_minutes(request: web.Request) -> web.Response:
    result = await request.config_dict[SERVICES].accounts.grant_minutes(
        request.match_info["account_id"], await read_json(request)
    )
    return _money_in_response(result, "minutes", "bank_minutes")


async def get_call(request: web.Request) -> web.Response:
    return web.json_response(
        await request.config_dict[SERVICES].call_view.view(request.match_info["call_sid"])
    )


STATEMENT_FORMATS = ("json", "csv", "html")


async def get_statement(request: web.Request) -> web.StreamResponse:
    """The account's statement over business days `from` to `to` (YYYY-MM-DD, both included;
    `to` defaults to the last closed day, `from` to the first of its month), as `format`
    json (default), csv or html (printable)."""
    services = request.config_dict[SERVICES]
    query = request.query
    shown = query.get("format", "json")
    if shown not in STATEMENT_FORMATS:
        raise InvalidRequest(f"format must be one of {', '.join(STATEMENT_FORMATS)}")
    try:
        last_day = (
            parse_business_day(query["to"]) if "to" in query else services.usage.last_closed_day()
        )
        first_day = (
            parse_business_day(query["from"]) if "from" in query else last_day.replace(day=1)
        )
    except InvalidBusinessDay as error:
        raise InvalidRequest(f"from and to are business days: {error}") from None
    account_id = request.match_info["account_id"]
    try:
        statement = await services.statements.statement(account_id, first_day, last_day)
    except UsageNotReady as error:
        return json_error(404, "usage_not_ready", str(error))
    except UsageRefused as error:
        return json_error(409, "usage_refused", str(error))
    except StatementDoesNotReconcile as error:  # the days do not chain: say so, never a 500
        return json_error(409, "statement_does_not_reconcile", str(error))
    name = f"statement-{account_id}-{first_day.isoformat()}-{last_day.isoformat()}"
    if shown == "csv":
        return web.Response(
            text=statement_csv(statement),
            content_type="text/csv",
            charset="utf-8",
            headers={"Content-Disposition": f'attachment; filename="{name}.csv"'},
        )
    if shown == "html":
        return web.Response(text=statement_html(statement), content_type="text/html")
    return web.json_response(statement_json(statement))


CALLS_PAGE_MAX = 200
CALL_STATES = ("open", "ended")


async def list_calls(request: web.Request) -> web.Response:
    """Open calls (no end yet) or ended ones, oldest start first; page with `after` (the
    `next_after` of the previous page)."""
    query = request.query
    state = query.get("state", "open")
    if state not in CALL_STATES:
        raise InvalidRequest(f"state must be one of {', '.join(CALL_STATES)}")
    try:
        limit = min(int(query.get("limit", "50")), CALLS_PAGE_MAX)
    except ValueError:
        raise InvalidRequest("limit must be a whole number") from None
    if limit < 1:
        raise InvalidRequest("limit must be at least 1")
    since = parse_instant(dict(query), "since") if "since" in query else None
    return web.json_response(
        await request.config_dict[SERVICES].call_view.list(
            ended=state == "ended",
            account_id=query.get("account_id"),
            since=since,
            after_sid=query.get("after"),
            limit=limit,
        )
    )


LEDGER_PAGE_MAX = 500
ROW_ID_MAX = 2**63 - 1  # the largest row id either database stores (a signed 64-bit integer)


async def get_ledger(request: web.Request) -> web.Response:
    """Ledger transactions, oldest first; page with `after_id` (the last id of a page)."""
    query = request.query
    try:
        after_id = int(query.get("after_id", "0"))
        limit = min(int(query.get("limit", "100")), LEDGER_PAGE_MAX)
    except ValueError:
        raise InvalidRequest("after_id and limit must be whole numbers") from None
    if not 0 <= after_id <= ROW_ID_MAX or limit < 1:
        raise InvalidRequest(f"after_id must be from 0 to {ROW_ID_MAX} and limit >= 1")
    since = parse_instant(dict(query), "since") if "since" in query else None
    async with request.config_dict[SERVICES].database.read() as connection:
        transactions = await ledger_store.list_transactions(
            connection,
            account_id=query.get("account_id"),
            call_sid=query.get("call_sid"),
            since=since,
            after_id=after_id,
            limit=limit,
        )
    return web.json_response(
        {
            "transactions": transactions,
            "next_after_id": transactions[-1]["transaction_id"]
            if len(transactions) == limit
            else None,
        }
    )


async def add_rate(request: web.Request) -> web.Response:
    return web.json_response(
        await request.config_dict[SERVICES].rates.add(await read_json(request)), status=201
    )


async def list_rates(request: web.Request) -> web.Response:
    return web.json_response({"rates": await request.config_dict[SERVICES].rates.list()})


def subapp() -> web.Application:
    """The operators' and the CRM's sub-application, mounted at PREFIX by meterd/web/app.py
    (paths below are relative to it), behind the admin token."""
    app = web.Application(middlewares=[authenticate])
    app.router.add_post("/accounts", create_account)
    app.router.add_get("/accounts", list_accounts)
    app.router.add_get("/accounts/{account_id}", get_account)
    app.router.add_patch("/accounts/{account_id}", change_account)
    app.router.add_post("/accounts/{account_id}/deposits", add_deposit)
    app.router.add_post("/accounts/{account_id}/minutes", add_minutes)
    app.router.add_get("/accounts/{account_id}/statement", get_statement)
    app.router.add_get("/calls", list_calls)
    app.router.add_get("/calls/{call_sid}", get_call)
    app.router.add_get("/ledger", get_ledger)
    app.router.add_post("/rates", add_rate)
    app.router.add_get("/rates", list_rates)
    return app
