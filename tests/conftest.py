"""Shared fixtures. Storage tests run on SQLite and on PostgreSQL; PostgreSQL being unreachable
is a failure, never a skip (set METERD_TEST_POSTGRES_URL to point elsewhere)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest
import structlog

from meterd.store.database import Database, open_database
from tests.stripe_server import LocalStripe

# In-process tests log through structlog's console renderer (the daemon logs JSON). With `rich`
# installed (schemathesis brings it) that renderer draws every logged traceback with rich, which
# takes hundreds of milliseconds each: slow enough to change which webhooks share a batch in the
# group-commit tests. Plain tracebacks, as without rich.
structlog.configure(
    processors=[
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.StackInfoRenderer(),
        structlog.dev.set_exc_info,
        structlog.processors.TimeStamper(fmt="%Y-%m-%d %H:%M:%S", utc=False),
        structlog.dev.ConsoleRenderer(exception_formatter=structlog.dev.plain_traceback),
    ]
)

POSTGRES_URL = os.environ.get(
    "METERD_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"
)
BACKENDS = ["sqlite", "postgresql"]


def _postgres_dsn(database: str) -> str:
    base, _, _ = POSTGRES_URL.rpartition("/")
    return f"{base}/{database}"


def _admin(statement: str) -> None:
    """Run one statement on the PostgreSQL server (in a thread: callers may be inside a loop)."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, _admin_async(statement)).result()


async def _admin_async(statement: str) -> None:
    try:
        connection = await asyncpg.connect(POSTGRES_URL, timeout=10)
    except (OSError, asyncpg.PostgresError) as error:
        pytest.fail(
            f"PostgreSQL at {POSTGRES_URL} is unreachable ({error!r}); the storage tests must run "
            "on it. Start it: "
            "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start"
        )
    try:
        await connection.execute(statement)
    finally:
        await connection.close()


@pytest.fixture
def fresh_postgres_url() -> Iterator[str]:
    """A new, empty PostgreSQL database for one test, dropped afterwards."""
    name = f"meterd_test_{uuid.uuid4().hex[:12]}"
    _admin(f"CREATE DATABASE {name}")
    try:
        yield "postgresql+asyncpg://" + _postgres_dsn(name).split("://", 1)[1]
    finally:
        _admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture(scope="module")
def localstripe() -> Iterator[LocalStripe]:
    """localstripe on a loopback port, one per test module (a module may define its own)."""
    server = LocalStripe().start()
    yield server
    server.stop()


@pytest.fixture(params=BACKENDS)
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A URL of a new, empty database, once for SQLite and once for PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path}/meterd.sqlite3"
    return request.getfixturevalue("fresh_postgres_url")


@pytest.fixture
async def database(database_url: str) -> AsyncIterator[Database]:
    db = await open_database(database_url)
    try:
        yield db
    finally:
        await db.close()


# --- running in parallel (pytest-xdist, the README's test command) ------------------------------

TIMED_GROUP = "real-daemons"  # tests whose limits are wall-clock: one worker runs them in turn


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The tests that start the real daemon (tests/e2e) and time it (minutes within 2 s,
    overload, floods) run one after the other on one worker (`--dist loadgroup`), so two of them
    never compete with each other for the machine; the rest spread over the other workers."""
    for item in items:
        if "/tests/e2e/" in str(item.path):
            item.add_marker(pytest.mark.e2e)
            item.add_marker(pytest.mark.xdist_group(TIMED_GROUP))
