"""Database outages (issue 12, finding 5): which errors are an outage, one line per failure
without a traceback, at most one per interval per kind with a count of the suppressed, one
"database healthy again"; scheduled jobs report through it. (The HTTP side and PostgreSQL's
broken connections: tests/integration/test_database_outage.py.)"""

from __future__ import annotations

import sqlite3

import pytest
from sqlalchemy import text
from structlog.testing import capture_logs

from meterd.scheduler import Scheduler
from meterd.store.database import Database
from meterd.store.outage import OutageLog, describe, is_unavailable

UNREACHABLE_POSTGRES = "postgresql+asyncpg://postgres@127.0.0.1:1/x"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def _error_of(database: Database, statement: str) -> Exception:
    with pytest.raises(Exception) as caught:
        async with database.write() as connection:
            await connection.execute(text(statement))
    return caught.value


async def test_refused_connection_and_busy_sqlite_are_outages_bad_sql_is_not(tmp_path):
    postgres = Database(UNREACHABLE_POSTGRES)
    refused = await _error_of(postgres, "SELECT 1")
    await postgres.close()
    assert isinstance(refused, ConnectionRefusedError) and is_unavailable(refused)
    assert describe(refused)["error"] == "ConnectionRefusedError"

    database = Database(f"sqlite+aiosqlite:///{tmp_path}/db.sqlite3", busy_timeout_ms=50)
    try:
        async with database.write() as connection:
            await connection.execute(text("CREATE TABLE t (x INTEGER)"))
        holder = sqlite3.connect(tmp_path / "db.sqlite3", isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")
        try:
            locked = await _error_of(database, "INSERT INTO t VALUES (1)")
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        assert is_unavailable(locked)
        assert describe(locked) == {
            "error": "OperationalError",
            "driver_error": "sqlite3.OperationalError",
            "detail": "database is locked",
        }
        missing_table = await _error_of(database, "SELECT * FROM no_such_table")
        assert not is_unavailable(missing_table)  # a bug, logged with its traceback
    finally:
        await database.close()
    # errors that do not come from the database are not an outage
    assert not is_unavailable(ConnectionRefusedError(111, "Connect call failed"))
    assert not is_unavailable(ValueError("nope"))


def test_one_line_per_interval_per_kind_with_the_suppressed_count_and_one_recovery_line():
    clock = FakeClock()
    outage = OutageLog(interval_seconds=10, monotonic=clock)
    error = ConnectionRefusedError(111, "Connect call failed ('10.0.0.9', 5432)")
    with capture_logs() as logs:
        outage.recovered()  # nothing was down: nothing to say
        for second in range(40):  # 40 s of an outage: three failures a second, two kinds
            clock.now = 1000.0 + second
            outage.failure("job:metering-tick", error)
            outage.failure("job:metering-tick", error)
            outage.failure("request:/twilio/conference", error, method="POST")
        clock.now = 1040.5
        outage.recovered()
        outage.recovered()
    lines = [entry for entry in logs if entry["event"] == "database unavailable"]
    tick = [entry for entry in lines if entry["kind"] == "job:metering-tick"]
    webhook = [entry for entry in lines if entry["kind"] == "request:/twilio/conference"]
    assert [entry["suppressed"] for entry in tick] == [0, 19, 19, 19]
    assert [entry["suppressed"] for entry in webhook] == [0, 9, 9, 9]
    assert all(entry["log_level"] == "warning" for entry in lines)
    assert all(entry["error"] == "ConnectionRefusedError" for entry in lines)
    assert all("exc_info" not in entry and "exception" not in entry for entry in lines)
    assert webhook[0]["method"] == "POST"
    healthy = [entry for entry in logs if entry["event"] == "database healthy again"]
    assert healthy == [
        {
            "event": "database healthy again",
            "log_level": "info",
            "down_seconds": 40.5,
            "failures": 120,
        }
    ]
    assert len(logs) == len(lines) + 1


def test_a_flapping_database_never_logs_more_than_its_interval_allows():
    clock = FakeClock()
    outage = OutageLog(interval_seconds=10, monotonic=clock)
    with capture_logs() as logs:
        for second in range(30):  # down, up, down, up: every second
            clock.now = 1000.0 + second
            outage.failure("job:payments", TimeoutError())
            outage.recovered()
    unavailable = [entry for entry in logs if entry["event"] == "database unavailable"]
    healthy = [entry for entry in logs if entry["event"] == "database healthy again"]
    assert [entry["suppressed"] for entry in unavailable] == [0, 9, 9]
    assert len(healthy) == 3  # a recovery is said only for an outage that was said


async def test_a_job_that_meets_an_outage_logs_one_line_without_a_traceback():
    clock = FakeClock()
    outage = OutageLog(monotonic=clock)
    scheduler = Scheduler(lambda error: None, outage=outage)
    database = Database(UNREACHABLE_POSTGRES)

    async def tick() -> None:
        await database.ping()

    async def broken() -> None:
        raise KeyError("a bug")

    try:
        with capture_logs() as logs:
            for _ in range(5):
                await scheduler._guarded("metering-tick", tick)()
            await scheduler._guarded("usage-nightly", broken)()
    finally:
        await database.close()
    assert [(entry["event"], entry.get("kind")) for entry in logs] == [
        ("database unavailable", "job:metering-tick"),
        ("scheduled job failed", None),
    ]
    assert "exc_info" not in logs[0] and logs[0]["error"] == "ConnectionRefusedError"
    assert logs[1]["exc_info"] is True  # anything else keeps its traceback
    assert outage.down
