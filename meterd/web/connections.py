"""Bounded connections: how many clients meterd holds at once, and how long a slow one may take.

aiohttp already closes a connection that has no request under way after its keep-alive timeout
(`http_idle_timeout_seconds`; it arms that timer when the connection opens, so a client that
connects and sends nothing, or trickles its headers, is closed too) and refuses over-long or
too many header lines (400). What it does not bound is the number of connections, and a body
sent a byte a second. `ConnectionLimits` adds both:

- at most `http_connections_max` connections: when one more arrives, the oldest connection that
  has been silent for a second (connected and sent nothing, or idle keep-alive), else the oldest
  that has sent only part of a request for a second (a slow or trickling client), is closed to
  make room (`meterd/web/arrivals.py`), so a flood of idle or slow clients can never lock out a
  real one (Twilio, a health probe) for longer than that. A connection whose whole request has
  arrived is never closed to make room: under overload that is a real request waiting its turn
  (closing the oldest of those would close each just before its turn and answer none). If no
  connection can be closed, the new one is answered 503 with Retry-After as soon as its request
  line arrives, its request unread, and closed; a health probe or metrics scrape (`GET /healthz`,
  `GET /metrics`) is let in over the limit instead, a few at once, so monitoring sees meterd
  answer while it sheds load;
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
from meterd.web.arrivals import Arrivals

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


class _Listening(asyncio.Protocol):
    """Stands in front of aiohttp's protocol for one connection: tells `arrivals` what the
    client sent, and passes every call on unchanged."""

    def __init__(self, handler: RequestHandler, arrivals: Arrivals) -> None:
        self._handler = handler
        self._arrivals = arrivals

    def data_received(self, data: bytes) -> None:
        self._arrivals.heard(self._handler, data)
        self._handler.data_received(data)

    def eof_received(self) -> None:  # aiohttp's returns nothing: the transport closes
        self._handler.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._handler.connection_lost(exc)

    def pause_writing(self) -> None:
        self._handler.pause_writing()

    def resume_writing(self) -> None:
        self._handler.resume_writing()


# What a connection past the limit hears, whatever it asked.
_REFUSED_BODY = (
    b'{"error": "overloaded", "detail": "meterd has as many connections as it takes; retry"}'
)
REFUSED_RESPONSE = (
    b"HTTP/1.1 503 Service Unavailable\r\n"
    b"Content-Type: application/json; charset=utf-8\r\n"
    b"Retry-After: 1\r\n"
    b"Connection: close\r\n"
    b"Content-Length: " + str(len(_REFUSED_BODY)).encode() + b"\r\n\r\n" + _REFUSED_BODY
)
REFUSED_LINGER_SECONDS = 2.0  # reads and drops what the client still sends, then closes


# Past the limit, these requests are still let in, this many at once: the operators' health
# probe and metrics scrape see meterd answer while it sheds load.
PROBE_REQUEST_LINES = (b"GET /healthz ", b"GET /healthz?", b"GET /metrics ", b"GET /metrics?")
PROBES_OVER_LIMIT = 8
_REQUEST_LINE_BYTES_MAX = 64  # enough to tell a probe's request line


class _Refusing(asyncio.Protocol):
    """A connection past the limit. Its request line decides: a probe (`PROBE_REQUEST_LINES`)
    may be let in (`admit` hands the connection back to aiohttp); anything else is answered 503
    with Retry-After, its request unread, and what it still sends is read and dropped (closing
    at once would reset the connection and could lose the answer) until it closes, as
    `Connection: close` asks, or REFUSED_LINGER_SECONDS pass."""

    def __init__(
        self,
        handler: RequestHandler,
        transport: asyncio.Transport,
        admit: Callable[[RequestHandler, bytes], bool],
        refused: Callable[[], None],
    ) -> None:
        self._handler = handler
        self._transport = transport
        self._admit = admit
        self._refused = refused
        self._head: bytes | None = b""  # None once decided
        self._timer = asyncio.get_running_loop().call_later(REFUSED_LINGER_SECONDS, self._give_up)

    def data_received(self, data: bytes) -> None:
        if self._head is None:
            return  # refused: not read
        head = self._head + data
        if b"\n" not in head and len(head) < _REQUEST_LINE_BYTES_MAX:
            self._head = head
            return
        self._head = None
        if head.startswith(PROBE_REQUEST_LINES) and self._admit(self._handler, head):
            self._timer.cancel()
            return
        self._transport.write(REFUSED_RESPONSE)
        self._refused()

    def _give_up(self) -> None:
        if self._head is not None:  # not even a request line: closed without an answer
            self._head = None
            self._refused()
        self._transport.abort()

    def eof_received(self) -> None:
        return None  # the transport closes

    def connection_lost(self, exc: Exception | None) -> None:
        self._timer.cancel()
        self._handler.connection_lost(exc)


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
        self._arrivals = Arrivals()  # what each connection has sent of its request
        self._probes: set[RequestHandler] = set()  # let in over the limit (`_admit_probe`)
        self._closing: set[RequestHandler] = set()  # closed by us, connection_lost not yet seen
        self._log = _EveryMinute()
        self.open_gauge = Gauge(
            "meterd_http_connections", "client connections open now", registry=registry
        )
        self.closed = Counter(
            "meterd_http_connections_closed",
            "connections meterd closed to stay within its limits, by reason "
            "(evicted: the oldest silent or idle one, to make room; refused: every one had a "
            "request on its way or under way; "
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
        self._arrivals.silent(handler)
        transport.set_protocol(_Listening(handler, self._arrivals))
        self._arm_idle_timer(handler)
        if len(self._open) - len(self._closing) > self.connections_max:
            victim = self._arrivals.victim(
                self._open,
                spared=lambda c: c is handler or c in self._busy or c in self._closing,
            )
            if victim is not None:
                self._close(victim, "evicted")
            else:
                self._refuse(handler, transport)
        self.open_gauge.set(len(self._open))

    def _refuse(self, handler: RequestHandler, transport: asyncio.Transport) -> None:
        """Every connection has a request on its way or under way: the new one is answered
        503 with Retry-After, its request unread (the cheapest answer there is; Twilio
        retries), and closed; unless it is a probe let in over the limit (`_Refusing`)."""
        self._closing.add(handler)

        def refused() -> None:
            self.closed.labels("refused").inc()
            self._log.warning(
                "connection refused: 503",
                kind="refused",
                open=len(self._open),
                connections_max=self.connections_max,
            )

        transport.set_protocol(_Refusing(handler, transport, self._admit_probe, refused))

    def _admit_probe(self, handler: RequestHandler, head: bytes) -> bool:
        """Let a probe in over the limit, PROBES_OVER_LIMIT at once: back to aiohttp, with what
        it has sent so far."""
        if len(self._probes) >= PROBES_OVER_LIMIT or handler not in self._open:
            return False
        self._probes.add(handler)
        self._closing.discard(handler)
        listening = _Listening(handler, self._arrivals)
        self._open[handler].set_protocol(listening)
        listening.data_received(head)
        return True

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
        self._arrivals.gone(handler)
        self._probes.discard(handler)
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
                self._arrivals.silent(protocol)  # answered: idle keep-alive
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
