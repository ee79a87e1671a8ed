"""Currencies come from the ISO 4217 list (issue 13): an account may be opened in any currency
with minor units there (JPY, KWD, XOF, CLF...) and nothing else; amounts keep integer minor units
and the usage report writes them with the currency's own decimals (tests/unit/test_usage_core)."""

from __future__ import annotations

import datetime as dt

import pytest

from .twilio_app import ManualClock, admin, build_app

START = dt.datetime(2026, 11, 20, 15, 0, tzinfo=dt.UTC)


@pytest.mark.parametrize("currency", ["JPY", "KWD", "XOF", "CLF", "USD"])
async def test_an_account_opens_in_any_iso_4217_currency(
    aiohttp_client, database, tmp_path, currency
):
    client = await aiohttp_client(build_app(database, tmp_path, ManualClock(START)))
    body = {"account_id": "a1", "name": "A", "plan": "per_minute", "currency": currency}
    response = await admin(client, "POST", "/admin/accounts", body)
    assert response.status == 201, await response.text()
    deposit = await admin(
        client, "POST", "/admin/accounts/a1/deposits", {"amount_minor": 1500, "reference": "d1"}
    )
    assert deposit.status == 201, await deposit.text()
    view = await (await admin(client, "GET", "/admin/accounts/a1")).json()
    assert (view["currency"], view["deposit_minor"]) == (currency, 1500)


@pytest.mark.parametrize("currency", ["ABC", "XAU", "XXX", "usd"])
async def test_an_unknown_currency_or_one_without_minor_units_is_400(
    aiohttp_client, database, tmp_path, currency
):
    client = await aiohttp_client(build_app(database, tmp_path, ManualClock(START)))
    body = {"account_id": "a1", "name": "A", "plan": "per_minute", "currency": currency}
    response = await admin(client, "POST", "/admin/accounts", body)
    assert response.status == 400
    assert "currency" in (await response.json())["detail"]
