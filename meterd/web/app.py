"""The aiohttp application: a root application with the middlewares every request goes through
(metrics, errors, input checks, connection limits) and the open operations routes, and one
sub-application per caller, mounted under its prefix with its own authentication middleware:

    /twilio   meterd/web/twilio.py    Twilio's signature
    /admin    meterd/web/admin.py     the admin token
    /agents   meterd/web/agents.py    the agents token
    /finance  meterd/web/finance.py   the finance token
    /healthz, /metrics  meterd/web/ops.py  open (on the root application: no prefix)

A request under a prefix passes the root's middlewares, then its sub-application's; one under
no prefix (a 404, or an operations route) only the root's, of which `unrouted_paths` keeps a
token check for the odd path that reads as under a prefix only once decoded (meterd/web/auth.py).

The services come from meterd.bootstrap: `create_app` builds them on a database it is given
(tests, tools); the daemon builds the app with `build_app` and gives it its services with
`install_services` as it starts (meterd/daemon.py). Nothing happens at import time."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import structlog
from aiohttp import web

from meterd import bootstrap
from meterd.adapters.stripe_gateway import PaymentGateway
from meterd.bootstrap import Services
from meterd.clock import Clock
from meterd.config import Settings
from meterd.core.ledger import LedgerError
from meterd.logs import get_logger
from meterd.metrics import Metrics, metrics_middleware
from meterd.services.errors import Conflict, InvalidRequest, InvariantBroken, NotFound, ServiceError
from meterd.services.outbox import TwilioCalls
from meterd.store.database import Database
from meterd.store.ledger_store import IdempotencyConflict
from meterd.store.outage import is_unavailable
from meterd.web import admin, agents, desk, finance, ops, twilio
from meterd.web.auth import unrouted_paths
from meterd.web.connections import ConnectionLimits
from meterd.web.health import Health
from meterd.web.json_io import NUL, NUL_REFUSED, json_error
from meterd.web.keys import CONNECTION_LIMITS, HEALTH, METRICS, SERVICES

__all__ = [  # what tests and tools import from here
    "SERVICES",
    "build_app",
    "create_app",
    "install_services",
    "json_error",
]

log = get_logger("meterd.web")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

CLIENT_CLOSED_REQUEST = 499
"""The status recorded (access log, `meterd_webhooks_total`) for a request whose client hung up
before sending all of it; nginx's convention. Nobody receives the response."""

_STATUS_FOR_ERROR: dict[type[ServiceError], int] = {
    InvalidRequest: 400,
    NotFound: 404,
    Conflict: 409,
}


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every failure becomes a JSON error: 4xx for bad input, 500 only for a real fault (logged
    with its cause), 503 while the database is unavailable (one rate-limited line, no
    traceback). A broken money invariant is logged and stops the daemon."""
    structlog.contextvars.clear_contextvars()
    try:
        return await handler(request)
    except ServiceError as error:
        status = next((s for t, s in _STATUS_FOR_ERROR.items() if isinstance(error, t)), 400)
        return json_error(status, error.code, error.detail)
    except web.HTTPRequestEntityTooLarge:
        return json_error(
            413,
            "body_too_large",
            f"the request body is larger than "
            f"{request.config_dict[SERVICES].settings.request_body_bytes_max} bytes",
        )
    except web.HTTPException as error:
        if (
            error.status < 400
            or error.content_type != "text/plain"
            or request.path.startswith("/twilio/")
        ):
            raise
        return _json_http_error(error)
    except IdempotencyConflict as error:
        # A request reused a key with other content (a client's mistake, or two clients racing
        # on one reference): the ledger refused it and holds the first; nothing is broken.
        log.warning("idempotency conflict", path=request.path, error=str(error))
        return json_error(
            409,
            "idempotency_conflict",
            "this request's idempotency key was used before with different content",
        )
    except (InvariantBroken, LedgerError) as error:  # a ledger error no service expected
        log.critical("money invariant broken", error=str(error), path=request.path, exc_info=True)
        request.config_dict[SERVICES].on_invariant_broken(InvariantBroken(str(error)))
        return json_error(
            500,
            "invariant_broken",
            "a money invariant does not hold; meterd is stopping so it can be investigated",
        )
    except Exception as error:
        return _unexpected(request, error)


def _json_http_error(error: web.HTTPException) -> web.Response:
    """aiohttp's plain-text 4xx or 5xx (404, 405, ...) as meterd's JSON error, its headers
    (Allow, ...) kept."""
    return json_error(
        error.status,
        error.reason.lower().replace(" ", "_"),
        error.text or error.reason,
        headers={
            k: v
            for k, v in error.headers.items()
            if k.lower() not in ("content-type", "content-length")
        },
    )


def _unexpected(request: web.Request, error: Exception) -> web.Response:
    """An exception no handler expected (called while it is being handled, so a logged
    traceback is its own): the client gone, the database unavailable, else a real fault."""
    if _client_went_away(request, error):
        # The client's fault, not meterd's: one quiet line, no traceback, no 5xx counted.
        log.debug(
            "client closed the connection before sending the whole request",
            path=request.path,
            method=request.method,
            content_length=request.content_length,
        )
        return json_error(
            CLIENT_CLOSED_REQUEST, "client_closed_request", "the request body was cut short"
        )
    if is_unavailable(error):
        # An outage, not a bug: one line without a traceback, rate-limited per route.
        request.config_dict[SERVICES].database.outage.failure(
            f"request:{_route(request)}", error, method=request.method
        )
        return json_error(
            503,
            "database_unavailable",
            "meterd cannot reach its database right now; try again shortly",
            headers={"Retry-After": "1"},
        )
    log.exception("request failed", path=request.path, method=request.method)
    return json_error(
        500, "internal_error", "meterd failed to handle this request; the cause is in its log"
    )


def _route(request: web.Request) -> str:
    """The route's pattern (`/admin/calls/{call_sid}`), not the path: one kind per route."""
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else request.path


def _client_went_away(request: web.Request, error: Exception) -> bool:
    """True if `error` is aiohttp telling a handler that the client closed the connection while
    the handler was reading the request (the body stream raises ConnectionResetError, or its
    subclass aiohttp.ClientConnectionResetError, once the connection is lost)."""
    if not isinstance(error, ConnectionResetError):
        return False
    transport = request.transport
    return transport is None or transport.is_closing()


CONDITIONAL_HEADERS = ("If-Modified-Since", "If-Unmodified-Since", "If-Range")


@web.middleware
async def input_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Refuse (400) what no route can use and would fail deep inside: a NUL character in the
    path or the query (PostgreSQL's text cannot hold one), and a conditional header with a date
    aiohttp cannot parse (it would fail while sending a file, after every middleware)."""
    if NUL in request.path or any(NUL in k + v for k, v in request.query.items()):
        return json_error(400, "invalid_request", NUL_REFUSED)
    for header in CONDITIONAL_HEADERS:
        if header in request.headers:
            try:
                _ = request.if_modified_since, request.if_unmodified_since, request.if_range
            except (ValueError, OverflowError):
                return json_error(400, "invalid_request", f"{header} is not a date meterd can read")
    return await handler(request)


CALLERS = (twilio, admin, agents, finance, desk)
"""The callers with a prefix: each module has PREFIX and `subapp()` (routes and authentication)."""
BEARER_CALLERS = (admin, agents, finance)
"""Those authenticated by a bearer token: `authenticate`, their sub-application's middleware."""


def build_app(settings: Settings, metrics: Metrics) -> web.Application:
    """The root application with every route, and no services yet: `install_services` gives
    it them before it serves a request. `metrics` is the registry its middleware (and
    `/metrics`) use."""
    limits = ConnectionLimits(
        connections_max=settings.http_connections_max,
        idle_timeout_seconds=settings.http_idle_timeout_seconds,
        request_read_timeout_seconds=settings.http_request_read_timeout_seconds,
        headers_max=settings.http_headers_max,
        registry=metrics.registry,
    )
    app = web.Application(
        client_max_size=settings.request_body_bytes_max,
        middlewares=[
            metrics_middleware,
            error_middleware,
            input_middleware,
            limits.middleware,
            unrouted_paths({caller.PREFIX + "/": caller.authenticate for caller in BEARER_CALLERS}),
        ],
    )
    app[METRICS] = metrics
    app[CONNECTION_LIMITS] = limits
    ops.add_routes(app)
    app.router.add_get(desk.PREFIX, desk.root)
    for caller in CALLERS:
        app.add_subapp(caller.PREFIX, caller.subapp())
    return app


def install_services(app: web.Application, services: Services) -> Health:
    """Give the app built by `build_app` its services, and the health check on them (which the
    owner of `services.database` closes before the database: `Health.close`)."""
    app[SERVICES] = services
    health = Health(services.database, app[METRICS], intake=services.intake)
    app[HEALTH] = health
    return health


def create_app(
    settings: Settings,
    database: Database,
    *,
    clock: Clock,
    on_invariant_broken: Callable[[InvariantBroken], None] | None = None,
    twilio_rest: TwilioCalls | None = None,
    gateway: PaymentGateway | None = None,
    metrics: Metrics | None = None,
) -> web.Application:
    """The app with every service built by meterd.bootstrap on `database`, which the caller
    opens and closes (as it does any adapter it passes). A broken money invariant is raised
    unless `on_invariant_broken` is given; `metrics` defaults to a registry of the app's own."""
    metrics = metrics or Metrics()
    app = build_app(settings, metrics)
    services = bootstrap.build_services(
        settings,
        database,
        clock=clock,
        metrics=metrics,
        twilio_rest=twilio_rest,
        gateway=gateway,
        on_invariant_broken=on_invariant_broken,
    )
    # aiohttp 3.12.0 annotates its signals for aiosignal < 1.4, which 1.4 no longer matches
    # (later aiohttp does: hence unused-ignore)
    cleanup = install_services(app, services).close
    app.on_cleanup.append(cleanup)  # type: ignore[arg-type,unused-ignore]
    return app
