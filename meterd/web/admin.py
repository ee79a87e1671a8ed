"""`/admin/*`: operators and the desk's CRM manage accounts, deposits and minutes."""

from __future__ import annotations

from aiohttp import web

from meterd.services.accounts import MoneyIn
from meterd.web.app import SERVICES, read_json


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
    view = await request.app[SERVICES].accounts.create(await read_json(request))
    return web.json_response(view, status=201)


async def get_account(request: web.Request) -> web.Response:
    return web.json_response(
        await request.app[SERVICES].accounts.view(request.match_info["account_id"])
    )


async def list_accounts(request: web.Request) -> web.Response:
    return web.json_response({"account_ids": await request.app[SERVICES].accounts.list_ids()})


async def change_account(request: web.Request) -> web.Response:
    return web.json_response(
        await request.app[SERVICES].accounts.change(
            request.match_info["account_id"], await read_json(request)
        )
    )


async def add_deposit(request: web.Request) -> web.Response:
    result = await request.app[SERVICES].accounts.deposit(
        request.match_info["account_id"], await read_json(request)
    )
    return _money_in_response(result, "amount_minor", "deposit_minor")


async def add_minutes(request: web.Request) -> web.Response:
    result = await request.app[SERVICES].accounts.grant_minutes(
        request.match_info["account_id"], await read_json(request)
    )
    return _money_in_response(result, "minutes", "bank_minutes")


async def get_call(request: web.Request) -> web.Response:
    return web.json_response(
        await request.app[SERVICES].call_view.view(request.match_info["call_sid"])
    )


def add_routes(app: web.Application) -> None:
    app.router.add_post("/admin/accounts", create_account)
    app.router.add_get("/admin/accounts", list_accounts)
    app.router.add_get("/admin/accounts/{account_id}", get_account)
    app.router.add_patch("/admin/accounts/{account_id}", change_account)
    app.router.add_post("/admin/accounts/{account_id}/deposits", add_deposit)
    app.router.add_post("/admin/accounts/{account_id}/minutes", add_minutes)
    app.router.add_get("/admin/calls/{call_sid}", get_call)
