"""Database outages: which errors mean "the database is unavailable", and their log.

A database that is down makes every webhook, every tick and every health probe fail, many times a
second. Each such failure is one log line without a traceback (the traceback says nothing an
outage does not: the error class and its text do), at most one line every
`OUTAGE_LOG_INTERVAL_SECONDS` per kind (a route, a job) with the number of failures it stands
for, and one "database healthy again" line once a write transaction commits again.

Anything else (a constraint, a bug, a schema that does not match) is not an outage and is logged
by the caller with its traceback, as before.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import Any

import structlog
from sqlalchemy import exc as sa_exc

try:
    import asyncpg
except ImportError:  # the `postgresql` extra is not installed: meterd runs on SQLite only
    asyncpg = None

OUTAGE_LOG_INTERVAL_SECONDS = 10.0

# SQLSTATE classes and codes of a PostgreSQL that cannot serve: connection exceptions (08),
# operator intervention (57P01-57P05: shutdown, crash, starting up), insufficient resources
# (53: disk full, out of memory, too many connections), a read-only transaction (25006: a standby
# after a failover), the database or the login not (yet) there (3D000, 28).
_PG_UNAVAILABLE_PREFIXES = ("08", "57P", "53", "25006", "3D000", "28")
# sqlite3 error names (Python 3.11+) of a database that cannot be used right now: another
# writer holds the lock past the busy timeout, the disk fails or is full, the file cannot be
# opened or written.
_SQLITE_UNAVAILABLE_PREFIXES = (
    "SQLITE_BUSY",
    "SQLITE_LOCKED",
    "SQLITE_IOERR",
    "SQLITE_FULL",
    "SQLITE_CANTOPEN",
    "SQLITE_READONLY",
    "SQLITE_PROTOCOL",
)
# asyncpg's words for a connection that is gone or broken (the "cannot switch to state" of a
# connection reused after an operation on it was interrupted).
_ASYNCPG_BROKEN_CONNECTION = (
    "connection is closed",
    "cannot switch to state",
    "another operation is in progress",
    "connection was closed",
)
_DATABASE_MODULES = ("asyncpg", "sqlalchemy", "aiosqlite", "sqlite3")


def is_unavailable(error: BaseException) -> bool:
    """True if `error` says the database cannot be reached or used right now (an outage), rather
    than that a statement was wrong."""
    return any(_one_is_unavailable(link, error) for link in _chain(error))


def _chain(error: BaseException) -> Iterator[BaseException]:
    """`error`, the driver error SQLAlchemy wraps, and their causes; each once."""
    seen: set[int] = set()
    pending: list[BaseException | None] = [error]
    while pending:
        link = pending.pop()
        if link is None or id(link) in seen:
            continue
        seen.add(id(link))
        yield link
        pending.extend(
            [getattr(link, "orig", None), link.__cause__, link.__context__]
            if isinstance(link, sa_exc.DBAPIError)
            else [link.__cause__]
        )


def _one_is_unavailable(link: BaseException, outermost: BaseException) -> bool:
    if isinstance(link, sa_exc.DBAPIError) and link.connection_invalidated:
        return True
    if isinstance(link, sa_exc.DisconnectionError | sa_exc.TimeoutError):
        return True  # a connection that broke; no connection free in the pool in time
    sqlstate = getattr(link, "sqlstate", None) or getattr(link, "pgcode", None)
    if isinstance(sqlstate, str) and sqlstate.startswith(_PG_UNAVAILABLE_PREFIXES):
        return True
    if isinstance(link, sqlite3.Error):
        name = getattr(link, "sqlite_errorname", "") or ""
        return name.startswith(_SQLITE_UNAVAILABLE_PREFIXES)
    if asyncpg is not None and isinstance(link, asyncpg.exceptions.ConnectionDoesNotExistError):
        return True
    asyncpg_interface_error = () if asyncpg is None else (asyncpg.exceptions.InterfaceError,)
    if isinstance(link, (*asyncpg_interface_error, sa_exc.InterfaceError)):
        text = str(link)
        return any(words in text for words in _ASYNCPG_BROKEN_CONNECTION)
    if isinstance(link, OSError):  # ConnectionError and TimeoutError too
        # A refused or reset connection, a name that does not resolve, a connect timeout: an
        # outage when raised while talking to the database (not, say, Stripe or Twilio).
        return _raised_in_database_code(link) or _raised_in_database_code(outermost)
    return False


def _raised_in_database_code(error: BaseException) -> bool:
    traceback: TracebackType | None = error.__traceback__
    while traceback is not None:
        module = traceback.tb_frame.f_globals.get("__name__", "")
        if isinstance(module, str) and module.split(".", 1)[0] in _DATABASE_MODULES:
            return True
        traceback = traceback.tb_next
    return False


def describe(error: BaseException) -> dict[str, str]:
    """The fields an outage line carries: the error's class (and the driver's, if SQLAlchemy
    wrapped it) and the first line of its text, short. For the log only: never for a client."""
    fields = {"error": type(error).__name__}
    original = getattr(error, "orig", None)
    if isinstance(original, BaseException):
        # SQLAlchemy's asyncpg adapter wraps the driver's own error once more
        while type(original).__module__.startswith("sqlalchemy") and isinstance(
            original.__cause__, BaseException
        ):
            original = original.__cause__
        fields["driver_error"] = f"{type(original).__module__}.{type(original).__name__}"
        text = str(original)
    else:
        text = str(error)
    fields["detail"] = (text.strip().splitlines() or [""])[0][:300]
    return fields


class OutageLog:
    """One line per database failure without a traceback, at most one per `interval_seconds` per
    kind (with `suppressed`: the failures of that kind since its last line), and "database
    healthy again" once, when a write commits after an outage that was logged."""

    def __init__(
        self,
        *,
        interval_seconds: float = OUTAGE_LOG_INTERVAL_SECONDS,
        monotonic: Callable[[], float] = time.monotonic,
        logger: Any = None,
    ) -> None:
        self.interval_seconds = interval_seconds
        self._monotonic = monotonic
        self._log = logger or structlog.get_logger("meterd.database")
        self._down_since: float | None = None
        self._failures = 0  # in the current outage
        self._announced = False  # a line about the current outage was written
        self._last_line: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    @property
    def down(self) -> bool:
        return self._down_since is not None

    def failure(self, kind: str, error: BaseException, **fields: Any) -> None:
        """Record one failure of `kind` (e.g. "job:metering-tick", "request:/twilio/voice")."""
        now = self._monotonic()
        if self._down_since is None:
            self._down_since = now
        self._failures += 1
        last = self._last_line.get(kind)
        if last is not None and now - last < self.interval_seconds:
            self._suppressed[kind] = self._suppressed.get(kind, 0) + 1
            return
        self._last_line[kind] = now
        self._announced = True
        self._log.warning(
            "database unavailable",
            kind=kind,
            suppressed=self._suppressed.pop(kind, 0),
            **describe(error),
            **fields,
        )

    def recovered(self) -> None:
        """A write transaction committed: the database is back, if it was away."""
        if self._down_since is None:
            return
        if self._announced:
            self._log.info(
                "database healthy again",
                down_seconds=round(self._monotonic() - self._down_since, 1),
                failures=self._failures,
            )
        self._down_since = None
        self._failures = 0
        self._announced = False
