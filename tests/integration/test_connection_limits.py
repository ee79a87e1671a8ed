"""Bounded connections (issue 12, finding 4): idle and slow clients cannot hold meterd's
connections or memory, and a real client (a health probe) always gets in.

The server is built as the daemon builds it (`server_limits` and `ConnectionLimits.install` on a
real listening socket); the clients are raw sockets, so nothing is hidden by a client library."""

from __future__ import annotations

import asyncio
import contextlib

import aiohttp
import pytest
from aiohttp import web

from meterd.config import load_settings
from meterd.daemon import server_limits
from meterd.store.database import open_database
from meterd.web.app import create_app
from meterd.web.connections import CONNECTION_LIMITS
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
    async with serving(tmp_path, http_connections_max="20") as (port, limits):
        idle = [await asyncio.open_connection("127.0.0.1", port) for _ in range(60)]
        await asyncio.sleep(0.2)
        assert limits.open_count <= 20
        assert await _healthz(port) == 200  # evicts the oldest idle one to get in
        outcomes = await asyncio.gather(*(_closed(reader, 0.5) for reader, _ in idle))
        still_open = [outcome for outcome in outcomes if outcome is None]
        assert len(still_open) <= 20
        assert [outcome for outcome in outcomes if outcome is not None] == [b""] * (
            60 - len(still_open)
        )
        assert limits.closed.labels("evicted")._value.get() >= 41
        await _hang_up(*(writer for _, writer in idle))


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
