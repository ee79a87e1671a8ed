"""Bounded connections: how many clients meterd holds at once, and how long a slow one may take.

aiohttp already closes a connection that has no request under way after its keep-alive timeout
(`http_idle_timeout_seconds`; it arms that timer when the connection opens, so a client that
connects and sends nothing, or trickles its headers, is closed too) and refuses over-long or
too many header lines (400). What it does not bound is the number of connections, and a body
sent a byte a second. `ConnectionLimits` adds both:

- at most `http_connections_max` connections: when one more arrives, the oldest connection whose
  request is not being handled (idle, or still sending its request) is closed to make room, so a
  flood of idle or slow clients can never lock out a real one (Twilio, a health probe); only if
  every connection is busy in a handler is the new one refused;
- a request's body must arrive within `http_request_read_timeout_seconds` of its headers, else
  408 and the connection closes.

The web app owns one `ConnectionLimits` (its middleware marks which connections are busy); the
daemon installs it on the server's connection bookkeeping with `install(runner.server)`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from aiohttp import web
from aiohttp.web_protocol import RequestHandler, RequestPayloadError
from prometheus_client import CollectorRegistry, Counter, Gauge

from meterd.logs import get_logger

log = get_logger("meterd.connections")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

BODY_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
CLOSED_LOG_INTERVAL_SECONDS = 60.0


class _EveryMinute:
    """One warning per kind per `CLOSED_LOG_INTERVAL_SECONDS`, carrying how many it stands for:
    a flood of connections must not become a flood of log lines."""

    def __init__(self) -> None:
        self._last_logged: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def warning(self, event: str, *, kind: str, **fields: object) -> None:
        now = time.monotonic()
        last = self._last_logged.get(kind)
        if last is not None and now - last < CLOSED_LOG_INTERVAL_SECONDS:
            self._suppressed[kind] = self._suppressed.get(kind, 0) + 1
            return
        self._last_logged[kind] = now
        log.warning(event, suppressed=self._suppressed.pop(kind, 0), **fields)


class ConnectionLimits:
    def __init__(
        self,
        *,
        connections_max: int,
        idle_timeout_seconds: float,
        request_read_timeout_seconds: float,
        headers_max: int,
        registry: CollectorRegistry,
    ) -> None:
        assert connections_max >= 1 and request_read_timeout_seconds > 0
        assert idle_timeout_seconds > 0 and headers_max >= 1
        self.connections_max = connections_max
        self.idle_timeout_seconds = idle_timeout_seconds
        self.request_read_timeout_seconds = request_read_timeout_seconds
        self.headers_max = headers_max
        self._idle_timers: dict[RequestHandler, asyncio.TimerHandle] = {}
        # open connections, oldest first (dicts keep insertion order), with their transports
        self._open: dict[RequestHandler, asyncio.Transport] = {}
        self._busy: set[RequestHandler] = set()  # a handler is running for its request
        self._closing: set[RequestHandler] = set()  # closed by us, connection_lost not yet seen
        self._log = _EveryMinute()
        self.open_gauge = Gauge(
            "meterd_http_connections", "client connections open now", registry=registry
        )
        self.closed = Counter(
            "meterd_http_connections_closed",
            "connections meterd closed to stay within its limits, by reason "
            "(evicted: the oldest idle or slow one, to make room; refused: every one was busy; "
            "idle: no request within the idle timeout; "
            "slow_body: a body not sent within the read timeout)",
            ["reason"],
            registry=registry,
        )

    @property
    def open_count(self) -> int:
        return len(self._open)

    def install(self, server: web.Server) -> None:
        """Wrap `server`'s connection bookkeeping (every RequestHandler reports its connection
        to the server as it is made and lost) so each new connection is counted here first."""
        made, lost = server.connection_made, server.connection_lost

        def connection_made(handler: RequestHandler, transport: asyncio.Transport) -> None:
            made(handler, transport)
            self._connection_made(handler, transport)

        def connection_lost(handler: RequestHandler, exc: BaseException | None = None) -> None:
            self._connection_lost(handler)
            lost(handler, exc)

        server.connection_made = connection_made  # type: ignore[method-assign]
        server.connection_lost = connection_lost  # type: ignore[method-assign]

    def _connection_made(self, handler: RequestHandler, transport: asyncio.Transport) -> None:
        self._open[handler] = transport
        self._arm_idle_timer(handler)
        if len(self._open) - len(self._closing) > self.connections_max:
            victim = next(
                (
                    candidate
                    for candidate in self._open
                    if candidate is not handler
                    and candidate not in self._busy
                    and candidate not in self._closing
                ),
                None,
            )
            if victim is not None:
                self._close(victim, "evicted")
            else:
                self._close(handler, "refused")
        self.open_gauge.set(len(self._open))

    def _close(self, handler: RequestHandler, reason: str) -> None:
        self._closing.add(handler)
        self._open[handler].abort()  # connection_lost follows on the next loop iteration
        self.closed.labels(reason).inc()
        self._log.warning(
            f"connection closed: {reason}",
            kind=reason,
            open=len(self._open),
            connections_max=self.connections_max,
        )

    def _arm_idle_timer(self, handler: RequestHandler) -> None:
        """Close the connection if no request has arrived (its headers complete) within the
        idle timeout: a client that sends nothing, or its headers a byte at a time, or stays
        idle on keep-alive. aiohttp's keep-alive timer does not cover all of these in every
        release meterd supports, so meterd keeps its own."""
        self._disarm_idle_timer(handler)
        self._idle_timers[handler] = asyncio.get_running_loop().call_later(
            self.idle_timeout_seconds, self._idle_timeout, handler
        )

    def _disarm_idle_timer(self, handler: RequestHandler) -> None:
        timer = self._idle_timers.pop(handler, None)
        if timer is not None:
            timer.cancel()

    def _idle_timeout(self, handler: RequestHandler) -> None:
        self._idle_timers.pop(handler, None)
        transport = self._open.get(handler)
        if transport is None or handler in self._busy or handler in self._closing:
            return
        if transport.get_write_buffer_size():  # still sending an answer to a slow reader
            self._arm_idle_timer(handler)
            return
        self._close(handler, "idle")

    def _connection_lost(self, handler: RequestHandler) -> None:
        self._disarm_idle_timer(handler)
        self._open.pop(handler, None)
        self._busy.discard(handler)
        self._closing.discard(handler)
        self.open_gauge.set(len(self._open))

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Read the body within the read timeout, then mark the connection busy while the
        handler runs (a busy connection is never evicted); idle again after it."""
        protocol = request.protocol
        self._disarm_idle_timer(protocol)  # a request arrived: the read timeout takes over
        try:
            return await self._handle(request, handler)
        finally:
            if protocol in self._open:
                self._arm_idle_timer(protocol)

    async def _handle(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if len(request.raw_headers) > self.headers_max:
            response = web.json_response(
                {
                    "error": "bad_request",
                    "detail": f"more than {self.headers_max} header lines",
                },
                status=400,
            )
            response.force_close()
            return response
        if request.method in BODY_METHODS and request.body_exists:
            started = time.monotonic()
            try:
                async with asyncio.timeout(self.request_read_timeout_seconds):
                    await request.read()  # cached: the handler's read() and post() reuse it
            except RequestPayloadError as error:  # e.g. not the gzip its Content-Encoding says
                response = web.json_response(
                    {"error": "bad_body", "detail": f"the body cannot be read: {error}"[:200]},
                    status=400,
                )
                response.force_close()
                return response
            except TimeoutError:
                self.closed.labels("slow_body").inc()
                self._log.warning(
                    "connection closed: slow_body",
                    kind="slow_body",
                    path=request.path,
                    waited_seconds=round(time.monotonic() - started, 1),
                )
                response = web.json_response(
                    {
                        "error": "request_timeout",
                        "detail": f"the body did not arrive within "
                        f"{self.request_read_timeout_seconds:g} s",
                    },
                    status=408,
                )
                response.force_close()
                return response
        protocol = request.protocol
        self._busy.add(protocol)
        try:
            return await handler(request)
        finally:
            self._busy.discard(protocol)


CONNECTION_LIMITS = web.AppKey("connection_limits", ConnectionLimits)
