"""Bounded connections (issue 12, finding 4): idle and slow clients cannot hold meterd's
connections or memory, and a real client (a health probe) always gets in.

The server is built as the daemon builds it (`server_limits` and `ConnectionLimits.install` on a
real listening socket); the clients are raw sockets, so nothing is hidden by a client library."""

from __future__ import annotations

import asyncio
import contextlib
import time

import aiohttp
import pytest
from aiohttp import web

from meterd.config import load_settings
from meterd.daemon import server_limits
from meterd.store.database import open_database
from meterd.web.app import create_app
from meterd.web.arrivals import GRACE_SECONDS_BEFORE_EVICTION, _bytes_waiting
from meterd.web.connections import CONNECTION_LIMITS, REFUSED_LINGER_SECONDS
from tests.e2e.daemon import free_port

from .helpers import fixed_clock

CLOSED_WITHIN_SECONDS = 10.0  # a bound on "closed", generous for a loaded machine


@contextlib.asynccontextmanager
async def serving(tmp_path, **limits: str):
    port = free_port()
    settings = load_settings(
        None,
        {
            "METERD_STATE_DIR": str(tmp_path),
            "METERD_LISTEN": f"127.0.0.1:{port}",
            "METERD_ADMIN_TOKEN": "admin-token-0123456789abcdef",
            "METERD_PIN_SECRET": "pin-secret-0123456789abcdef",
            **{f"METERD_{name.upper()}": value for name, value in limits.items()},
        },
    )
    database = await open_database(f"sqlite+aiosqlite:///{tmp_path / 'meterd.sqlite3'}")
    app = create_app(settings, database, clock=fixed_clock)
    runner = web.AppRunner(app, **server_limits(settings))
    await runner.setup()
    assert runner.server is not None
    app[CONNECTION_LIMITS].install(runner.server)
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    try:
        yield port, app[CONNECTION_LIMITS]
    finally:
        await runner.cleanup()
        await database.close()


async def _closed(reader: asyncio.StreamReader, within_seconds: float) -> bytes | None:
    """What the server sent before closing, or None if the connection is still open."""
    received = b""
    try:
        async with asyncio.timeout(within_seconds):
            while chunk := await reader.read(65536):
                received += chunk
    except TimeoutError:
        return None
    except ConnectionResetError:
        pass
    return received


async def _hang_up(*writers: asyncio.StreamWriter) -> None:
    for writer in writers:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def _healthz(port: int) -> int:
    async with (
        aiohttp.ClientSession() as session,
        session.get(
            f"http://127.0.0.1:{port}/healthz", timeout=aiohttp.ClientTimeout(total=5)
        ) as response,
    ):
        return response.status


async def test_idle_connections_past_the_limit_are_closed_and_a_new_client_gets_in(tmp_path):
    """60 clients connect and say nothing: past the 20th, each is refused (the 20 before it
    have not been silent long enough to be closed for it; with no request line to answer, it is
    closed after REFUSED_LINGER_SECONDS); once they have, a real client closes the oldest silent
    one to get in."""
    async with serving(tmp_path, http_connections_max="20") as (port, limits):
        idle = [await asyncio.open_connection("127.0.0.1", port) for _ in range(60)]
        await asyncio.sleep(max(GRACE_SECONDS_BEFORE_EVICTION, REFUSED_LINGER_SECONDS) + 0.5)
        assert limits.open_count <= 20
        assert await _healthz(port) == 200  # evicts the oldest silent one to get in
        outcomes = await asyncio.gather(*(_closed(reader, 0.5) for reader, _ in idle))
        still_open = [outcome for outcome in outcomes if outcome is None]
        closed = [outcome for outcome in outcomes if outcome == b""]
        assert len(still_open) <= 19 and len(still_open) + len(closed) == 60
        assert limits.closed.labels("evicted")._value.get() >= 1
        assert limits.closed.labels("refused")._value.get() == 40
        await _hang_up(*(writer for _, writer in idle))


async def test_a_request_waiting_its_turn_is_never_closed_to_make_room_the_newcomer_gets_503(
    tmp_path,
):
    """Under overload every connection holds a whole request meterd has not reached yet (here
    the loop is blocked past the grace period, as a busy loop is): closing the oldest to make
    room would close each request just before its turn. The newcomer is answered 503 with
    Retry-After instead, unread, and every waiting request is answered."""
    async with serving(tmp_path, http_connections_max="20") as (port, limits):
        waiting = [await asyncio.open_connection("127.0.0.1", port) for _ in range(20)]
        for _, writer in waiting:
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        time.sleep(GRACE_SECONDS_BEFORE_EVICTION + 0.3)  # noqa: ASYNC251 - a loop too busy to read
        newcomer_reader, newcomer = await asyncio.open_connection("127.0.0.1", port)
        newcomer.write(
            b"POST /twilio/conference HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nCallSid=CA"
        )
        answer = await _closed(newcomer_reader, CLOSED_WITHIN_SECONDS)
        assert answer is not None and answer.startswith(b"HTTP/1.1 503 ")
        assert b"\r\nRetry-After: 1\r\n" in answer
        assert b'{"error": "overloaded"' in answer  # a JSON error, as every refusal
        # a health probe is let in over the limit, and answered
        assert await _healthz(port) == 200
        outcomes = await asyncio.gather(
            *(_closed(reader, CLOSED_WITHIN_SECONDS) for reader, _ in waiting)
        )
        assert all(o is not None and o.startswith(b"HTTP/1.1 200 ") for o in outcomes), outcomes
        assert limits.closed.labels("refused")._value.get() == 1
        assert limits.closed.labels("evicted")._value.get() == 0
        await _hang_up(newcomer, *(writer for _, writer in waiting))


async def test_clients_sending_part_of_a_request_are_closed_to_let_a_real_one_in(tmp_path):
    """Slow clients (headers, or a body short of its Content-Length) hold no slot past the
    grace period once a real client needs one."""
    async with serving(tmp_path, http_connections_max="20") as (port, limits):
        slow = [await asyncio.open_connection("127.0.0.1", port) for _ in range(20)]
        for n, (_, writer) in enumerate(slow):
            writer.write(
                b"POST /twilio/conference HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n"
                + (b"\r\nCallSid" if n % 2 else b"X-Slow: a")
            )
        await asyncio.sleep(GRACE_SECONDS_BEFORE_EVICTION + 0.3)
        assert await _healthz(port) == 200  # closes the oldest slow one to get in
        assert limits.closed.labels("evicted")._value.get() >= 1
        assert limits.closed.labels("refused")._value.get() == 0
        await _hang_up(*(writer for _, writer in slow))


async def test_a_connection_that_sends_nothing_or_trickles_its_headers_is_closed(tmp_path):
    async with serving(tmp_path, http_idle_timeout_seconds="1") as (port, _):
        silent_reader, silent = await asyncio.open_connection("127.0.0.1", port)
        trickle_reader, trickle = await asyncio.open_connection("127.0.0.1", port)

        async def trickle_headers() -> None:
            for byte in b"POST /twilio/conference HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100:
                trickle.write(bytes([byte]))
                await asyncio.sleep(0.1)

        sender = asyncio.create_task(trickle_headers())
        assert await _closed(silent_reader, CLOSED_WITHIN_SECONDS) == b""
        assert await _closed(trickle_reader, CLOSED_WITHIN_SECONDS) == b""
        sender.cancel()
        with contextlib.suppress(asyncio.CancelledError, ConnectionError):
            await sender
        await _hang_up(silent, trickle)


async def test_a_body_sent_too_slowly_gets_408_and_the_connection_closes(tmp_path):
    async with serving(tmp_path, http_request_read_timeout_seconds="1") as (port, limits):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            b"POST /twilio/conference HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 1000\r\n\r\n"
            b"CallSid=CA"
        )
        await writer.drain()
        answer = await _closed(reader, CLOSED_WITHIN_SECONDS)
        assert answer is not None and answer.startswith(b"HTTP/1.1 408 ")
        assert b'"error": "request_timeout"' in answer
        assert limits.closed.labels("slow_body")._value.get() == 1
        await _hang_up(writer)


@pytest.mark.parametrize(
    "headers",
    [
        b"".join(b"X-Flood-%d: x\r\n" % n for n in range(40)),  # more than http_headers_max
        b"X-Long: " + b"a" * 9000 + b"\r\n",  # longer than http_header_line_bytes_max
    ],
    ids=["too-many-headers", "header-too-long"],
)
async def test_too_many_or_too_long_headers_get_400(tmp_path, headers):
    async with serving(tmp_path) as (port, _):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n")
        await writer.drain()
        answer = await _closed(reader, CLOSED_WITHIN_SECONDS)
        assert answer is not None and answer.split(b"\r\n")[0].endswith(b" 400 Bad Request")
        await _hang_up(writer)
        assert await _healthz(port) == 200


async def test_bytes_the_loop_has_not_read_yet_count_as_a_request_on_its_way():
    """A loop busy for longer than GRACE_SECONDS_BEFORE_EVICTION has not read what a waiting
    connection sent: the kernel's count of unread bytes (FIONREAD) keeps it from being closed."""
    accepted: asyncio.Future[asyncio.Transport] = asyncio.get_running_loop().create_future()

    class NotReading(asyncio.Protocol):
        def connection_made(self, transport):
            transport.pause_reading()  # as a loop that has not got to this connection yet
            accepted.set_result(transport)

    server = await asyncio.get_running_loop().create_server(NotReading, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    transport = await asyncio.wait_for(accepted, 5)
    assert not _bytes_waiting(transport)
    writer.write(b"POST /twilio/conference HTTP/1.1\r\n")
    await writer.drain()
    for _ in range(100):
        if _bytes_waiting(transport):
            break
        await asyncio.sleep(0.01)
    assert _bytes_waiting(transport)
    transport.close()
    await _hang_up(writer)
    server.close()
    await server.wait_closed()
