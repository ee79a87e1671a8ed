"""An account's statement over a month (issue 16): a block bought by card, deposits, a waiver and
calls in every plan; it reconciles (opening + movements = closing, in minutes and in money),
ends at the ledger's balances, and each day's figures are the nightly usage's. Both backends,
the real `stripe` SDK against localstripe."""

from __future__ import annotations

import csv
import datetime as dt
import io

import pytest
from sqlalchemy import update

from meterd.adapters.stripe_gateway import StripeGateway, StripeSettings
from meterd.core.usage.statement import BALANCES
from meterd.services.usage_publish import UsageFile, sha256_of
from meterd.store.usage_schema import usage_runs
from meterd.web.app import SERVICES
from tests.call_scripts import CUSTOMER_NUMBER, CallScript
from tests.stripe_server import SECRET_KEY

from .test_call_list import make_outbound
from .test_payments import pay_params
from .twilio_app import ManualClock, admin, agents, build_app, post_twilio

FINANCE = "finance-token-0123456789abcdef"
NOVEMBER = (dt.date(2026, 11, 1), dt.date(2026, 11, 30))


def utc(*args: int) -> dt.datetime:
    return dt.datetime(*args, tzinfo=dt.UTC)


@pytest.fixture
async def client(aiohttp_client, database, tmp_path, localstripe):
    localstripe.reset()
    gateway = StripeGateway(
        StripeSettings(secret_key=SECRET_KEY, api_base_url=localstripe.base_url, timeout_seconds=8)
    )
    clock = ManualClock(utc(2026, 11, 2, 9, 0))
    app = build_app(
        database,
        tmp_path,
        clock,
        gateway=gateway,
        METERD_SETTLE_DELAY_SECONDS="60",
        METERD_FINANCE_TOKEN=FINANCE,
    )
    client = await aiohttp_client(app)
    client.clock = clock
    yield client
    await gateway.close()


async def _call(client, n: int, at: dt.datetime, talk_seconds: int, *, pay: bool = False):
    """A call of `talk_seconds` with alice, settled."""
    client.clock.now = at
    script = CallScript(n, at, from_number=CUSTOMER_NUMBER)
    twiml = await (await post_twilio(client, "/twilio/voice", script.voice())).text()
    if pay:  # no funds: the caller gives a card, a block is bought, then the call connects
        assert "<Pay" in twiml, twiml
        twiml = await (
            await post_twilio(client, "/twilio/pay?attempt=1", pay_params(script.call_sid))
        ).text()
    assert "<Conference" in twiml, twiml
    script.join("customer", 0).join("agent:alice", 0).leave("agent:alice", talk_seconds)
    script.end(talk_seconds)
    for params in script.events + script.status_events:
        path = "/twilio/conference" if "ConferenceSid" in params else "/twilio/call-status"
        assert (await post_twilio(client, path, params)).status == 204
    client.clock.now = at + dt.timedelta(seconds=talk_seconds + 61)
    await client.app[SERVICES].metering.tick()
    await client.app[SERVICES].payments.send_queued()  # an incident charged to the card
    view = await (await admin(client, "GET", f"/admin/calls/{script.call_sid}")).json()
    assert view["settled_at"] is not None, view
    return script


async def _admin_ok(client, method: str, path: str, body: dict | None = None) -> dict:
    response = await admin(client, method, path, body)
    assert response.status in (200, 201), await response.text()
    return await response.json()


async def _a_month(client) -> None:
    body = {"account_id": "acme", "name": "Acme", "plan": "per_minute"}
    await _admin_ok(client, "POST", "/admin/accounts", body | {"caller_ids": [CUSTOMER_NUMBER]})
    # Nov 2: no funds, the caller gives a card: a block of 30 minutes for 30.00; 150 s = 3
    await _call(client, 1, utc(2026, 11, 2, 10, 0), 150, pay=True)
    # Nov 5: 20.00 paid in
    client.clock.now = utc(2026, 11, 5, 9, 0)
    await _admin_ok(
        client, "POST", "/admin/accounts/acme/deposits", {"amount_minor": 2000, "reference": "d1"}
    )
    # Nov 9: 120 s = 2 banked minutes, waived the next day
    waived = await _call(client, 2, utc(2026, 11, 9, 10, 0), 120)
    client.clock.now = utc(2026, 11, 10, 9, 0)
    body = {"call_sid": waived.call_sid, "agent_id": "alice", "reason": "software_defect"}
    assert (await agents(client, "/agents/waiver", body)).status == 200
    # Nov 12: per incident, 600 s: one incident of 50.00 (the deposit holds 20.00: the card)
    client.clock.now = utc(2026, 11, 12, 9, 0)
    await _admin_ok(client, "PATCH", "/admin/accounts/acme", {"plan": "per_incident"})
    await _call(client, 3, utc(2026, 11, 12, 10, 0), 600)
    # Nov 16: a service agreement: 300 s metered at zero price
    client.clock.now = utc(2026, 11, 16, 9, 0)
    patch = {"plan": "service_agreement", "valid_until": "2027-06-30"}
    await _admin_ok(client, "PATCH", "/admin/accounts/acme", patch)
    await _call(client, 4, utc(2026, 11, 16, 10, 0), 300)
    client.clock.now = utc(2026, 12, 1, 0, 30)


async def test_a_month_reconciles_and_each_day_is_the_nightly_usage(client):
    await _a_month(client)
    first, last = NOVEMBER
    query = f"?from={first.isoformat()}&to={last.isoformat()}"
    statement = await _admin_ok(client, "GET", f"/admin/accounts/acme/statement{query}")
    assert statement["reconciled"] is True and len(statement["days"]) == 30
    totals = statement["totals"]
    assert totals["bank_card_minutes"] == 30  # one block
    assert totals["bank_used_minutes"] == 3 + 2  # calls 1 and 2
    assert totals["bank_waived_minutes"] == 2 and totals["waivers"] == 1
    assert totals["deposit_paid_in_minor"] == 2000
    assert totals["incidents"] == 1
    assert totals["calls"] == 4
    assert statement["opening"] == {"bank_minutes": 0, "deposit_minor": 0, "receivable_minor": 0}

    # opening + movements = closing, worked again here from the totals
    for balance, (_, _, movements) in BALANCES.items():
        moved = sum(sign * _minor(totals, name) for name, sign in movements)
        assert statement["opening"][balance] + moved == statement["closing"][balance], balance
    # and the closing balances are the ledger's
    view = await _admin_ok(client, "GET", "/admin/accounts/acme")
    assert statement["closing"]["bank_minutes"] == view["bank_minutes"] == 30 - 3
    assert statement["closing"]["deposit_minor"] == view["deposit_minor"]

    # each day's figures are the nightly usage's, to the unit
    for day in statement["days"]:
        response = await client.get(
            f"/finance/usage/{day['business_day']}.json",
            headers={"Authorization": f"Bearer {FINANCE}"},
        )
        assert response.status == 200, await response.text()
        rows = [a for a in (await response.json())["accounts"] if a["account_id"] == "acme"]
        for name, value in day.items():
            if name != "business_day" and rows:
                assert rows[0][name] == value, (day["business_day"], name)
            elif name != "business_day":
                assert value in (0, "0.00"), (day["business_day"], name)
    # the calls, with their plans
    assert sorted({c["plan"] for c in statement["calls"]}) == [
        "per_incident",
        "per_minute",
        "service_agreement",
    ]


def _minor(totals: dict, name: str) -> int:
    return totals.get(f"{name}_minor", totals[name])


async def test_the_csv_and_the_printable_page(client):
    await _a_month(client)
    query = "?from=2026-11-01&to=2026-11-30"
    response = await admin(client, "GET", f"/admin/accounts/acme/statement{query}&format=csv")
    assert response.status == 200 and response.content_type == "text/csv"
    rows = list(csv.DictReader(io.StringIO(await response.text())))
    assert [r["line"] for r in rows] == ["opening", *["day"] * 30, "total", "closing"]
    assert rows[-1]["bank_minutes"] == "27" and rows[-2]["bank_card_minutes"] == "30"
    response = await admin(client, "GET", f"/admin/accounts/acme/statement{query}&format=html")
    page = await response.text()
    assert response.status == 200 and response.content_type == "text/html"
    assert "Statement of acme, 2026-11-01 to 2026-11-30 (USD)" in page


@pytest.mark.parametrize(
    "query, status, says",
    [
        ("?from=2026-11-30&to=2026-11-01", 400, "from must be on or before to"),
        ("?from=2026-01-01&to=2026-11-30", 400, "at most 92 days"),
        ("?from=2026-11-31", 400, "business days"),
        ("?format=pdf", 400, "format must be one of json, csv, html"),
        ("?from=2026-12-01&to=2026-12-01", 404, "has not closed yet"),
    ],
)
async def test_a_bad_period_is_refused_clearly(client, query, status, says):
    body = {"account_id": "acme", "name": "Acme", "plan": "per_minute"}
    await _admin_ok(client, "POST", "/admin/accounts", body)
    client.clock.now = utc(2026, 12, 1, 0, 30)
    response = await admin(client, "GET", f"/admin/accounts/acme/statement{query}")
    assert response.status == status, await response.text()
    assert says in (await response.json())["detail"]


async def test_an_unknown_account_is_404(client):
    client.clock.now = utc(2026, 12, 1, 0, 30)
    response = await admin(client, "GET", "/admin/accounts/nobody/statement")
    assert response.status == 404


# --- direction (issue 17): a callback is a call line like any other, and moves no money -------

DAY = "?from=2026-11-02&to=2026-11-02"


async def _a_day_of_two_calls(client) -> tuple[CallScript, CallScript]:
    """Nov 2: acme pays in 20.00; alice talks 150 s (3 minutes, 3.00), then 90 s (2, 2.00)."""
    body = {"account_id": "acme", "name": "Acme", "plan": "per_minute"}
    await _admin_ok(client, "POST", "/admin/accounts", body | {"caller_ids": [CUSTOMER_NUMBER]})
    await _admin_ok(
        client, "POST", "/admin/accounts/acme/deposits", {"amount_minor": 2000, "reference": "d1"}
    )
    first = await _call(client, 1, utc(2026, 11, 2, 10, 0), 150)
    second = await _call(client, 2, utc(2026, 11, 2, 11, 0), 90)
    client.clock.now = utc(2026, 11, 3, 0, 30)
    return first, second


async def test_a_day_of_an_inbound_and_an_outbound_call_lists_counts_and_reconciles(
    client, database
):
    inbound, outbound = await _a_day_of_two_calls(client)
    await make_outbound(database, outbound.call_sid)
    statement = await _admin_ok(client, "GET", f"/admin/accounts/acme/statement{DAY}")
    assert [(c["call_sid"], c["direction"]) for c in statement["calls"]] == [
        (inbound.call_sid, "inbound"),
        (outbound.call_sid, "outbound"),
    ]
    totals = statement["totals"]
    assert (totals["calls"], totals["inbound_calls"], totals["outbound_calls"]) == (2, 1, 1)
    # direction moves no money: 20.00 in, 5.00 used, and opening + movements = closing
    assert (totals["deposit_paid_in_minor"], totals["deposit_used_minor"]) == (2000, 500)
    assert statement["reconciled"] is True
    for balance, (_, _, movements) in BALANCES.items():
        moved = sum(sign * _minor(totals, name) for name, sign in movements)
        assert statement["opening"][balance] + moved == statement["closing"][balance], balance
    assert statement["closing"]["deposit_minor"] == 1500

    response = await admin(client, "GET", f"/admin/accounts/acme/statement{DAY}&format=csv")
    rows = list(csv.DictReader(io.StringIO(await response.text())))
    assert [(r["line"], r["inbound_calls"], r["outbound_calls"]) for r in rows] == [
        ("opening", "", ""),
        ("day", "1", "1"),
        ("total", "1", "1"),
        ("closing", "", ""),
    ]
    response = await admin(client, "GET", f"/admin/accounts/acme/statement{DAY}&format=html")
    page = await response.text()
    assert "2 calls settled: 1 inbound, 1 outbound (callbacks)." in page
    assert f"<td>{outbound.call_sid}</td><td>outbound</td>" in page
    assert f"<td>{inbound.call_sid}</td><td>inbound</td>" in page


async def test_a_calls_file_published_without_direction_counts_its_calls_inbound(client, database):
    await _a_day_of_two_calls(client)
    usage = client.app[SERVICES].usage
    day = dt.date(2026, 11, 2)
    await usage.build(day)
    # the calls file as a meterd before issue 17 published it, recorded so: no direction column
    path = usage.path(day, UsageFile.CALLS_CSV)
    with path.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    assert rows[0][-1] == "direction"
    with path.open("w", newline="", encoding="utf-8") as handle:
        csv.writer(handle, lineterminator="\r\n").writerows(row[:-1] for row in rows)
    async with database.write() as connection:
        await connection.execute(update(usage_runs).values(calls_csv_sha256=sha256_of(path)))

    statement = await _admin_ok(client, "GET", f"/admin/accounts/acme/statement{DAY}")
    assert b"direction" not in path.read_bytes()  # served as it was published, not rebuilt
    assert [c["direction"] for c in statement["calls"]] == ["inbound", "inbound"]
    totals = statement["totals"]
    assert (totals["calls"], totals["inbound_calls"], totals["outbound_calls"]) == (2, 2, 0)
    assert statement["reconciled"] is True
