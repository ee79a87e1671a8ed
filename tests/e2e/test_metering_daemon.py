"""Live metering in the real daemon: minutes appear while the call is up, a `kill -9` while
metering loses and repeats nothing, and two daemons on one PostgreSQL post each minute once."""

from __future__ import annotations

import datetime as dt
import random
import time

import pytest

from tests.call_scripts import CallScript

from .daemon import Daemon, run_cli
from .test_call_timelines import AGENTS_TOKEN, PUBLIC_BASE_URL, TWILIO_TOKEN, post_twilio

POLL_TIMEOUT_SECONDS = 60


def daemon_env(**extra: str) -> dict[str, str]:
    return {
        "METERD_TWILIO_AUTH_TOKEN": TWILIO_TOKEN,
        "METERD_AGENTS_TOKEN": AGENTS_TOKEN,
        "METERD_PUBLIC_BASE_URL": PUBLIC_BASE_URL,
        "METERD_SETTLE_DELAY_SECONDS": "2",
        **extra,
    }


def wait_for(predicate, what: str):
    deadline = time.monotonic() + POLL_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def make_account(
    daemon: Daemon,
    account_id: str,
    numbers: list[str],
    deposit_minor: int = 0,
    licence: bool = True,
) -> None:
    status, body = daemon.admin(
        "POST",
        "/admin/accounts",
        {
            "account_id": account_id,
            "name": account_id,
            "plan": "per_minute",
            "caller_ids": numbers,
            "products": [{"product": "desktop", "kind": "license"}] if licence else [],
        },
    )
    assert status == 201, body
    if deposit_minor:
        assert (
            daemon.admin(
                "POST",
                f"/admin/accounts/{account_id}/deposits",
                {"amount_minor": deposit_minor, "reference": "d1"},
            )[0]
            == 201
        )


def balances(daemon: Daemon, account_id: str) -> tuple[int, int]:
    _, view = daemon.admin("GET", f"/admin/accounts/{account_id}")
    return view["bank_minutes"], view["deposit_minor"]


def test_minutes_are_posted_live_while_the_call_is_up(tmp_path):
    daemon = Daemon(tmp_path, env=daemon_env()).start()
    try:
        make_account(daemon, "acme", ["+14155550142"])
        # the agent became billable 150 s ago (Twilio's timestamps); the call is still up
        script = CallScript(
            1, dt.datetime.now(dt.UTC).replace(microsecond=0) - dt.timedelta(seconds=150)
        )
        script.join("customer", 0).join("agent:alice", 0)
        assert "<Conference" in post_twilio(daemon, "/twilio/voice", script.voice())[1]
        for params in script.events:
            assert post_twilio(daemon, "/twilio/conference", params)[0] == 204
        # billable 150 s: minutes 1, 2 and 3 are due; the tick posts them while the call is up
        wait_for(lambda: balances(daemon, "acme")[0] <= 42, "three minutes to be taken")
        assert balances(daemon, "acme") == (42, 0)  # not 41: minute 4 is due at 180 s
        _, view = daemon.admin("GET", f"/admin/calls/{script.call_sid}")
        assert view["status"] == "connected" and view["charges"]["bank_minutes"] == 3
    finally:
        assert daemon.stop() == 0


def _calls(count: int, base: dt.datetime) -> list[tuple[CallScript, int]]:
    """`count` calls, each with one agent billable for 60 * k + 30 seconds: k + 1 minutes."""
    scripts = []
    for n in range(count):
        k = n % 5
        script = CallScript(500 + n, base, from_number=f"+1415555{n:04d}")
        script.join("customer", 0).join("agent:a", 0)
        script.leave("agent:a", 60 * k + 30).end(60 * k + 30)
        scripts.append((script, k + 1))
    return scripts


def _deliver_starts(daemons: list[Daemon], scripts) -> None:
    for index, (script, _) in enumerate(scripts):
        daemon = daemons[index % len(daemons)]
        assert "<Conference" in post_twilio(daemon, "/twilio/voice", script.voice())[1]
        for params in script.events[:3]:  # conference start, customer and agent join
            assert post_twilio(daemon, "/twilio/conference", params)[0] == 204


def _deliver_ends(daemons: list[Daemon], scripts) -> None:
    for index, (script, _) in enumerate(scripts):
        daemon = daemons[(index + 1) % len(daemons)]
        for params in script.events[3:]:
            assert post_twilio(daemon, "/twilio/conference", params)[0] == 204
        for params in script.status_events:
            assert post_twilio(daemon, "/twilio/call-status", params)[0] == 204


def _assert_settled_exactly(daemon: Daemon, scripts, account_id: str, tmp_path) -> None:
    for script, minutes in scripts:
        view = wait_for(
            lambda s=script: (lambda v: v if v["settled_at"] else None)(
                daemon.admin("GET", f"/admin/calls/{s.call_sid}")[1]
            ),
            f"{script.call_sid} settled",
        )
        assert view["charges"]["deposit_minor"] == 100 * minutes, script.call_sid
        _, ledger = daemon.admin("GET", f"/admin/ledger?call_sid={script.call_sid}&limit=500")
        net = sum(
            p["amount"]
            for t in ledger["transactions"]
            for p in t["postings"]
            if p["book"] == "system:minutes:used"
        )
        assert net == minutes, script.call_sid
    total = sum(minutes for _, minutes in scripts)
    assert balances(daemon, account_id) == (0, 10**6 - 100 * total)
    check = run_cli(["ledger", "check"], daemon.env, tmp_path)
    assert check.returncode == 0, check.stdout


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_kill_9_while_metering_20_calls_loses_and_repeats_nothing(tmp_path, backend, request):
    env = daemon_env()
    if backend == "postgresql":
        env["METERD_DATABASE_URL"] = request.getfixturevalue("fresh_postgres_url")
    daemon = Daemon(tmp_path, env=env).start()
    numbers = [f"+1415555{n:04d}" for n in range(20)]
    make_account(daemon, "acme", numbers, deposit_minor=10**6, licence=False)
    base = dt.datetime.now(dt.UTC).replace(microsecond=0) - dt.timedelta(seconds=600)
    scripts = _calls(20, base)
    _deliver_starts([daemon], scripts)
    time.sleep(random.Random(3).uniform(0.2, 1.0))  # the tick is posting the backlog now
    daemon.kill()

    daemon = Daemon(tmp_path, env=env).start()
    try:
        _deliver_ends([daemon], scripts)
        # an uninterrupted run charges each call its k + 1 minutes at 1.00, nothing more
        _assert_settled_exactly(daemon, scripts, "acme", tmp_path)
    finally:
        assert daemon.stop() == 0


def test_two_daemons_on_one_postgresql_post_every_minute_once(tmp_path, fresh_postgres_url):
    env = daemon_env(
        METERD_DATABASE_URL=fresh_postgres_url, METERD_PIN_SECRET="shared-pin-secret-0123456789"
    )
    first = Daemon(tmp_path / "one", env=env).start()
    second = Daemon(tmp_path / "two", env=env).start()
    try:
        numbers = [f"+1415555{n:04d}" for n in range(20)]
        make_account(first, "acme", numbers, deposit_minor=10**6, licence=False)
        base = dt.datetime.now(dt.UTC).replace(microsecond=0) - dt.timedelta(seconds=600)
        scripts = _calls(20, base)
        _deliver_starts([first, second], scripts)
        _deliver_ends([second, first], scripts)
        _assert_settled_exactly(first, scripts, "acme", tmp_path)
    finally:
        assert first.stop() == 0
        assert second.stop() == 0


def test_a_broken_money_invariant_is_logged_and_stops_the_daemon(tmp_path):
    """Minute 1 of the call is already in the ledger with other content, behind meterd's back:
    meterd must not carry on over it; it logs why and exits non-zero for systemd to restart."""
    import asyncio

    from meterd.core import ledger
    from meterd.store import ledger_store
    from meterd.store.database import open_database

    daemon = Daemon(tmp_path, env=daemon_env()).start()
    make_account(daemon, "acme", ["+14155550142"], deposit_minor=10_000)
    script = CallScript(
        7, dt.datetime.now(dt.UTC).replace(microsecond=0) - dt.timedelta(seconds=30)
    )
    script.join("customer", 0).join("agent:alice", 0)

    async def plant_conflicting_minute() -> None:
        database = await open_database(
            f"sqlite+aiosqlite:///{tmp_path}/var/meterd.sqlite3", upgrade=False
        )
        try:
            async with database.write() as connection:
                await ledger_store.post(
                    connection,
                    ledger.transfer(
                        ledger.minute_key(script.call_sid, "alice", 1),
                        "tampered",
                        unit="USD",
                        amount=1,
                        from_book=ledger.deposit_book("acme"),
                        to_book=ledger.usage_revenue_book("USD"),
                        account_id="acme",
                    ),
                    dt.datetime.now(dt.UTC),
                )
        finally:
            await database.close()

    asyncio.run(plant_conflicting_minute())
    post_twilio(daemon, "/twilio/voice", script.voice())
    for params in script.events:
        post_twilio(daemon, "/twilio/conference", params)
    assert daemon.process.wait(30) == 3
    assert "money invariant broken" in daemon.log()
    assert ledger.minute_key(script.call_sid, "alice", 1) in daemon.log()
