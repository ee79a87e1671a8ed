"""The admin HTTP surface in-process: tokens per prefix, strict JSON, idempotent deposits."""

from __future__ import annotations

import pytest

from meterd.config import load_settings
from meterd.services.ledger_check import check_ledger
from meterd.web.app import SERVICES, create_app

from .helpers import fixed_clock

ADMIN = "admin-token-0123456789abcdef"
AGENTS = "agents-token-0123456789abcdef"
FINANCE = "finance-token-0123456789abcdef"
LICENCE = [{"product": "desktop", "kind": "license"}]


@pytest.fixture
async def client(aiohttp_client, database, tmp_path):
    settings = load_settings(
        None,
        {
            "METERD_STATE_DIR": str(tmp_path),
            "METERD_ADMIN_TOKEN": ADMIN,
            "METERD_AGENTS_TOKEN": AGENTS,
            "METERD_FINANCE_TOKEN": FINANCE,
            "METERD_PIN_SECRET": "pin-secret-0123456789abcdef",
            "METERD_REQUEST_BODY_BYTES_MAX": "8192",
        },
    )
    return await aiohttp_client(create_app(settings, database, clock=fixed_clock))


def admin(token: str = ADMIN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def create(client, account_id="A1", **extra):
    body = {
        "account_id": account_id,
        "name": "Acme",
        "plan": "per_minute",
        "currency": "USD",
        "caller_ids": ["+14155550100"],
        "products": LICENCE,
        **extra,
    }
    response = await client.post("/admin/accounts", json=body, headers=admin())
    assert response.status == 201, await response.text()
    return await response.json()


async def test_account_is_created_with_included_minutes_and_entitlements(client):
    view = await create(
        client,
        pin="4321",
        products=[{"product": "desktop", "kind": "license", "ump_until": "2027-06-30"}],
    )
    assert view["bank_minutes"] == 45 and view["deposit_minor"] == 0
    assert view["currency"] == "USD" and view["card_on_file"] is False
    assert view["entitlements"]["email_ticket"]["eligible"] is True
    assert "4321" not in str(view)
    fetched = await (await client.get("/admin/accounts/A1", headers=admin())).json()
    assert fetched == view


async def test_a_licence_gives_included_minutes_once(client):
    await create(client, products=[])
    for products in (LICENCE, [*LICENCE, {"product": "web", "kind": "subscription"}], LICENCE):
        response = await client.patch(
            "/admin/accounts/A1", json={"products": products}, headers=admin()
        )
        assert response.status == 200
    view = await (await client.get("/admin/accounts/A1", headers=admin())).json()
    assert view["bank_minutes"] == 45


async def test_add_on_and_maintenance_bring_no_minutes(client):
    view = await create(client, products=[{"product": "quotevalet", "kind": "subscription"}])
    assert view["bank_minutes"] == 0


async def test_deposits_are_idempotent_by_reference(client, database):
    await create(client)
    url = "/admin/accounts/A1/deposits"
    first = await client.post(
        url, json={"amount_minor": 2500, "reference": "wire-1"}, headers=admin()
    )
    again = await client.post(
        url, json={"amount_minor": 2500, "reference": "wire-1"}, headers=admin()
    )
    other = await client.post(
        url, json={"amount_minor": 9999, "reference": "wire-1"}, headers=admin()
    )
    assert (first.status, again.status, other.status) == (201, 200, 409)
    assert (await again.json())["replayed"] is True
    assert (await again.json())["deposit_minor"] == 2500
    view = await (await client.get("/admin/accounts/A1", headers=admin())).json()
    assert view["deposit_minor"] == 2500
    assert (await check_ledger(database)).ok


async def test_minutes_are_granted_once_per_reference(client):
    await create(client)
    for _ in range(2):
        response = await client.post(
            "/admin/accounts/A1/minutes",
            json={"minutes": 30, "reference": "block-9"},
            headers=admin(),
        )
    assert (await response.json())["bank_minutes"] == 75


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({}, 401),
        ({"Authorization": "Basic YWRtaW46YWRtaW4="}, 401),
        ({"Authorization": "Bearer wrong-token-0123456789"}, 403),
        ({"Authorization": f"Bearer {AGENTS}"}, 403),
        ({"Authorization": f"Bearer {FINANCE}"}, 403),
    ],
)
async def test_a_wrong_missing_or_other_prefix_token_changes_nothing(client, headers, status):
    await create(client)
    for method, url, body in [
        ("POST", "/admin/accounts/A1/deposits", {"amount_minor": 100, "reference": "r1"}),
        ("POST", "/admin/accounts", {"account_id": "A2", "name": "x", "plan": "per_minute"}),
        ("PATCH", "/admin/accounts/A1", {"name": "changed"}),
        ("GET", "/admin/accounts/A1", None),
    ]:
        response = await client.request(method, url, json=body, headers=headers)
        assert response.status == status
        assert (await response.json())["error"] in ("unauthorized", "forbidden")
    view = await (await client.get("/admin/accounts/A1", headers=admin())).json()
    assert view["deposit_minor"] == 0 and view["name"] == "Acme"
    assert (await client.get("/admin/accounts/A2", headers=admin())).status == 404


@pytest.mark.parametrize(
    ("body", "says"),
    [
        ('{"amount_minor": 10.5, "reference": "r"}', "whole number"),
        ('{"amount_minor": 1e3, "reference": "r"}', "whole number"),
        ('{"amount_minor": "100", "reference": "r"}', "whole number"),
        ('{"amount_minor": true, "reference": "r"}', "whole number"),
        ('{"amount_minor": -100, "reference": "r"}', "greater than zero"),
        ('{"amount_minor": 0, "reference": "r"}', "greater than zero"),
        ('{"amount_minor": 100000000000000000000, "reference": "r"}', "at most"),
        ('{"amount_minor": ' + "9" * 5000 + ', "reference": "r"}', "JSON"),
        ('{"amount_minor": NaN, "reference": "r"}', "JSON"),
        ('{"amount_minor": 100}', "reference is required"),
        ('{"amount_minor": 100, "reference": "has spaces"}', "reference"),
        ('{"amount_minor": 100, "reference": "r", "extra": 1}', "unknown field"),
        ('{"amount_minor": 100, "reference": "r"', "JSON"),
        ("[1, 2]", "JSON object"),
    ],
)
async def test_bad_amounts_and_malformed_json_get_400_and_change_nothing(client, body, says):
    await create(client)
    response = await client.post(
        "/admin/accounts/A1/deposits",
        data=body,
        headers={**admin(), "Content-Type": "application/json"},
    )
    assert response.status == 400
    payload = await response.json()
    assert payload["error"] == "invalid_request" and says in payload["detail"]
    view = await (await client.get("/admin/accounts/A1", headers=admin())).json()
    assert view["deposit_minor"] == 0


async def test_non_json_and_oversized_bodies_are_refused(client):
    await create(client)
    url = "/admin/accounts/A1/deposits"
    wrong_type = await client.post(
        url,
        data="amount_minor=5",
        headers={**admin(), "Content-Type": "application/x-www-form-urlencoded"},
    )
    not_utf8 = await client.post(
        url, data=b'{"reference": "\xff"}', headers={**admin(), "Content-Type": "application/json"}
    )
    too_big = await client.post(
        url,
        data=b'{"x": "' + b"a" * 10000 + b'"}',
        headers={**admin(), "Content-Type": "application/json"},
    )
    assert (wrong_type.status, not_utf8.status, too_big.status) == (400, 400, 413)
    assert (await too_big.json())["error"] == "body_too_large"


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        ({"plan": "free"}, "plan must be one of"),
        ({"caller_ids": ["555-1234"]}, "E.164"),
        ({"pin": "12"}, "4 to 8 digits"),
        ({"pin": 1234}, "4 to 8 digits"),
        ({"currency": "usd"}, "currency"),
        ({"products": [{"product": "desktop", "kind": "lease"}]}, "license or subscription"),
        ({"valid_until": "next year"}, "ISO 8601"),
        ({"account_id": "has space"}, "account_id"),
    ],
)
async def test_bad_account_fields_get_400(client, extra, says):
    body = {"account_id": "A9", "name": "Acme", "plan": "per_minute", **extra}
    response = await client.post("/admin/accounts", json=body, headers=admin())
    assert response.status == 400
    assert says in (await response.json())["detail"]


async def test_duplicate_account_and_taken_pin_are_conflicts(client):
    await create(client, pin="1234")
    again = await client.post(
        "/admin/accounts",
        json={"account_id": "A1", "name": "x", "plan": "per_minute"},
        headers=admin(),
    )
    taken = await client.post(
        "/admin/accounts",
        json={"account_id": "A2", "name": "x", "plan": "per_minute", "pin": "1234"},
        headers=admin(),
    )
    assert (again.status, taken.status) == (409, 409)
    assert "PIN" in (await taken.json())["detail"]
    assert (await client.get("/admin/accounts/A2", headers=admin())).status == 404


async def test_unknown_account_and_route_are_json_404s(client):
    for response in (
        await client.get("/admin/accounts/nope", headers=admin()),
        await client.post(
            "/admin/accounts/nope/deposits",
            headers=admin(),
            json={"amount_minor": 5, "reference": "r"},
        ),
        await client.get("/no/such/route"),
    ):
        assert response.status == 404
        assert (await response.json())["error"] == "not_found"


async def test_healthz_answers_without_a_token(client):
    response = await client.get("/healthz")
    assert response.status == 200 and (await response.json())["status"] == "ok"


async def test_changing_included_minutes_later_never_grants_twice_or_fails(
    client, database, tmp_path
):
    await create(client)  # 45 minutes under the default
    settings = load_settings(
        None,
        {
            "METERD_STATE_DIR": str(tmp_path),
            "METERD_ADMIN_TOKEN": ADMIN,
            "METERD_PIN_SECRET": "pin-secret-0123456789abcdef",
            "METERD_INCLUDED_MINUTES": "30",
        },
    )
    app = create_app(settings, database, clock=fixed_clock)
    view = await app[SERVICES].accounts.change("A1", {"products": LICENCE})
    assert view["bank_minutes"] == 45


async def test_a_deeply_nested_body_is_a_400(client):
    await create(client)
    response = await client.post(
        "/admin/accounts/A1/deposits",
        data="[" * 6000,
        headers={**admin(), "Content-Type": "application/json"},
    )
    assert response.status == 400
