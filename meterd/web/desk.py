"""`/desk/*`: the support desk's live page (docs/desk.md). Signed in with the admin or agents
token exchanged for a session cookie (`desk_session`); agents see calls and may waive them,
admins also see accounts and their statements.

    GET  /desk/                       live calls (303 to sign-in without a session)
    GET  /desk/events                 server-sent events: the calls region, when it changes
    GET  /desk/sign-in, POST          the sign-in form, the token exchanged for a session
    POST /desk/sign-out
    POST /desk/calls/{call_sid}/waive a waiver (reason from the configured list)
    GET  /desk/accounts/{account_id}  balances and calls (admins)
    GET  /desk/accounts/{account_id}/statement  this month's statement, printable (admins)
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import secrets
from html import escape
from typing import Any, NoReturn
from urllib.parse import parse_qsl, quote

from aiohttp import web

from meterd.core.usage.statement import StatementDoesNotReconcile
from meterd.core.usage.statement_render import statement_html
from meterd.logs import get_logger
from meterd.services.errors import InvalidRequest, ServiceError
from meterd.services.usage import UsageNotReady, UsageRefused
from meterd.web import desk_render as render
from meterd.web.desk_session import (
    SESSION_COOKIE,
    SESSION_HOURS,
    SIGN_IN_COOKIE,
    SIGN_IN_MINUTES,
    Session,
    csrf_ok,
    csrf_token,
    desk_key,
    new_session,
    read_session,
)
from meterd.web.keys import SERVICES

log = get_logger("meterd.desk")

PREFIX = render.PREFIX
EVENTS_POLL_SECONDS = 0.5  # the page hears of a change within this (and a read) of it
EVENTS_HEARTBEAT_SECONDS = 15
FORM_FIELDS_MAX = 20  # the page's forms have at most four
DESK_CLOSING = web.AppKey("desk_closing", asyncio.Event)


def _key(request: web.Request) -> bytes:
    settings = request.config_dict[SERVICES].settings
    tokens = (settings.secret("admin_token"), settings.secret("agents_token"))
    return desk_key(settings.secret("pin_secret"), *tokens)


def _secure(request: web.Request) -> bool:
    return str(request.config_dict[SERVICES].settings.public_base_url).startswith("https://")


def _set_cookie(
    request: web.Request, response: web.StreamResponse, name: str, value: str, max_age: int
) -> None:
    """The desk's cookies: its own path, never read by scripts, never sent cross-site, Secure
    when meterd's public URL is https."""
    response.set_cookie(
        name,
        value,
        max_age=max_age,
        path=PREFIX,
        httponly=True,
        samesite="Strict",
        secure=_secure(request),
    )


def _session(request: web.Request) -> Session | None:
    return read_session(_key(request), request.cookies.get(SESSION_COOKIE))


def _html(text: str, status: int = 200) -> web.Response:
    return web.Response(
        text=text,
        status=status,
        content_type="text/html",
        headers={"Cache-Control": "no-store", "X-Frame-Options": "DENY"},
    )


def _refused(why: str, status: int = 403) -> web.Response:
    return _html(
        f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>Refused</title>"
        f"</head><body><main><h1>Refused</h1><p>{why}</p>"
        f"<p><a href='{PREFIX}/'>Back to the desk</a></p></main></body></html>",
        status,
    )


def _to_sign_in() -> NoReturn:
    raise web.HTTPSeeOther(f"{PREFIX}/sign-in")


async def _form(request: web.Request) -> dict[str, str]:
    """The page's form (urlencoded, as a browser sends it); anything else is a clear 400."""
    if request.content_type != "application/x-www-form-urlencoded":
        raise InvalidRequest("send the form as application/x-www-form-urlencoded")
    try:
        text = (await request.read()).decode("utf-8", errors="strict")
        pairs = parse_qsl(text, keep_blank_values=True, max_num_fields=FORM_FIELDS_MAX)
    except (UnicodeDecodeError, ValueError):
        raise InvalidRequest("the form cannot be read") from None
    return dict(pairs)


async def _signed_in_form(request: web.Request) -> tuple[Session, dict[str, str]]:
    """The session and the form of a POST, or a refusal: no session (303 to sign-in), a
    missing or wrong CSRF token (403)."""
    session = _session(request)
    if session is None:
        _to_sign_in()
    form = await _form(request)
    if not csrf_ok(_key(request), session.session_id, form.get("csrf")):
        raise web.HTTPForbidden(
            text="refused: the form's CSRF token is missing or wrong; reload the page",
            content_type="text/plain",
        )
    return session, form


async def sign_in_form(request: web.Request) -> web.Response:
    pending = secrets.token_urlsafe(16)
    response = _html(render.sign_in_page(csrf_token(_key(request), pending)))
    _set_cookie(request, response, SIGN_IN_COOKIE, pending, SIGN_IN_MINUTES * 60)
    return response


async def sign_in(request: web.Request) -> web.Response:
    form = await _form(request)
    pending = request.cookies.get(SIGN_IN_COOKIE, "")
    if not pending or not csrf_ok(_key(request), pending, form.get("csrf")):
        return _refused("The sign-in form has expired or was not ours: open it again.")
    settings = request.config_dict[SERVICES].settings
    presented = form.get("token", "").encode()
    role = None
    for name, candidate in (("admin", "admin_token"), ("agents", "agents_token")):
        expected = settings.secret(candidate).encode()
        if expected and hmac.compare_digest(presented, expected):
            role = name
    if role is None:
        log.warning("desk sign-in refused: wrong token")
        return _html(render.sign_in_page(csrf_token(_key(request), pending), "Wrong token."), 401)
    _, cookie = new_session(_key(request), role)
    response = web.HTTPSeeOther(f"{PREFIX}/")
    _set_cookie(request, response, SESSION_COOKIE, cookie, SESSION_HOURS * 3600)
    response.del_cookie(SIGN_IN_COOKIE, path=PREFIX)
    log.info("desk signed in", role=role)
    raise response


async def sign_out(request: web.Request) -> web.Response:
    await _signed_in_form(request)
    response = web.HTTPSeeOther(f"{PREFIX}/sign-in")
    response.del_cookie(SESSION_COOKIE, path=PREFIX)
    raise response


async def page(request: web.Request) -> web.Response:
    session = _session(request)
    if session is None:
        _to_sign_in()
    services = request.config_dict[SERVICES]
    board = await services.desk.board()
    csrf = csrf_token(_key(request), session.session_id)
    reasons = list(services.settings.waiver_reasons)
    notice = request.query.get("notice", "")[:300]
    return _html(render.desk_page(board, session, csrf, reasons, notice))


async def events(request: web.Request) -> web.StreamResponse:
    """The calls region, sent again whenever what it shows changes (polled every
    EVENTS_POLL_SECONDS from the database, so a change made by any meterd is seen)."""
    session = _session(request)
    if session is None:
        raise web.HTTPUnauthorized(text="sign in first", content_type="text/plain")
    services = request.config_dict[SERVICES]
    csrf = csrf_token(_key(request), session.session_id)
    reasons = list(services.settings.waiver_reasons)
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-store",
            "X-Accel-Buffering": "no",
        }
    )
    await response.prepare(request)
    shown = ""
    quiet_seconds = 0.0
    closing = request.app[DESK_CLOSING]
    while session.expires_at > services.clock().timestamp() and not closing.is_set():
        board = await services.desk.board(shared=True)
        region = render.calls_region(board, session, csrf, reasons)
        # the moment shown changes every time: compare what is below it
        body = region.split("</p>", 1)[-1]
        if body != shown:
            shown = body
            data = "".join(f"data: {line}\n" for line in region.splitlines() or [""])
            await response.write(f"event: calls\n{data}\n".encode())
            quiet_seconds = 0.0
        elif quiet_seconds >= EVENTS_HEARTBEAT_SECONDS:
            await response.write(b": still here\n\n")
            quiet_seconds = 0.0
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(closing.wait(), EVENTS_POLL_SECONDS)
        quiet_seconds += EVENTS_POLL_SECONDS
    return response


async def waive(request: web.Request) -> web.Response:
    _, form = await _signed_in_form(request)
    call_sid = request.match_info["call_sid"]
    body: dict[str, Any] = {
        "call_sid": call_sid,
        "agent_id": form.get("agent_id", ""),
        "reason": form.get("reason", ""),
    }
    try:
        result = await request.config_dict[SERVICES].waivers.waive(body)
        notice = f"{call_sid}: {result['outcome'].replace('_', ' ')}"
    except ServiceError as error:
        notice = f"{call_sid} was not waived: {error}"
    raise web.HTTPSeeOther(f"{PREFIX}/?notice={quote(notice[:300])}")


def _admin_session(request: web.Request) -> Session:
    session = _session(request)
    if session is None:
        _to_sign_in()
    if not session.admin:
        raise web.HTTPForbidden(text="accounts are for admins", content_type="text/plain")
    return session


async def account(request: web.Request) -> web.Response:
    session = _admin_session(request)
    services = request.config_dict[SERVICES]
    try:
        view, calls = await services.desk.account(request.match_info["account_id"])
    except ServiceError as error:
        return _refused(escape(str(error)), 404)
    csrf = csrf_token(_key(request), session.session_id)
    reasons = list(services.settings.waiver_reasons)
    return _html(render.account_page(view, calls, session, csrf, reasons))


async def account_statement(request: web.Request) -> web.Response:
    _admin_session(request)
    services = request.config_dict[SERVICES]
    last_day = services.usage.last_closed_day()
    try:
        statement = await services.statements.statement(
            request.match_info["account_id"], last_day.replace(day=1), last_day
        )
    except (ServiceError, UsageNotReady, UsageRefused, StatementDoesNotReconcile) as error:
        return _refused(escape(f"No statement: {error}"), 404)
    return _html(statement_html(statement))


async def _end_event_streams(app: web.Application) -> None:
    """Shutting down: the open event streams end (the browser reconnects to another meterd, or
    to this one once it is back), so the daemon does not wait on them."""
    app[DESK_CLOSING].set()


async def root(request: web.Request) -> web.Response:
    raise web.HTTPMovedPermanently(f"{PREFIX}/")


def subapp() -> web.Application:
    """The desk's sub-application, mounted at PREFIX by meterd/web/app.py; its own session
    authentication (no bearer token)."""
    app = web.Application()
    app[DESK_CLOSING] = asyncio.Event()
    app.on_shutdown.append(_end_event_streams)  # type: ignore[arg-type, unused-ignore]  # aiohttp 3.12 mistypes it
    app.router.add_get("/", page)
    app.router.add_get("/events", events)
    app.router.add_get("/sign-in", sign_in_form)
    app.router.add_post("/sign-in", sign_in)
    app.router.add_post("/sign-out", sign_out)
    app.router.add_post("/calls/{call_sid}/waive", waive)
    app.router.add_get("/accounts/{account_id}", account)
    app.router.add_get("/accounts/{account_id}/statement", account_statement)
    return app
