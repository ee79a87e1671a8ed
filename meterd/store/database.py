"""The database: engines, transactions and migrations, for SQLite and PostgreSQL alike.

SQLite (the embedded default) runs in WAL mode with `synchronous=FULL`, so a commit survives a
power loss; every write transaction starts with `BEGIN IMMEDIATE`, taking the write lock before
its first read, so read-modify-write is atomic and a reader never has to upgrade to a writer (which
would fail with "database is locked" whatever the busy timeout). Reads use a second engine with
plain deferred transactions, which WAL lets run beside the writer.

PostgreSQL runs at READ COMMITTED; correctness under concurrency rests on unique idempotency keys
(`INSERT ... ON CONFLICT DO NOTHING`) and on balances changed by atomic, checked updates. A pooled
connection is pinged before use (`pool_pre_ping`), and one that an error shows broken (the
server went away, or asyncpg's "cannot switch to state" of a connection left mid-operation) is
discarded rather than handed out again.

The SQLite file is created mode 0600 before SQLite opens it, so its `-wal` and `-shm` files,
which SQLite creates with the database file's mode, are private too; files left readable by
others (an older meterd, a copy) are made 0600, and the log says so.

`Database.outage` logs database outages (`meterd/store/outage.py`): failures are reported to it
by whoever caught them; a write transaction that commits tells it the database is back.
"""

from __future__ import annotations

import asyncio
import os
import stat
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import structlog
from alembic import command
from alembic.config import Config
from sqlalchemy import event, text
from sqlalchemy.engine import Connection, ExceptionContext, make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from meterd.store.outage import OutageLog, is_unavailable

log = structlog.get_logger("meterd.database")

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
# Any fixed number: held while migrating so two daemons starting together do not race.
MIGRATION_LOCK_ID = 0x6D65746572
SQLITE_FILE_MODE = 0o600
SQLITE_SUFFIXES = ("", "-wal", "-shm", "-journal")


class Database:
    """Owns the engines. `write()` and `read()` give a connection inside one transaction that
    commits when the block ends and rolls back if it raises."""

    def __init__(
        self, url: str, *, busy_timeout_ms: int = 5000, connect_args: dict[str, Any] | None = None
    ) -> None:
        self.url = url
        self.outage = OutageLog()
        parsed = make_url(url)
        self.dialect = parsed.get_backend_name()
        if self.dialect == "sqlite":
            database = parsed.database or ""
            if database and database != ":memory:" and not database.startswith("file:"):
                _private_sqlite_files(Path(database))
            self._writer = create_async_engine(url, pool_size=1, max_overflow=0, pool_timeout=60)
            self._reader = create_async_engine(url, pool_size=4, max_overflow=0, pool_timeout=60)
            _sqlite_pragmas(self._writer, busy_timeout_ms, begin="BEGIN IMMEDIATE")
            _sqlite_pragmas(self._reader, busy_timeout_ms, begin="BEGIN")
        elif self.dialect == "postgresql":
            self._writer = create_async_engine(
                url,
                pool_size=10,
                max_overflow=5,
                pool_pre_ping=True,
                connect_args=connect_args or {},
            )
            _discard_broken_connections(self._writer)
            self._reader = self._writer
        else:
            raise ValueError(f"unsupported database {self.dialect!r}")

    @asynccontextmanager
    async def write(self) -> AsyncIterator[AsyncConnection]:
        async with self._writer.begin() as connection:
            yield connection
        self.outage.recovered()  # committed: if the database was away, it is back

    @asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncConnection]:
        async with self._reader.begin() as connection:
            yield connection

    async def ping(self) -> None:
        async with self.read() as connection:
            await connection.execute(text("SELECT 1"))

    async def upgrade(self) -> None:
        """Bring the schema to the newest migration (idempotent; safe with several daemons)."""
        async with self.write() as connection:
            if self.dialect == "postgresql":
                await connection.execute(
                    text("SELECT pg_advisory_xact_lock(:id)"), {"id": MIGRATION_LOCK_ID}
                )
            await connection.run_sync(_run_alembic_upgrade)

    async def close(self) -> None:
        await self._writer.dispose()
        if self._reader is not self._writer:
            await self._reader.dispose()


def _private_sqlite_files(database: Path) -> None:
    """Create the SQLite file 0600 if it is missing (SQLite gives its -wal and -shm files the
    database file's mode); make any of its files that others can read 0600, and say so."""
    database.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        os.close(os.open(database, os.O_RDWR | os.O_CREAT, SQLITE_FILE_MODE))
    except OSError:
        return  # SQLite will report it, with its own words, on the first connection
    for suffix in SQLITE_SUFFIXES:
        path = database.with_name(database.name + suffix)
        try:
            mode = stat.S_IMODE(path.stat().st_mode)
        except FileNotFoundError:
            continue
        if not mode & 0o077:
            continue
        try:
            path.chmod(SQLITE_FILE_MODE)
        except OSError as error:
            log.warning(
                "the database file is readable by others and cannot be made private",
                path=str(path),
                mode=f"{mode:04o}",
                error=str(error),
            )
        else:
            log.warning(
                "the database file was readable by others: made it private",
                path=str(path),
                mode_was=f"{mode:04o}",
                mode=f"{SQLITE_FILE_MODE:04o}",
            )


def _discard_broken_connections(engine: AsyncEngine) -> None:
    """Treat every error that shows the connection broken as a disconnect, so SQLAlchemy drops
    the connection instead of returning it to the pool (its asyncpg dialect counts only a closed
    connection). A connection left mid-operation is dropped alone; when the server went away,
    the rest of the pool is too (the pre-ping replaces them as they are checked out)."""

    @event.listens_for(engine.sync_engine, "handle_error")
    def on_error(context: ExceptionContext) -> None:
        if context.is_disconnect or not is_unavailable(context.original_exception):
            return
        # SQLAlchemy 2.0 types ExceptionContext with empty __slots__, so mypy calls these
        # documented-writable attributes read-only (2.1 fixed it: hence unused-ignore)
        context.is_disconnect = True  # type: ignore[misc,unused-ignore]
        text = str(context.original_exception)
        if "another operation is in progress" in text or "cannot switch to state" in text:
            context.invalidate_pool_on_disconnect = False  # type: ignore[misc,unused-ignore]


def _sqlite_pragmas(engine: AsyncEngine, busy_timeout_ms: int, *, begin: str) -> None:
    @event.listens_for(engine.sync_engine, "connect")
    def on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # the driver must not issue its own BEGIN
        cursor = dbapi_connection.cursor()
        for pragma in (
            "journal_mode=WAL",
            "synchronous=FULL",
            f"busy_timeout={busy_timeout_ms}",
            "foreign_keys=ON",
        ):
            cursor.execute(f"PRAGMA {pragma}")
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def on_begin(connection: Connection) -> None:
        connection.exec_driver_sql(begin)


def _run_alembic_upgrade(connection: Connection) -> None:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["connection"] = connection
    command.upgrade(config, "head")


async def open_database(
    url: str,
    *,
    busy_timeout_ms: int = 5000,
    upgrade: bool = True,
    connect_args: dict[str, Any] | None = None,
) -> Database:
    database = Database(url, busy_timeout_ms=busy_timeout_ms, connect_args=connect_args)
    if upgrade:
        try:
            await database.upgrade()
        except BaseException:
            await asyncio.shield(database.close())
            raise
    return database
