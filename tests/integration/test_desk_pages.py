"""The desk's pages in-process (issue 16): sign-in exchanges a token for a session cookie;
without a session, with a forged or expired cookie, or without the CSRF token, nothing is shown
or done. The browser test (tests/e2e/test_desk_browser.py) watches a live call."""

from __future__ import annotations

import base64
import json
import re

import aiohttp
import pytest

from meterd.web.desk_session import SESSION_COOKIE, desk_key, new_session
from tests.e2e.daemon import free_port

from .test_call_list import make_outbound
from .test_metering import START, account, deliver, run_until, start_call
from .twilio_app import ADMIN, AGENTS, ManualClock, build_app

KEY = desk_key("pin-secret-0123456789abcdef", ADMIN, AGENTS)  # build_app's secrets


@pytest.fixture
def clock():
    return ManualClock(START)


@pytest.fixture
async def client(aiohttp_client, database, tmp_path, clock):
    # meterd's public URL is https here, so its cookies are Secure: the test client, on
    # http://127.0.0.1, is told to treat the loopback as the secure origin it stands for
    port = free_port()
    jar = aiohttp.CookieJar(unsafe=True, treat_as_secure_origin=[f"http://127.0.0.1:{port}"])
    app = build_app(database, tmp_path, clock, METERD_SETTLE_DELAY_SECONDS="60")
    return await aiohttp_client(app, cookie_jar=jar, server_kwargs={"port": port})


def _csrf(page: str) -> str:
    found = re.search(r"name='csrf' value='([^']+)'", page)
    assert found, page
    return found.group(1)


async def sign_in(client, token: str = ADMIN) -> str:
    """Signs in; returns the desk page's CSRF token."""
    form = await client.get("/desk/sign-in")
    assert form.status == 200
    response = await client.post(
        "/desk/sign-in",
        data={"token": token, "csrf": _csrf(await form.text())},
        allow_redirects=False,
    )
    assert response.status == 303 and response.headers["Location"] == "/desk/"
    cookie = response.cookies[SESSION_COOKIE]
    assert cookie["httponly"] and cookie["samesite"] == "Strict" and cookie["path"] == "/desk"
    assert int(cookie["max-age"]) == 12 * 3600
    page = await client.get("/desk/")
    assert page.status == 200
    return _csrf(await page.text())


async def test_without_a_session_the_page_sends_you_to_sign_in(client):
    for path in ("/desk/", "/desk/accounts/acme"):
        response = await client.get(path, allow_redirects=False)
        assert response.status == 303 and response.headers["Location"] == "/desk/sign-in"
    assert (await client.get("/desk/events")).status == 401
    response = await client.get("/desk", allow_redirects=False)
    assert response.status == 301 and response.headers["Location"] == "/desk/"


async def test_a_wrong_token_or_a_sign_in_form_not_ours_is_refused(client):
    form = await client.get("/desk/sign-in")
    csrf = _csrf(await form.text())
    wrong = await client.post("/desk/sign-in", data={"token": "guess", "csrf": csrf})
    assert wrong.status == 401 and "Wrong token." in await wrong.text()
    forged = await client.post("/desk/sign-in", data={"token": ADMIN, "csrf": "x" * 43})
    assert forged.status == 403
    assert SESSION_COOKIE not in forged.cookies


async def test_a_forged_or_altered_or_expired_cookie_is_no_session(client):
    key = KEY
    _, good = new_session(key, "agents")
    payload, signature = good.split(".")
    as_admin = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    as_admin["role"] = "admin"
    altered = base64.urlsafe_b64encode(json.dumps(as_admin).encode()).decode().rstrip("=")
    _, other_key = new_session(desk_key("pin-secret-0123456789abcdef", "old", AGENTS), "admin")
    _, expired = new_session(key, "admin", now=0)
    for cookie in (f"{altered}.{signature}", other_key, expired, "nonsense", good + "x"):
        client.session.cookie_jar.clear()
        client.session.cookie_jar.update_cookies({SESSION_COOKIE: cookie})
        response = await client.get("/desk/", allow_redirects=False)
        assert response.status == 303, cookie
    client.session.cookie_jar.clear()
    client.session.cookie_jar.update_cookies({SESSION_COOKIE: good})
    assert (await client.get("/desk/", allow_redirects=False)).status == 200


async def test_the_page_shows_open_calls_and_a_waiver_needs_the_csrf_token(client, clock):
    await account(client)
    script = await start_call(client)
    script.join("customer", 0).join("agent:alice", 0)
    await deliver(client, script.events)
    await run_until(client, clock, 70)
    csrf = await sign_in(client)
    page = await (await client.get("/desk/")).text()
    assert script.call_sid in page and "talking" in page and "2 banked min" in page
    assert "43 min" in page  # funds left: 45 - 2

    path = f"/desk/calls/{script.call_sid}/waive"
    body = {"reason": "software_defect", "agent_id": "lead"}
    assert (await client.post(path, data=body, allow_redirects=False)).status == 403
    bad = body | {"csrf": csrf[:-2] + "xx"}
    assert (await client.post(path, data=bad, allow_redirects=False)).status == 403
    page = await (await client.get("/desk/")).text()
    assert "43 min" in page, "nothing was waived"

    done = await client.post(path, data=body | {"csrf": csrf}, allow_redirects=False)
    assert done.status == 303 and "waived" in done.headers["Location"]
    page = await (await client.get("/desk/")).text()
    assert "45 min" in page and "waived" in page


def _row_of(page: str, call_sid: str) -> str:
    found = re.search(f"<tr id='call-{call_sid}'.*?</tr>", page)
    assert found, page
    return found.group(0)


async def test_a_callback_is_tagged_so_beside_its_number(client, database):
    await account(client)
    inbound, outbound = [await start_call(client, n) for n in (1, 2)]
    await make_outbound(database, outbound.call_sid)
    await sign_in(client)
    for path in ("/desk/", "/desk/accounts/acme"):
        page = await (await client.get(path)).text()
        tagged = _row_of(page, outbound.call_sid)
        assert "<span class='callback'" in tagged and ">callback</span>" in tagged, path
        assert "callback" not in _row_of(page, inbound.call_sid), path


async def test_agents_see_calls_admins_also_accounts(client):
    await account(client)
    await sign_in(client, AGENTS)
    assert (await client.get("/desk/accounts/acme", allow_redirects=False)).status == 403
    client.session.cookie_jar.clear()
    await sign_in(client, ADMIN)
    page = await client.get("/desk/accounts/acme")
    assert page.status == 200 and "Banked minutes" in await page.text()


async def test_signing_out_ends_the_session(client):
    csrf = await sign_in(client)
    assert (await client.post("/desk/sign-out", data={}, allow_redirects=False)).status == 403
    out = await client.post("/desk/sign-out", data={"csrf": csrf}, allow_redirects=False)
    assert out.status == 303
    assert (await client.get("/desk/", allow_redirects=False)).status == 303


async def test_the_cookies_are_secure_only_when_the_public_url_is_https(
    aiohttp_client, database, tmp_path
):
    for url, secure in (("https://desk.example", True), ("http://desk.example", False)):
        app = build_app(database, tmp_path, ManualClock(START), METERD_PUBLIC_BASE_URL=url)
        client = await aiohttp_client(app)
        form = await client.get("/desk/sign-in")
        assert bool(form.cookies["meterd_desk_sign_in"]["secure"]) is secure
