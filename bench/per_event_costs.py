"""Per-event costs, counted in-process: SQL statements, transactions and CPU per webhook and per
call-minute, on SQLite and PostgreSQL. What bench/SCALING.md's model is built on.

    .venv/bin/python -m bench.per_event_costs [--backends sqlite,postgresql] [--calls 64]
                                              [--batch 64] [--minutes 5] [--append]

meterd's services are built by its own bootstrap (`build_services`) on a fresh database, with a
manual clock: no HTTP (the web edge runs no SQL), no scheduler. `calls` calls, one account each,
are answered by the voice webhook; the 8 conference callbacks of bench/ingest.py per call go
through the webhook intake and the group-commit writer: the first half of the calls one callback
at a time (batch 1), the second half `batch` callbacks at a time (all submitted before the writer
runs, so each batch is one transaction; checked). Then the metering tick runs as the clock moves:
the first tick after the callbacks (each call's 3 minutes due in one transaction), `minutes`
minute-by-minute ticks (one minute per call per transaction), 20 idle ticks, a wake-up by a
callback with no minute due, a 10-minute catch-up, and settlement.

Statements are counted by a SQLAlchemy `before_cursor_execute` listener (SQLite's `BEGIN
IMMEDIATE` left out: it is the transaction), commits (read transactions included) by the `commit`
event, write transactions by wrapping `Database.write`. The counts are deterministic; the CPU
columns (`time.process_time` of this process, aiosqlite's thread included; /proc CPU of this
database's PostgreSQL backends, 10 ms resolution) depend on the machine's load.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import os
import sys
import tempfile
import time
from collections import Counter
from urllib.parse import parse_qsl

import asyncpg
from multidict import MultiDict
from sqlalchemy import event

from bench import ingest
from bench._machine import append, machine
from meterd.bootstrap import Services, build_services
from meterd.clock import ManualClock
from meterd.config import load_settings
from meterd.logs import configure_logging
from meterd.metrics import Metrics
from meterd.simulate.wire import call_status_params, conference_params
from meterd.store.database import Database, open_database

RUN = 0x15
START = dt.datetime(2026, 12, 7, 15, 0, tzinfo=dt.UTC)
KINDS = ("SELECT", "FOR UPDATE", "INSERT", "UPDATE", "DELETE", "other")
COLUMNS = ("statements", *KINDS, "commits", "write tx", "CPU ms", "PG CPU ms")
Params = list[tuple[str, str]]
SETTINGS = {  # METERD_<name>; a loaded machine must not journal callbacks (wait 10 s)
    "ADMIN_TOKEN": ingest.ADMIN_TOKEN,
    "AGENTS_TOKEN": ingest.AGENTS_TOKEN,
    "FINANCE_TOKEN": "bench-finance-token-0123456789abcdef",
    "PIN_SECRET": ingest.PIN_SECRET,
    "TWILIO_AUTH_TOKEN": ingest.TWILIO_TOKEN,
    "PUBLIC_BASE_URL": ingest.PUBLIC_BASE_URL,
    "WEBHOOK_JOURNAL_WAIT_MS": "10000",
    "SETTLE_DELAY_SECONDS": "60",
}
LICENCE = [{"product": "desktop", "kind": "license"}]


def proc_ticks(pid: int) -> int:
    """User + system CPU clock ticks of a process (/proc/<pid>/stat), 0 if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0
    return int(fields[11]) + int(fields[12])


class Meter:
    """Counts what `database` runs; `phase()` yields a Counter of what ran inside it."""

    def __init__(self, database: Database, pg: asyncpg.Connection | None) -> None:
        self.counts: Counter[str] = Counter()
        self._pg = pg
        for engine in {database._writer, database._reader}:
            event.listen(engine.sync_engine, "before_cursor_execute", self._statement)
            event.listen(engine.sync_engine, "commit", self._commit)
        write = database.write

        @contextlib.asynccontextmanager
        async def counted_write():
            self.counts["write tx"] += 1
            async with write() as connection:
                yield connection

        database.write = counted_write

    def _statement(self, _conn, _cursor, statement: str, *_args) -> None:
        head = statement.lstrip().split(None, 1)[0].upper()
        if head != "BEGIN":
            kind = "FOR UPDATE" if "FOR UPDATE" in statement.upper() else head
            self.counts[kind if kind in KINDS else "other"] += 1
            self.counts["statements"] += 1

    def _commit(self, _conn) -> None:
        self.counts["commits"] += 1

    async def _pg_ticks(self) -> dict[int, int]:
        """CPU ticks of each PostgreSQL backend serving this database (this probe left out)."""
        if self._pg is None:
            return {}
        query = (
            "SELECT pid FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
        return {pid: proc_ticks(pid) for (pid,) in await self._pg.fetch(query)}

    @contextlib.asynccontextmanager
    async def phase(self):
        delta: Counter[str] = Counter()
        before, pg_before, cpu = self.counts.copy(), await self._pg_ticks(), time.process_time()
        yield delta
        delta["CPU ms"] = (time.process_time() - cpu) * 1000
        ticks = sum(t - pg_before.get(pid, 0) for pid, t in (await self._pg_ticks()).items())
        delta["PG CPU ms"] = ticks * 1000 / ingest.CLOCK_TICKS if self._pg else float("nan")
        delta.update(self.counts - before)


def decoded(body: bytes) -> Params:
    return parse_qsl(body.decode(), keep_blank_values=True)


async def take(services: Services, params: Params) -> str:
    route = "conference" if any(name == "ConferenceSid" for name, _ in params) else "call-status"
    return await services.intake.take(route, MultiDict(params), params)


async def take_all(services: Services, callbacks: list[Params]) -> None:
    """Every callback submitted before the writer runs: one batch, one transaction."""
    outcomes = await asyncio.gather(*(take(services, params) for params in callbacks))
    if set(outcomes) != {"applied"}:
        raise RuntimeError(f"callbacks not recorded in the database: {Counter(outcomes)}")


def conference(n: int, event: str, sequence: int, at: dt.datetime, leg: int, label: str) -> Params:
    """A callback of call n's conference; leg 0 is the customer, leg 1 the agent alice."""
    sid, muted = ingest.call_sid(RUN, n), event == "participant-mute"
    leg_sid = f"{sid[:-8]}{leg:08x}"
    params = conference_params(
        f"CF{sid[2:]}", sid, event, sequence, at, call_sid=leg_sid, label=label, muted=muted
    )
    return list(params.items())


async def measure(services: Services, meter: Meter, clock: ManualClock, args) -> list:
    calls, half, rows = args.calls, args.calls // 2, []

    def row(label: str, per: str, delta: Counter[str], n: int) -> None:
        rows.append((label, per, n, {c: delta[c] / n for c in COLUMNS}))

    async def tick(minutes_expected: bool | None = None) -> tuple[int, int]:
        report = await services.metering.tick()
        if report.errors or minutes_expected not in (None, bool(report.minutes_posted)):
            raise RuntimeError(f"unexpected tick: {report}")
        return report.minutes_posted, report.calls_settled

    numbers = [f"+1555{RUN:03d}{n:04d}" for n in range(calls)]
    for n, number in enumerate(numbers):
        account = {"account_id": f"acct{n}", "name": f"acct{n}", "plan": "per_minute"}
        await services.accounts.create(account | {"caller_ids": [number], "products": LICENCE})
        await services.accounts.grant_minutes(f"acct{n}", {"minutes": 10**6, "reference": "b"})
    async with meter.phase() as delta:
        for n in range(calls):
            voice = decoded(ingest.voice(RUN, n, numbers[n]).body)
            answer = await services.answering.incoming(MultiDict(voice), voice)
            if answer.action.value != "connect":
                raise RuntimeError(f"call {n} was not connected: {answer}")
    row("voice webhook (call set-up)", "call", delta, calls)

    clock.advance(100)  # the 8 callbacks are stamped START + 0 ... 90 s
    base = int(START.timestamp())
    scripts = [
        [decoded(p.body) for p in ingest.conference_events(RUN, n, base)] for n in range(calls)
    ]
    async with meter.phase() as delta:
        for script in scripts[:half]:
            for params in script:
                await take(services, params)
    row("conference callback, batch 1", "callback", delta, half * 8)
    queue = [scripts[n][k] for k in range(8) for n in range(half, calls)]
    batches = [queue[i : i + args.batch] for i in range(0, len(queue), args.batch)]
    async with meter.phase() as delta:
        for batch in batches:
            await take_all(services, batch)
    if delta["write tx"] != len(batches):
        raise RuntimeError(f"{len(batches)} batches took {delta['write tx']} transactions")
    row(f"conference callback, batch {args.batch}", "callback", delta, len(queue))
    row(f"conference callback, batch {args.batch}", f"batch of {args.batch}", delta, len(batches))

    async with meter.phase() as delta:
        minutes, _ = await tick(True)
    row("first tick after the callbacks (3 minutes a tx)", "call-minute", delta, minutes)
    async with meter.phase() as delta:
        minutes = 0
        for _ in range(args.minutes):
            clock.advance(60)
            minutes += (await tick(True))[0]
    row("metering minute by minute (1 minute a tx)", "call-minute", delta, minutes)
    async with meter.phase() as delta:
        for _ in range(20):
            clock.advance(1)
            await tick(False)
    row("idle tick (nothing due)", "tick", delta, 20)
    clock.advance(5)
    mute = "participant-mute"
    await take_all(
        services, [conference(n, mute, 9, clock.now, 0, "customer") for n in range(calls)]
    )
    async with meter.phase() as delta:
        await tick(False)
    row("wake-up by a callback, no minute due", "call", delta, calls)
    clock.advance(600)
    async with meter.phase() as delta:
        minutes, _ = await tick(True)
    row("catch-up after 10 minutes (10 minutes a tx)", "call-minute", delta, minutes)

    clock.advance(10)
    ends = []
    for n in range(calls):
        ends += [
            conference(n, "participant-leave", 10, clock.now, 1, "agent:alice"),
            conference(n, "participant-leave", 11, clock.now, 0, "customer"),
            conference(n, "conference-end", 12, clock.now, 0, "customer"),
            list(call_status_params(ingest.call_sid(RUN, n), "completed", 3, clock.now).items()),
        ]
    await take_all(services, ends)
    await tick()  # the calls' last live minutes
    clock.advance(61)
    async with meter.phase() as delta:
        settled = (await tick())[1]
    if settled != calls:
        raise RuntimeError(f"{settled} of {calls} calls settled")
    row("settlement (after the call's end)", "call", delta, calls)
    return rows


async def run_backend(backend: str, args) -> tuple[list, list[str]]:
    with tempfile.TemporaryDirectory(prefix="meterd-costs-") as tmp:
        async with contextlib.AsyncExitStack() as stack:
            pg = None
            if backend == "sqlite":
                url = f"sqlite+aiosqlite:///{tmp}/meterd.sqlite3"
            else:
                url = await stack.enter_async_context(ingest.fresh_postgres())
                pg = await asyncpg.connect(url.replace("postgresql+asyncpg", "postgresql"))
                stack.push_async_callback(pg.close)
            database = await open_database(url)
            stack.push_async_callback(database.close)
            clock = ManualClock(START)
            environ = {f"METERD_{k}": v for k, v in SETTINGS.items()}
            environ |= {"METERD_STATE_DIR": tmp, "METERD_DATABASE_URL": url}
            settings = load_settings(None, environ)
            services = build_services(settings, database, clock=clock, metrics=Metrics())
            rows = await measure(services, Meter(database, pg), clock, args)
            return rows, [] if pg is None else await stored(pg)


async def stored(pg: asyncpg.Connection) -> list[str]:
    """Bytes a row of the tables that grow with every event (PostgreSQL, indexes included)."""
    notes = []
    for name in ("webhook_events", "ledger_transactions", "ledger_postings"):
        rows = await pg.fetchval(f"SELECT count(*) FROM {name}")
        size = await pg.fetchval("SELECT pg_total_relation_size($1::regclass)", name)
        notes.append(f"{name} {size / rows:,.0f} bytes a row ({rows:,} rows, indexes included)")
    return notes


def table(results: dict[str, tuple[list, list[str]]]) -> list[str]:
    head = ["backend", "event", "per", "n", *COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for backend, (rows, _) in results.items():
        for label, per, n, values in rows:
            cells = [f"{values[c]:.3f}".rstrip("0").rstrip(".") for c in COLUMNS[:-2]]
            cells += [f"{values[c]:.2f}" for c in COLUMNS[-2:]]
            lines.append(f"| {backend} | {label} | {per} | {n} | " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", default="sqlite,postgresql")
    parser.add_argument("--calls", type=int, default=64)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--minutes", type=int, default=5)
    parser.add_argument("--append", action="store_true", help="append the table to RESULTS.md")
    args = parser.parse_args()
    configure_logging("warning", stream=sys.stderr)
    results = {b: asyncio.run(run_backend(b, args)) for b in args.backends.split(",")}
    lines = [
        f"`python -m bench.per_event_costs --calls {args.calls} --batch {args.batch} "
        f"--minutes {args.minutes}`: counts per event (deterministic); CPU ms per event with "
        f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores (indicative only)",
        "",
        *table(results),
        "",
        *(f"- {b}: {note}" for b, (_, notes) in results.items() for note in notes),
    ]
    if args.append:
        append("Per-event costs: SQL statements, transactions, CPU per webhook and minute", lines)
    else:
        print(machine(), "", *lines, sep="\n")


if __name__ == "__main__":
    main()
