"""`/twilio/*`: Twilio's webhooks, on their own sub-application. Its middleware checks every
request's signature before anything is read into the database (a rejected one stores nothing and
is logged with its call sid); each route then checks its own fields, so a handler only ever sees
a signed, well-formed form."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from contextvars import ContextVar

import structlog
from aiohttp import web
from multidict import MultiDict

from meterd.logs import get_logger
from meterd.services.answering import Answer
from meterd.services.errors import InvalidRequest
from meterd.services.ingest_writer import QueueFull
from meterd.services.twilio_fields import check_webhook
from meterd.store.journal import JournalFull
from meterd.store.outage import is_unavailable
from meterd.web import twiml
from meterd.web.json_io import NUL, json_error
from meterd.web.keys import SERVICES
from meterd.web.twilio_request import CALL_SID_CHARS_MAX, TwilioRequestRejected, read_signed_form

log = get_logger("meterd.twilio")

PREFIX = "/twilio"
TWIML = "application/xml"
QUEUE_FULL_RETRY_AFTER_SECONDS = "1"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_signed: ContextVar[MultiDict[str]] = ContextVar("meterd_twilio_signed_form")
"""The form the signature middleware checked, for the route it calls (same task, so the same
context; aiohttp's typed request storage, RequestKey, is newer than the aiohttp meterd supports)."""


@web.middleware
async def twilio_signature(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The Twilio sub-application's authentication: the form, signed over the public URL with
    the auth token (or the webhook key), or 400/403/413 naming what is wrong. A path or method
    no route answers goes on to its 404 or 405 unread."""
    if request.match_info.http_exception is not None:
        return await handler(request)
    services = request.config_dict[SERVICES]
    route = _QUEUED_ROUTES.get(
        request.match_info.route.resource.canonical if request.match_info.route.resource else ""
    )
    if route is not None:
        try:  # shed load before reading and checking the body: the cheapest answer there is
            services.intake.refuse_if_full(route)
        except QueueFull as full:
            return _overloaded(full)
    settings = services.settings
    try:
        form = await read_signed_form(
            request,
            public_base_url=settings.public_base_url,
            auth_token=settings.secret("twilio_auth_token"),
            body_bytes_max=settings.request_body_bytes_max,
            webhook_key=settings.secret("twilio_webhook_key"),
        )
    except TwilioRequestRejected as rejected:
        log.warning(
            "twilio webhook rejected",
            path=request.path,
            reason=rejected.code,
            call_sid=rejected.call_sid,
            status=rejected.status,
        )
        return json_error(rejected.status, rejected.code, rejected.detail)
    structlog.contextvars.bind_contextvars(
        call_sid=(form.get("CallSid") or form.get("FriendlyName") or "")[:CALL_SID_CHARS_MAX]
    )
    token = _signed.set(form)
    try:
        return await handler(request)
    finally:
        _signed.reset(token)


# The callbacks that go through the group-commit writer, by path (relative to PREFIX): route.
_QUEUED_ROUTES = {"/conference": "conference", "/call-status": "call-status"}


def _overloaded(full: QueueFull) -> web.Response:
    """503 with Retry-After: Twilio retries. Counted in meterd_webhook_queue_full_total; not
    logged each time (an overload would become a flood of log lines)."""
    return json_error(
        503, "overloaded", f"{full}; retry", headers={"Retry-After": QUEUE_FULL_RETRY_AFTER_SECONDS}
    )


def _twilio_route(
    name: str,
    handler: Callable[[web.Request, MultiDict[str]], Awaitable[web.Response]],
) -> Callable[[web.Request], Awaitable[web.Response]]:
    """`handler` given the signed form, once it passes the field checks of route `name` (a key
    of `twilio_fields.REQUIRED_FIELDS`)."""

    async def route(request: web.Request) -> web.Response:
        form = _signed.get()
        try:
            for key, value in form.items():
                if NUL in key + value:
                    raise InvalidRequest(f"{key[:40]!s} holds a NUL character (U+0000)")
            check_webhook(name, form.items())
        except InvalidRequest as malformed:
            log.warning(
                "twilio webhook refused: malformed field",
                path=request.path,
                detail=malformed.detail,
                status=400,
            )
            return json_error(400, malformed.code, malformed.detail)
        return await handler(request, form)

    return route


def _twiml(answer: Answer, request: web.Request) -> web.Response:
    settings = request.config_dict[SERVICES].settings
    return web.Response(
        text=twiml.render(answer, settings.public_base_url, settings.pay_connector),
        content_type=TWIML,
    )


def _apologising(
    handler: Callable[[web.Request, MultiDict[str]], Awaitable[web.Response]],
) -> Callable[[web.Request, MultiDict[str]], Awaitable[web.Response]]:
    """For the routes whose answer is TwiML that depends on the database (voice, PIN, card):
    while the database is unavailable, apologise and hang up, rather than a 503 that leaves
    the caller with Twilio's generic error (or its fallback URL, which apologises too)."""

    async def apologising(request: web.Request, form: MultiDict[str]) -> web.Response:
        try:
            return await handler(request, form)
        except Exception as error:
            if not is_unavailable(error):
                raise
            request.config_dict[SERVICES].database.outage.failure(
                f"request:{request.path}", error, call_sid=form.get("CallSid")
            )
            return web.Response(text=twiml.apology(), content_type=TWIML)

    return apologising


async def voice(request: web.Request, form: MultiDict[str]) -> web.Response:
    answer = await request.config_dict[SERVICES].answering.incoming(form, list(form.items()))
    return _twiml(answer, request)


async def callback(request: web.Request, form: MultiDict[str]) -> web.Response:
    """A callback the customer answered (`meterd/services/callbacks.py`): the URL meterd gave
    Twilio when it placed the call names the callback."""
    answer = await request.config_dict[SERVICES].callbacks.answered(
        form, request.query.get("callback", "")
    )
    return _twiml(answer, request)


async def pin(request: web.Request, form: MultiDict[str]) -> web.Response:
    attempt_text = request.query.get("attempt", "1")
    if not re.fullmatch(r"[0-9]{1,2}", attempt_text):
        return json_error(400, "invalid_request", "attempt must be a whole number")
    answer = await request.config_dict[SERVICES].answering.pin_entered(
        form, list(form.items()), int(attempt_text)
    )
    return _twiml(answer, request)


async def pay(request: web.Request, form: MultiDict[str]) -> web.Response:
    attempt_text = request.query.get("attempt", "1")
    if not re.fullmatch(r"[0-9]{1,2}", attempt_text):
        return json_error(400, "invalid_request", "attempt must be a whole number")
    answer = await request.config_dict[SERVICES].answering.card_entered(
        form, list(form.items()), int(attempt_text)
    )
    return _twiml(answer, request)


async def pay_status(request: web.Request, form: MultiDict[str]) -> web.Response:
    """<Pay>'s progress callbacks: logged without any card data, nothing else."""
    log.info(
        "card entry progress",
        call_sid=form.get("CallSid"),
        step=form.get("For"),
        error_type=form.get("ErrorType"),
        attempt=form.get("Attempt"),
    )
    return web.Response(status=204)


async def _take_callback(request: web.Request, route: str, form: MultiDict[str]) -> web.Response:
    """Conference and call-status callbacks: 204 once recorded, in the database (after the
    commit that holds it) or, while it cannot take them, in the local journal; 503 when too
    many wait for the database already, or when the journal cannot take it either."""
    try:
        await request.config_dict[SERVICES].intake.take(route, form, list(form.items()))
    except QueueFull as full:
        return _overloaded(full)
    except (JournalFull, OSError) as error:
        log.error("webhook journal cannot take a callback", route=route, error=str(error))
        return json_error(
            503,
            "journal_unavailable",
            "meterd can reach neither its database nor its webhook journal; retry",
            headers={"Retry-After": "5"},
        )
    return web.Response(status=204)


async def conference(request: web.Request, form: MultiDict[str]) -> web.Response:
    return await _take_callback(request, "conference", form)


async def call_status(request: web.Request, form: MultiDict[str]) -> web.Response:
    return await _take_callback(request, "call-status", form)


async def fallback(request: web.Request, form: MultiDict[str]) -> web.Response:
    log.error(
        "twilio used the fallback URL: the voice webhook failed",
        error_code=form.get("ErrorCode"),
        error_url=form.get("ErrorUrl"),
        call_sid=form.get("CallSid"),
    )
    return web.Response(text=twiml.apology(), content_type=TWIML)


async def announcement(request: web.Request, form: MultiDict[str]) -> web.Response:
    """What the conference hears when funds run low or out (fetched by Twilio: AnnounceUrl)."""
    message = request.query.get("message", "")
    if message not in twiml.ANNOUNCEMENTS:
        return json_error(400, "invalid_request", "unknown announcement")
    return web.Response(text=twiml.announcement(message), content_type=TWIML)


def subapp() -> web.Application:
    """Twilio's sub-application, mounted at PREFIX by meterd/web/app.py (paths below are
    relative to it), behind the signature check."""
    app = web.Application(middlewares=[twilio_signature])
    app.router.add_post("/voice", _twilio_route("voice", _apologising(voice)))
    app.router.add_post("/callback", _twilio_route("callback", _apologising(callback)))
    app.router.add_post("/pin", _twilio_route("pin", _apologising(pin)))
    app.router.add_post("/pay", _twilio_route("pay", _apologising(pay)))
    app.router.add_post("/pay-status", _twilio_route("pay-status", pay_status))
    app.router.add_post("/conference", _twilio_route("conference", conference))
    app.router.add_post("/call-status", _twilio_route("call-status", call_status))
    app.router.add_post("/fallback", _twilio_route("fallback", fallback))
    app.router.add_post("/announcement", _twilio_route("announcement", announcement))
    return app
