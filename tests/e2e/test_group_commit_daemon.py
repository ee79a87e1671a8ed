"""Group commit in the real daemon (issue 15, acceptance 3): kill -9 between a callback's receipt
and the commit that would hold it; the callback was not acknowledged, and Twilio's retry after
the restart records it once.

On PostgreSQL the writer is stopped inside its transaction by a row lock another session holds
on the call's row: the batch has begun (BEGIN, its first statements), its UPDATE of the call
waits, the commit has not happened. On SQLite another process holds the write lock, so the
writer waits to begin."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import datetime as dt
import sqlite3
import threading
import time
from collections.abc import Coroutine
from typing import Any

import asyncpg

from .daemon import Daemon
from .test_call_timelines import post_twilio
from .test_metering_daemon import _calls, daemon_env, make_account


class Session:
    """One PostgreSQL session on a loop of its own thread, for a synchronous test."""

    def __init__(self, dsn: str) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self.connection: asyncpg.Connection = self.run(asyncpg.connect(dsn, timeout=10))

    def run(self, coroutine: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(30)

    def close(self) -> None:
        self.run(self.connection.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


def _stored(session: Session, params: dict[str, str]) -> int:
    key = f"conference:{params['ConferenceSid']}:{params['SequenceNumber']}"
    return session.run(
        session.connection.fetchval("SELECT count(*) FROM webhook_events WHERE dedup_key = $1", key)
    )


def _post(daemon: Daemon, params: dict[str, str]) -> int | str:
    """The status meterd answered, or what became of the request if it answered nothing."""
    try:
        return post_twilio(daemon, "/twilio/conference", params)[0]
    except OSError as error:  # URLError, a reset or closed connection: no answer
        return type(error).__name__


def test_kill_9_before_the_commit_acknowledges_nothing_and_the_retry_records_once(
    tmp_path, fresh_postgres_url
):
    dsn = "postgresql://" + fresh_postgres_url.split("://", 1)[1]
    env = daemon_env(METERD_DATABASE_URL=fresh_postgres_url, METERD_WEBHOOK_JOURNAL_WAIT_MS="10000")
    daemon = Daemon(tmp_path, env=env).start()
    make_account(daemon, "acme", ["+14155550000"], deposit_minor=10**6, licence=False)
    base = dt.datetime.now(dt.UTC).replace(microsecond=0) - dt.timedelta(seconds=60)
    ((script, _),) = _calls(1, base)
    assert "<Conference" in post_twilio(daemon, "/twilio/voice", script.voice())[1]
    started, joined = script.events[0], script.events[1]
    assert _post(daemon, started) == 204
    holder, observer = Session(dsn), Session(dsn)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        try:
            holder.run(holder.connection.execute("BEGIN"))
            holder.run(
                holder.connection.execute(
                    "SELECT 1 FROM calls WHERE call_sid = $1 FOR UPDATE", script.call_sid
                )
            )
            answer = pool.submit(_post, daemon, joined)
            deadline = time.monotonic() + 10
            query = (
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND wait_event_type = 'Lock' AND query LIKE 'UPDATE calls%'"
            )
            while observer.run(observer.connection.fetchval(query)) == 0:
                assert time.monotonic() < deadline, "the writer never reached the call's row"
                time.sleep(0.05)
            # received, inside the writer's transaction, not committed: not answered
            assert not answer.done()
            daemon.kill()
            assert answer.result(10) != 204  # the connection closed with no answer
        finally:
            holder.run(holder.connection.execute("ROLLBACK"))
            holder.close()
    try:
        assert _stored(observer, joined) == 0
        journal = tmp_path / "var" / "webhook-journal.log"
        assert not journal.exists() or journal.stat().st_size == 0
        daemon = Daemon(tmp_path, env=env).start()
        try:
            assert _post(daemon, joined) == 204  # Twilio's retry
            assert _post(daemon, joined) == 204  # and one more: nothing changes
            assert _stored(observer, joined) == 1
            assert _stored(observer, started) == 1
        finally:
            assert daemon.stop() == 0
    finally:
        observer.close()


def test_kill_9_while_sqlite_is_locked_acknowledges_nothing_and_the_retry_records_once(tmp_path):
    """SQLite: another process holds the write lock, so the writer waits to begin the batch's
    transaction; the callback is received, not committed, not answered."""
    env = daemon_env(METERD_SQLITE_BUSY_TIMEOUT_MS="30000", METERD_WEBHOOK_JOURNAL_WAIT_MS="10000")
    daemon = Daemon(tmp_path, env=env).start()
    make_account(daemon, "acme", ["+14155550000"], deposit_minor=10**6, licence=False)
    base = dt.datetime.now(dt.UTC).replace(microsecond=0) - dt.timedelta(seconds=60)
    ((script, _),) = _calls(1, base)
    assert "<Conference" in post_twilio(daemon, "/twilio/voice", script.voice())[1]
    joined = script.events[1]
    path = tmp_path / "var" / "meterd.sqlite3"
    key = f"conference:{joined['ConferenceSid']}:{joined['SequenceNumber']}"
    count = "SELECT count(*) FROM webhook_events WHERE dedup_key = ?"
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        holder = sqlite3.connect(path, isolation_level=None, timeout=30)
        try:
            holder.execute("BEGIN IMMEDIATE")
            answer = pool.submit(_post, daemon, joined)
            time.sleep(1.5)
            assert not answer.done()  # received, waiting for the write lock: not answered
            daemon.kill()
            assert answer.result(10) != 204
        finally:
            holder.execute("ROLLBACK")
            holder.close()
    with contextlib.closing(sqlite3.connect(path)) as db:
        assert db.execute(count, (key,)).fetchone() == (0,)
    journal = tmp_path / "var" / "webhook-journal.log"
    assert not journal.exists() or journal.stat().st_size == 0
    daemon = Daemon(tmp_path, env=env).start()
    try:
        assert _post(daemon, joined) == 204  # Twilio's retry
        assert _post(daemon, joined) == 204
    finally:
        assert daemon.stop() == 0
    with contextlib.closing(sqlite3.connect(path)) as db:
        assert db.execute(count, (key,)).fetchone() == (1,)
