"""The HTTP side of a database outage (issue 12, finding 5): `/healthz` says the database is
"unavailable" (degraded: webhooks are journaled) and nothing of the driver's text; a request
that meets the outage is a 503 and one rate-limited log line without a traceback; the first
write after it logs "database healthy again" once; a broken PostgreSQL connection is dropped
rather than handed out again."""

from __future__ import annotations

import asyncio
import sqlite3

import pytest
from sqlalchemy import text
from structlog.testing import capture_logs

from meterd.config import load_settings
from meterd.store.database import Database, open_database
from meterd.store.outage import is_unavailable
from meterd.web.app import create_app

from .helpers import fixed_clock

ADMIN = "admin-token-0123456789abcdef"
UNREACHABLE_POSTGRES = "postgresql+asyncpg://meterd_user@127.0.0.1:1/billing_secret_db"


def _settings(tmp_path):
    return load_settings(
        None,
        {
            "METERD_STATE_DIR": str(tmp_path),
            "METERD_ADMIN_TOKEN": ADMIN,
            "METERD_PIN_SECRET": "pin-secret-0123456789abcdef",
        },
    )


def _headers() -> dict[str, str]:
    return {"Authorization": f"Bearer {ADMIN}"}


async def test_healthz_and_requests_while_postgresql_refuses_connections(aiohttp_client, tmp_path):
    database = Database(UNREACHABLE_POSTGRES)
    client = await aiohttp_client(create_app(_settings(tmp_path), database, clock=fixed_clock))
    try:
        with capture_logs() as logs:
            response = await client.get("/healthz")
            body = await response.text()
            statuses = []
            for _ in range(5):
                answer = await client.get("/admin/accounts/A1", headers=_headers())
                statuses.append((answer.status, (await answer.json())["error"]))
                retry_after = answer.headers.get("Retry-After")
    finally:
        await database.close()
    assert response.status == 200  # degraded: callbacks go to the webhook journal
    assert await response.json() == {
        "status": "degraded",
        "reason": "journaling: database unavailable",
        "database": "unavailable",
        "journal_entries": 0,
    }
    for leak in ("127.0.0.1", "billing_secret_db", "meterd_user", "Connect call", "Refused"):
        assert leak not in body
    assert statuses == [(503, "database_unavailable")] * 5 and retry_after == "1"
    # the details are in the log: the health check's change once, one line for five requests
    (health,) = [entry for entry in logs if entry["event"] == "health check: degraded"]
    assert health["error"] == "ConnectionRefusedError" and "127.0.0.1" in health["detail"]
    (line,) = [entry for entry in logs if entry["event"] == "database unavailable"]
    assert line["kind"] == "request:/admin/accounts/{account_id}"
    assert line["error"] == "ConnectionRefusedError" and line["suppressed"] == 0
    assert not [entry for entry in logs if entry.get("exc_info")]


async def test_a_locked_sqlite_database_gives_503s_then_one_healthy_again_line(
    aiohttp_client, tmp_path
):
    path = tmp_path / "meterd.sqlite3"
    database = await open_database(f"sqlite+aiosqlite:///{path}", busy_timeout_ms=50)
    client = await aiohttp_client(create_app(_settings(tmp_path), database, clock=fixed_clock))
    body = {"account_id": "A1", "name": "Acme", "plan": "per_minute", "currency": "USD"}
    try:
        with capture_logs() as logs:
            holder = sqlite3.connect(path, isolation_level=None)
            holder.execute("BEGIN IMMEDIATE")  # another writer holds the lock past busy_timeout
            try:
                for _ in range(3):
                    response = await client.post("/admin/accounts", json=body, headers=_headers())
                    assert response.status == 503
                    healthz = await client.get("/healthz")
                    assert healthz.status == 200
                    assert (await healthz.json())["database"] == "unavailable"
            finally:
                holder.execute("ROLLBACK")
                holder.close()
            response = await client.post("/admin/accounts", json=body, headers=_headers())
            assert response.status == 201
            assert (await client.get("/healthz")).status == 200
    finally:
        await database.close()
    events = [entry["event"] for entry in logs if entry["event"] != "account created"]
    assert events == [
        "database unavailable",  # the first POST; the next two are counted, not logged
        "health check: degraded",
        "database healthy again",
        "healthy again",
    ], logs
    (line,) = [entry for entry in logs if entry["event"] == "database unavailable"]
    assert (line["kind"], line["detail"]) == ("request:/admin/accounts", "database is locked")
    (healthy,) = [entry for entry in logs if entry["event"] == "database healthy again"]
    assert healthy["failures"] == 3


async def test_a_postgresql_connection_left_mid_operation_is_dropped_not_reused(
    fresh_postgres_url,
):
    """asyncpg's "another operation is in progress" (or "cannot switch to state"): SQLAlchemy's
    dialect counts only a closed connection as gone; meterd drops a broken one too."""
    database = Database(fresh_postgres_url)
    try:
        await database.ping()
        async with database._writer.connect() as connection:
            raw = (await connection.get_raw_connection()).driver_connection
            busy = asyncio.create_task(raw.execute("SELECT pg_sleep(0.5)"))
            await asyncio.sleep(0.05)
            with pytest.raises(Exception) as caught:
                await connection.execute(text("SELECT 1"))
            assert is_unavailable(caught.value)
            assert caught.value.connection_invalidated  # type: ignore[attr-defined]
            with pytest.raises(Exception):  # noqa: B017 - the dropped connection's query
                await busy
        for _ in range(20):  # more than the pool holds: every connection handed out works
            await database.ping()
    finally:
        await database.close()
