"""The real `meterd run` process (issue 12, findings 5, 7 and 8): its files are private and a
loose secrets directory is tightened with a warning; every log line is one JSON object, a request
aiohttp cannot parse included; while PostgreSQL refuses connections `/healthz` tells nothing of
the driver's text, each affected job and route logs one line without a traceback per interval,
and the recovery is one "database healthy again" line."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import stat
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

from tests.conftest import POSTGRES_URL

from .daemon import Daemon, free_port, run_cli

OUTAGE_SECONDS = 3.0
WAIT_SECONDS = 30


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def log_lines(daemon: Daemon) -> list[dict]:
    """Every line of the daemon's stdout and stderr, each one JSON object (or the test fails)."""
    lines = []
    for number, line in enumerate(daemon.log().splitlines(), 1):
        try:
            lines.append(json.loads(line))
        except ValueError:
            raise AssertionError(f"line {number} is not JSON: {line!r}") from None
    return lines


def send_raw(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as connection:
        connection.sendall(request)
        return connection.recv(100)


@contextlib.contextmanager
def loose_umask() -> Iterator[None]:
    previous = os.umask(0o022)  # the daemon is started under it, and must not depend on it
    try:
        yield
    finally:
        os.umask(previous)


def test_private_files_and_one_json_object_per_line(tmp_path):
    secrets = tmp_path / "var" / "secrets"
    secrets.mkdir(parents=True)
    secrets.chmod(0o755)
    (secrets / "pin_secret").write_text("a-pin-secret-made-by-hand-0123456789\n")
    (secrets / "pin_secret").chmod(0o644)
    with loose_umask():
        daemon = Daemon(tmp_path).start()
    try:
        database = tmp_path / "var" / "meterd.sqlite3"
        files = {p.name: mode(p) for p in database.parent.glob("meterd.sqlite3*")}
        assert files == {
            "meterd.sqlite3": 0o600,
            "meterd.sqlite3-wal": 0o600,
            "meterd.sqlite3-shm": 0o600,
        }
        assert mode(secrets) == 0o700
        assert {p.name: mode(p) for p in secrets.iterdir()} == {
            name: 0o600 for name in ("pin_secret", "agents_token", "finance_token")
        }
        for request in (
            b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: abc\r\n\r\n",
            b"GET /\x01 HTTP/1.1\r\n\r\n",
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",  # TLS to the HTTP port
        ):
            assert b" 400 " in send_raw(daemon.port, request)
    finally:
        assert daemon.stop() == 0
    lines = log_lines(daemon)
    (warning,) = [line for line in lines if "secrets directory was open" in line["event"]]
    assert warning["level"] == "warning"
    assert warning["fixed"] == [
        {"path": str(secrets), "mode_was": "0755", "mode": "0700"},
        {"path": str(secrets / "pin_secret"), "mode_was": "0644", "mode": "0600"},
    ]
    bad = [line for line in lines if line["event"] == "bad HTTP request"]
    assert [line["error"] for line in bad] == ["BadHttpMessage", "InvalidURLError"]
    assert "Traceback" not in daemon.log()


class PostgresProxy:
    """A TCP proxy in front of PostgreSQL that the test can cut: open connections are reset and
    new ones refused, as when the server goes away, until it is restored."""

    def __init__(self, host: str, port: int) -> None:
        self._target = (host, port)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._server: asyncio.Server | None = None
        self._open: set[asyncio.StreamWriter] = set()
        self.port = 0
        self._call(self._listen())

    def _call(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(10)

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(*self._target)
        except OSError:
            writer.close()
            return
        self._open.update((writer, upstream_writer))

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError):
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
            sink.close()

        await asyncio.gather(pipe(reader, upstream_writer), pipe(upstream_reader, writer))
        self._open.difference_update((writer, upstream_writer))

    async def _cut(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._open):
            with contextlib.suppress(OSError):
                writer.get_extra_info("socket").setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                )
            writer.transport.abort()
        self._open.clear()

    def cut(self) -> None:
        self._call(self._cut())

    def restore(self) -> None:
        self._call(self._listen())

    def close(self) -> None:
        self._call(self._cut())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


def test_a_postgresql_outage_logs_one_line_per_kind_and_one_recovery(tmp_path, fresh_postgres_url):
    target = urlsplit(POSTGRES_URL)
    proxy = PostgresProxy(target.hostname or "127.0.0.1", target.port or 5432)
    database = urlsplit(fresh_postgres_url)
    url = f"postgresql+asyncpg://{database.username}@127.0.0.1:{proxy.port}{database.path}"
    daemon = Daemon(tmp_path, env={"METERD_DATABASE_URL": url})
    try:
        daemon.start()
        account = {"account_id": "A1", "name": "Acme", "plan": "per_minute", "currency": "USD"}
        proxy.cut()
        cut_at = time.monotonic()
        answers = []
        while time.monotonic() < cut_at + OUTAGE_SECONDS:
            answers.append(daemon.request("GET", "/healthz"))
            answers.append(daemon.admin("POST", "/admin/accounts", account))
            time.sleep(0.2)
        proxy.restore()
        deadline = time.monotonic() + WAIT_SECONDS
        while daemon.request("GET", "/healthz")[1].get("status") != "ok":
            assert time.monotonic() < deadline, daemon.log()
            time.sleep(0.1)
        assert daemon.admin("POST", "/admin/accounts", account)[0] == 201
    finally:
        with contextlib.suppress(AssertionError):
            assert daemon.process is None or daemon.stop() == 0
        proxy.close()
    assert {(status, json.dumps(body, sort_keys=True)) for status, body in answers} == {
        (  # degraded, not failed: webhooks go to the journal (and the watchdog keeps pinging)
            200,
            '{"database": "unavailable", "journal_entries": 0, '
            '"reason": "journaling: database unavailable", "status": "degraded"}',
        ),
        (
            503,
            '{"detail": "meterd cannot reach its database right now; try again shortly", '
            '"error": "database_unavailable"}',
        ),
    }
    lines = log_lines(daemon)
    assert "Traceback" not in daemon.log()
    unavailable = [line for line in lines if line["event"] == "database unavailable"]
    kinds = [line["kind"] for line in unavailable]
    assert "request:/admin/accounts" in kinds and "job:metering-tick" in kinds, unavailable
    assert len(kinds) == len(set(kinds)), kinds  # an outage shorter than the interval: one each
    assert all(line["level"] == "warning" and line["error"] for line in unavailable)
    (healthy,) = [line for line in lines if line["event"] == "database healthy again"]
    assert healthy["failures"] >= len(answers) // 2
    assert lines.index(healthy) > max(lines.index(line) for line in unavailable)


def test_a_start_while_the_database_is_unavailable_is_one_line_and_exit_1(tmp_path):
    result = run_cli(
        ["run"],
        {
            "METERD_DATABASE_URL": "postgresql+asyncpg://meterd:secret@127.0.0.1:1/billing",
            "METERD_STATE_DIR": str(tmp_path / "var"),
            "METERD_LISTEN": f"127.0.0.1:{free_port()}",
        },
        tmp_path,
    )
    assert result.returncode == 1
    assert result.stderr == "" and "Traceback" not in result.stdout
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert lines[-1]["event"] == "cannot start: the database is unavailable"
    assert lines[-1]["error"] == "ConnectionRefusedError"
    assert lines[-1]["database"] == "postgresql+asyncpg://meterd:***@127.0.0.1:1/billing"
