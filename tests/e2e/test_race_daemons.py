"""Issue 11, acceptance 4: two real `meterd run` daemons on one PostgreSQL database, with waivers
and settlement racing the live tick on both, for a bounded time (METERD_RACE_SECONDS, default
20 s; the closing note quotes a 5-minute run):

    METERD_RACE_SECONDS=300 .venv/bin/pytest tests/e2e/test_race_daemons.py

Calls of two per-minute accounts and one per-incident account, 1 to 3 agents each, are started
with their agents already billable for a while (Twilio's timestamps), so a backlog of minutes is
due at once and one more minute falls due while the call is up; webhooks go to either daemon.
About a quarter of the calls are waived while up (near the moment the tick posts a minute), about
a fifth just after they end (racing their settlement, `settle_delay_seconds` = 2). Then:

- neither daemon logged `deadlock detected` (or any error), no request got a 5xx, both stop 0;
- every idempotency key is unique, and every minute of every call's final timeline is posted
  exactly once: for each (call, agent, n) at most one transaction stands (not reversed; a minute
  rebooked onto the bank counts once), exactly one for n <= the agent's minutes on a call that
  is not waived, none beyond; a waived call has no charge left;
- each call's net `system:minutes:used` is its timeline's agent-minutes (not waived), and each
  account's money is exactly its calls' (bank minutes + deposit / rate, incidents x price);
- `meterd ledger check` passes.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import random
import re
import threading
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import asyncpg

from meterd.core.ledger import live_minute_key
from tests.call_scripts import CallScript

from .daemon import Daemon, run_cli
from .test_call_timelines import AGENTS_TOKEN, post_twilio
from .test_metering_daemon import daemon_env

RACE_SECONDS = float(os.environ.get("METERD_RACE_SECONDS", "20"))
CALL_EVERY_SECONDS = 0.7
SETTLE_TIMEOUT_SECONDS = 120
RATE_MINOR = 100
INCIDENT_MINOR = 5000
INCLUDED = 45
DEPOSIT_MINOR = 10**7
ACCOUNTS = {"pm1": "per_minute", "pm2": "per_minute", "pi1": "per_incident"}
NUMBERS = {
    account: [f"+1415{k:03d}{n:04d}" for n in range(4)] for k, account in enumerate(ACCOUNTS)
}
MINUTE_KEY = re.compile(r"^call:(?P<sid>[^:]+):agent:(?P<agent>.+):minute:(?P<n>\d+)$")


@dataclass
class Race:
    daemons: list[Daemon]
    rng: random.Random
    lock: threading.Lock = field(default_factory=threading.Lock)
    calls: dict[str, tuple[CallScript, str, str]] = field(
        default_factory=dict
    )  # sid: (.., account, waive)
    statuses: Counter[str] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)

    def pick(self) -> Daemon:
        with self.lock:
            return self.rng.choice(self.daemons)

    def record(self, what: str, status: int, body: object, expected: int) -> None:
        with self.lock:
            self.statuses[f"{what} {status}"] += 1
            if status != expected:
                self.failures.append(f"{what}: {status} {str(body)[:300]}")

    def twilio(self, path: str, params: dict[str, str], expected: int = 204) -> None:
        status, body = post_twilio(self.pick(), path, params)
        self.record(path, status, body, expected)

    def waive(self, script: CallScript) -> None:
        body = {"call_sid": script.call_sid, "agent_id": "a1", "reason": "goodwill"}
        status, answer = self.pick().request("POST", "/agents/waiver", body, token=AGENTS_TOKEN)
        self.record("/agents/waiver", status, answer, 200)


def _play_call(race: Race, n: int, account: str, seed: int) -> None:
    """One live call: agents billable for a while already; up for `life` seconds, during which
    one more minute falls due (`due_in` seconds in); maybe waived during or after."""
    rng = random.Random(seed)
    life = rng.uniform(4, 10)
    due_in = rng.uniform(1, life - 1)
    minutes_before = rng.randint(0, 3)
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    base = now - dt.timedelta(seconds=60 * (minutes_before + 1) - due_in)
    script = CallScript(n, base, from_number=rng.choice(NUMBERS[account]))
    agents = [f"agent:a{k}" for k in range(1, rng.randint(1, 3) + 1)]
    script.join("customer", 0)
    for k, agent in enumerate(agents):
        script.join(agent, 0 if k == 0 else rng.randint(0, 60 * minutes_before + 30))
    waive = rng.choices(["none", "during", "after"], weights=[55, 25, 20])[0]
    with race.lock:
        race.calls[script.call_sid] = (script, account, waive)

    status, twiml = post_twilio(race.pick(), "/twilio/voice", script.voice())
    race.record("/twilio/voice", status, twiml, 200)
    if "<Conference" not in twiml:
        race.failures.append(f"{script.call_sid} not connected: {twiml[:300]}")
        return
    for params in script.events:
        race.twilio("/twilio/conference", params)
    sent = len(script.events)
    started = time.monotonic()
    if waive == "during":  # around the moment the next minute falls due
        time.sleep(max(0.0, due_in + rng.uniform(-0.6, 0.6)))
        race.waive(script)
    time.sleep(max(0.0, life - (time.monotonic() - started)))
    end = int((dt.datetime.now(dt.UTC) - base).total_seconds())
    for agent in agents:
        script.leave(agent, end)
    script.end(end)
    for params in script.events[sent:]:
        race.twilio("/twilio/conference", params)
    for params in script.status_events:
        race.twilio("/twilio/call-status", params)
    if waive == "after":  # settlement is due 2 s after the end
        time.sleep(rng.uniform(0.5, 3.5))
        race.waive(script)


def _make_accounts(daemon: Daemon) -> None:
    for account, plan in ACCOUNTS.items():
        status, body = daemon.admin(
            "POST",
            "/admin/accounts",
            {
                "account_id": account,
                "name": account,
                "plan": plan,
                "caller_ids": NUMBERS[account],
                "products": [{"product": "desktop", "kind": "license"}],
            },
        )
        assert status == 201, body
        status, body = daemon.admin(
            "POST",
            f"/admin/accounts/{account}/deposits",
            {"amount_minor": DEPOSIT_MINOR, "reference": "race"},
        )
        assert status == 201, body


def _settled_views(daemon: Daemon, sids: list[str]) -> dict[str, dict]:
    views: dict[str, dict] = {}
    deadline = time.monotonic() + SETTLE_TIMEOUT_SECONDS
    while len(views) < len(sids) and time.monotonic() < deadline:
        for sid in sids:
            if sid not in views:
                status, view = daemon.admin("GET", f"/admin/calls/{sid}")
                if status == 200 and view["settled_at"]:
                    views[sid] = view
        time.sleep(0.5)
    missing = sorted(set(sids) - set(views))
    assert not missing, f"{len(missing)} calls never settled, e.g. {missing[:5]}"
    return views


async def _ledger(url: str) -> dict:
    connection = await asyncpg.connect("postgresql://" + url.split("://", 1)[1])
    try:
        keys = await connection.fetch(
            "SELECT idempotency_key, kind, call_sid, reverses_key FROM ledger_transactions"
        )
        used = await connection.fetch(
            "SELECT t.call_sid, sum(p.amount) AS used FROM ledger_postings p "
            "JOIN ledger_transactions t USING (transaction_id) "
            "WHERE p.book = 'system:minutes:used' GROUP BY t.call_sid"
        )
        balances = await connection.fetch("SELECT book, balance FROM ledger_books")
    finally:
        await connection.close()
    return {
        "keys": [dict(row) for row in keys],
        "used": {row["call_sid"]: int(row["used"]) for row in used},
        "balances": {row["book"]: int(row["balance"]) for row in balances},
    }


def _check_minutes(race: Race, views: dict[str, dict], ledger: dict) -> list[str]:
    problems: list[str] = []
    keys = [row["idempotency_key"] for row in ledger["keys"]]
    duplicated = [key for key, count in Counter(keys).items() if count > 1]
    if duplicated:
        problems.append(f"idempotency keys not unique: {duplicated[:5]}")
    reversed_keys = {row["reverses_key"] for row in ledger["keys"] if row["reverses_key"]}
    standing: dict[tuple[str, str, int], int] = defaultdict(int)  # (sid, agent, n): count
    posted: set[tuple[str, str, int]] = set()
    for row in ledger["keys"]:
        key = row["idempotency_key"]
        match = MINUTE_KEY.match(live_minute_key(key))
        if match is None or row["reverses_key"]:
            continue
        minute = (match["sid"], match["agent"], int(match["n"]))
        posted.add(minute)
        if key not in reversed_keys:
            standing[minute] += 1
    spent: dict[str, int] = defaultdict(int)  # per account: minutes (per-minute) or incidents
    for sid, (_, account, _) in race.calls.items():
        view = views[sid]
        waived = view["charges"]["waived"]
        minutes = {agent: time["agent_minutes"] for agent, time in view["agents"].items()}
        for agent, count in minutes.items():
            for n in range(1, count + 1):
                if (sid, agent, n) not in posted:
                    problems.append(f"{sid} {agent} minute {n} never posted")
                # a waived call's charged minutes are reversed, its later ones stand at no charge
                allowed = {0, 1} if waived else {1}
                if standing[(sid, agent, n)] not in allowed:
                    problems.append(f"{sid} {agent} minute {n} stands {standing[(sid, agent, n)]}x")
        beyond = [
            m for m, c in standing.items() if m[0] == sid and c and m[2] > minutes.get(m[1], 0)
        ]
        if beyond:
            problems.append(f"{sid}: minutes beyond the timeline stand: {beyond}")
        charges = view["charges"]
        if waived:
            left = {k: v for k, v in charges.items() if k != "waived" and v}
            if left:
                problems.append(f"{sid} waived but still charged {left}")
            continue
        total = sum(minutes.values())
        if ledger["used"].get(sid, 0) != total:
            problems.append(f"{sid}: ledger minutes {ledger['used'].get(sid, 0)}, timeline {total}")
        if ACCOUNTS[account] == "per_minute":
            paid = charges["bank_minutes"] + charges["deposit_minor"] / RATE_MINOR
            if paid != total:
                problems.append(f"{sid}: paid {charges}, timeline {total} minutes")
            spent[account] += total
        else:
            if charges["incidents"] != (1 if total else 0):
                problems.append(f"{sid}: {charges['incidents']} incidents")
            spent[account] += charges["incidents"]
    for account, plan in ACCOUNTS.items():
        bank = ledger["balances"][f"customer:{account}:bank"]
        deposit = ledger["balances"][f"customer:{account}:deposit"]
        if plan == "per_minute":
            paid = (INCLUDED - bank) + (DEPOSIT_MINOR - deposit) / RATE_MINOR
        else:
            paid = (DEPOSIT_MINOR - deposit) / INCIDENT_MINOR
        if paid != spent[account]:
            problems.append(
                f"{account}: bank {bank}, deposit {deposit}; calls spent {spent[account]}"
            )
    return problems


TICK_OVERRUN = "skipped: maximum number of running instances reached"  # APScheduler, plain text


def _error_lines(log: str) -> list[str]:
    """Lines logged at error or critical, and any other line that is not JSON (a traceback),
    except APScheduler's note that a tick was skipped because the last one still ran."""
    errors = []
    for line in log.splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            if TICK_OVERRUN not in line:
                errors.append(line)
            continue
        if not isinstance(entry, dict) or entry.get("level") in ("error", "critical"):
            errors.append(line)
    return errors


def test_two_daemons_waivers_and_settlement_racing_the_tick(tmp_path, fresh_postgres_url):
    env = daemon_env(
        METERD_DATABASE_URL=fresh_postgres_url,
        METERD_PIN_SECRET="shared-pin-secret-0123456789",
        METERD_INCIDENT_PRICE_MINOR=str(INCIDENT_MINOR),
        METERD_RATE_PER_AGENT_MINUTE_MINOR=str(RATE_MINOR),
    )
    daemons = [
        Daemon(tmp_path / "one", env=env).start(),
        Daemon(tmp_path / "two", env=env).start(),
    ]
    race = Race(daemons, random.Random(11))
    stopped: list[int] = []
    try:
        _make_accounts(daemons[0])
        deadline = time.monotonic() + RACE_SECONDS
        n = 10_000
        with ThreadPoolExecutor(max_workers=24) as pool:
            futures = []
            while time.monotonic() < deadline:
                n += 1
                account = race.rng.choice(list(ACCOUNTS))
                futures.append(pool.submit(_play_call, race, n, account, race.rng.getrandbits(32)))
                time.sleep(CALL_EVERY_SECONDS)
            for future in futures:
                future.result()
        views = _settled_views(daemons[0], sorted(race.calls))
    finally:
        for daemon in daemons:
            stopped.append(daemon.stop())
    logs = {daemon.log_path.name: daemon.log() for daemon in daemons}

    deadlocks = {name: log.count("deadlock detected") for name, log in logs.items()}
    errors = [f"{name}: {line[:400]}" for name, log in logs.items() for line in _error_lines(log)]
    waives = Counter(waive for _, _, waive in race.calls.values())
    overruns = sum(log.count(TICK_OVERRUN) for log in logs.values())
    print(
        f"\n{len(race.calls)} calls in {RACE_SECONDS:.0f} s ({dict(waives)}); "
        f"requests {dict(race.statuses)}; deadlocks {deadlocks}; {len(errors)} error lines; "
        f"ticks skipped while the last one ran {overruns}"
    )
    assert sum(deadlocks.values()) == 0, "\n".join(errors[:20])
    assert not race.failures, race.failures[:20]
    assert errors == [], "\n".join(errors[:20])
    assert stopped == [0, 0]

    ledger = asyncio.run(_ledger(fresh_postgres_url))
    problems = _check_minutes(race, views, ledger)
    assert not problems, f"{len(problems)} problems:\n" + "\n".join(problems[:40])

    check = run_cli(["ledger", "check"], daemons[0].env, tmp_path)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "ledger OK" in check.stdout
