"""The webhook journal in the real daemon (issue 12, acceptance 1 and 2).

1. PostgreSQL refuses connections for 20 s while calls run: every conference and call-status
   callback gets 204 at the first try (the client never retries), `/healthz` says degraded, a new
   caller hears an apology, and after recovery every call is charged exactly its minutes.
2. kill -9 while the journal holds callbacks: after the restart they are applied, once.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import sqlite3
import time
import urllib.request
from urllib.parse import urlsplit

from tests.conftest import POSTGRES_URL

from .daemon import Daemon
from .test_call_timelines import post_twilio
from .test_metering_daemon import (
    _assert_settled_exactly,
    _calls,
    _deliver_starts,
    daemon_env,
    make_account,
    wait_for,
)
from .test_outage_logs import PostgresProxy, log_lines

OUTAGE_SECONDS = 20.0
CALLS = 8


def _ends(script) -> list[tuple[str, dict[str, str]]]:
    return [("/twilio/conference", params) for params in script.events[3:]] + [
        ("/twilio/call-status", params) for params in script.status_events
    ]


def test_postgresql_refusing_connections_for_20_s_loses_no_callback(tmp_path, fresh_postgres_url):
    target = urlsplit(POSTGRES_URL)
    proxy = PostgresProxy(target.hostname or "127.0.0.1", target.port or 5432)
    database = urlsplit(fresh_postgres_url)
    url = f"postgresql+asyncpg://{database.username}@127.0.0.1:{proxy.port}{database.path}"
    daemon = Daemon(tmp_path, env=daemon_env(METERD_DATABASE_URL=url)).start()
    try:
        numbers = [f"+1415555{n:04d}" for n in range(CALLS)]
        make_account(daemon, "acme", numbers, deposit_minor=10**6, licence=False)
        base = dt.datetime.now(dt.UTC).replace(microsecond=0) - dt.timedelta(seconds=300)
        scripts = _calls(CALLS, base)
        _deliver_starts([daemon], scripts)
        wait_for(
            lambda: daemon.admin("GET", "/admin/accounts/acme")[1]["deposit_minor"] < 10**6,
            "live minutes before the outage",
        )
        proxy.cut()
        cut_at = time.monotonic()
        answers = []
        for index, (script, _) in enumerate(scripts):
            for path, params in _ends(script):
                answers.append(post_twilio(daemon, path, params)[0])  # once: no retry
            health = daemon.request("GET", "/healthz")
            time.sleep(max(0.0, cut_at + (index + 1) * OUTAGE_SECONDS / CALLS - time.monotonic()))
        status, apology = post_twilio(
            daemon, "/twilio/voice", _calls(CALLS + 1, base)[-1][0].voice()
        )
        proxy.restore()
        assert answers == [204] * len(answers)
        assert health == (
            200,
            {
                "status": "degraded",
                "reason": "journaling: database unavailable",
                "database": "unavailable",
                "journal_entries": health[1]["journal_entries"],
            },
        )
        assert health[1]["journal_entries"] > 0
        assert status == 200 and "cannot take your call" in apology
        _assert_settled_exactly(daemon, scripts, "acme", tmp_path)
        wait_for(lambda: daemon.request("GET", "/healthz")[1]["status"] == "ok", "healthy again")
        with urllib.request.urlopen(daemon.base_url + "/metrics", timeout=10) as response:
            metrics = response.read().decode()
        assert "meterd_webhook_journal_entries 0.0" in metrics
        applied = 'meterd_webhook_journal_replays_total{outcome="applied"} '
        assert float(metrics.split(applied)[1].split()[0]) > 0
    finally:
        with contextlib.suppress(AssertionError):
            assert daemon.process is None or daemon.stop() == 0
        proxy.close()
    lines = log_lines(daemon)
    assert "Traceback" not in daemon.log()
    assert [line for line in lines if line["event"].startswith("journaling webhooks")]
    assert [line for line in lines if line["event"].startswith("webhook journal applied")]


@contextlib.contextmanager
def write_lock_held(path):
    holder = sqlite3.connect(path, isolation_level=None, timeout=30)
    holder.execute("BEGIN IMMEDIATE")
    try:
        yield
    finally:
        holder.execute("ROLLBACK")
        holder.close()


def test_kill_9_while_the_journal_holds_callbacks_applies_them_once_after_restart(tmp_path):
    env = daemon_env(METERD_SQLITE_BUSY_TIMEOUT_MS="100")
    daemon = Daemon(tmp_path, env=env).start()
    numbers = [f"+1415555{n:04d}" for n in range(CALLS)]
    make_account(daemon, "acme", numbers, deposit_minor=10**6, licence=False)
    base = dt.datetime.now(dt.UTC).replace(microsecond=0) - dt.timedelta(seconds=300)
    scripts = _calls(CALLS, base)
    _deliver_starts([daemon], scripts)
    journal = tmp_path / "var" / "webhook-journal.log"
    sent = 0
    with write_lock_held(tmp_path / "var" / "meterd.sqlite3"):
        for script, _ in scripts:
            for path, params in _ends(script):
                assert post_twilio(daemon, path, params)[0] == 204
                sent += 1
        daemon.kill()  # the journal holds every one of them
    assert len(journal.read_bytes().splitlines()) == sent

    daemon = Daemon(tmp_path, env=env).start()
    try:
        _assert_settled_exactly(daemon, scripts, "acme", tmp_path)
        # every callback is in the database once, and the journal is empty again
        with contextlib.closing(sqlite3.connect(tmp_path / "var" / "meterd.sqlite3")) as db:
            (stored,) = db.execute(
                "SELECT count(*) FROM webhook_events WHERE route != 'voice'"
            ).fetchone()
        assert stored == sum(len(s.events) + len(s.status_events) for s, _ in scripts)
        assert journal.stat().st_size == 0
        # a redelivery now (Twilio's own retry) changes nothing
        script, _ = scripts[0]
        for path, params in _ends(script):
            assert post_twilio(daemon, path, params)[0] == 204
        _assert_settled_exactly(daemon, scripts, "acme", tmp_path)
    finally:
        assert daemon.stop() == 0
    restarted = [
        json.loads(line) for line in daemon.log().splitlines() if "webhook journal holds" in line
    ]
    assert restarted and restarted[-1]["entries"] == sent
