"""The nightly usage report over a day of N ledger entries (postings), on SQLite and PostgreSQL:
wall time and peak memory of building, checking and publishing the day.

    .venv/bin/python -m bench.usage_report [--postgres URL] [--entries N [N ...]]

The day is bulk-loaded with SQL for setup speed (the balance trigger is off during the load and
the balances are summed once after): `ACCOUNTS` accounts, each with minutes and money paid in
the day before; then calls of 10 agent-minutes each (5 from the bank: 2 postings per minute, 5
from the deposit: 4 postings), every one settled that day with its 7 webhooks, until the day
holds N postings. The report is then built in a fresh process, so its peak RSS is its own:
`meterd usage --date` does the same work (the whole-ledger invariant check, the per-account
aggregates, the per-call stream with each call's timeline, the files, the run).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import resource
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg

from bench._machine import append
from meterd.store.database import open_database

ACCOUNTS = 1000
MINUTES_PER_CALL = 10  # 5 from the bank, 5 from the deposit
POSTINGS_PER_CALL = 5 * 2 + 5 * 4
RATE_MINOR = 100
DAY = dt.date(2026, 11, 20)
# issue 8: the nightly report over 1,000,000 ledger entries in <= 10 s and <= 200 MB
TARGET_ENTRIES = 1_000_000
TARGET_SECONDS = 10
TARGET_BYTES = 200 * 10**6
DAY_START = dt.datetime(2026, 11, 20, tzinfo=dt.UTC)
SYSTEM_BOOKS = [
    ("system:minutes:issued", "agent_minute"),
    ("system:minutes:used", "agent_minute"),
    ("system:minutes:unbanked", "agent_minute"),
    ("system:USD:deposits_received", "USD"),
    ("system:USD:usage_revenue", "USD"),
]


def sid(prefix: str, n: int) -> str:
    return f"{prefix}{n:032x}"


class Rows:
    """The day's rows, as tuples in the tables' column order, generated lazily."""

    def __init__(self, entries: int) -> None:
        self.calls = max(1, (entries - ACCOUNTS * 4) // POSTINGS_PER_CALL)
        self.postings = ACCOUNTS * 4 + self.calls * POSTINGS_PER_CALL

    def account_rows(self) -> Iterator[dict[str, Any]]:
        created = DAY_START - dt.timedelta(days=10)
        for a in range(ACCOUNTS):
            yield {
                "account_id": f"acct{a:04d}",
                "name": f"Account {a}",
                "plan": "per_minute",
                "fallback_plan": "per_minute",
                "currency": "USD",
                "products_json": "[]",
                "debt_flagged": False,
                "created_at": created,
                "updated_at": created,
            }

    def books(self) -> Iterator[dict[str, Any]]:
        for book, unit in SYSTEM_BOOKS:
            yield {"book": book, "unit": unit, "kind": "system", "allow_negative": True}
        for a in range(ACCOUNTS):
            account = f"acct{a:04d}"
            for kind, unit in (("bank", "agent_minute"), ("deposit", "USD")):
                yield {
                    "book": f"customer:{account}:{kind}",
                    "unit": unit,
                    "kind": kind,
                    "account_id": account,
                    "allow_negative": False,
                }

    def _call_start(self, c: int) -> dt.datetime:
        return DAY_START + dt.timedelta(seconds=(c * 79_000) // self.calls)

    def ledger(self) -> Iterator[tuple[dict[str, Any], list[dict[str, Any]]]]:
        """(transaction, its postings), ids in order."""
        opened = DAY_START - dt.timedelta(hours=12)
        calls_per_account = -(-self.calls // ACCOUNTS)
        for a in range(ACCOUNTS):
            account = f"acct{a:04d}"
            yield (
                _transaction(
                    f"account:{account}:minutes:stock", "minutes_granted", account, None, opened
                ),
                [
                    ("system:minutes:issued", "agent_minute", -5 * calls_per_account),
                    (f"customer:{account}:bank", "agent_minute", 5 * calls_per_account),
                ],
            )
            money = 5 * RATE_MINOR * calls_per_account
            yield (
                _transaction(f"account:{account}:deposit:stock", "deposit", account, None, opened),
                [
                    ("system:USD:deposits_received", "USD", -money),
                    (f"customer:{account}:deposit", "USD", money),
                ],
            )
        for c in range(self.calls):
            account, call_sid, start = (
                f"acct{c % ACCOUNTS:04d}",
                sid("CA", c + 1),
                self._call_start(c),
            )
            for n in range(1, MINUTES_PER_CALL + 1):
                posted = start + dt.timedelta(seconds=60 * (n - 1))
                key = f"call:{call_sid}:agent:a{c % 50}:minute:{n}"
                legs = [("system:minutes:used", "agent_minute", 1)]
                if n <= 5:
                    kind = "minute_bank"
                    legs.append((f"customer:{account}:bank", "agent_minute", -1))
                else:
                    kind = "minute_deposit"
                    legs += [
                        ("system:minutes:unbanked", "agent_minute", -1),
                        (f"customer:{account}:deposit", "USD", -RATE_MINOR),
                        ("system:USD:usage_revenue", "USD", RATE_MINOR),
                    ]
                yield _transaction(key, kind, account, call_sid, posted), legs

    def calls_and_events(self) -> Iterator[tuple[dict[str, Any], list[dict[str, Any]]]]:
        for c in range(self.calls):
            call_sid, start = sid("CA", c + 1), self._call_start(c)
            end = start + dt.timedelta(seconds=60 * MINUTES_PER_CALL)
            call = {
                "call_sid": call_sid,
                "account_id": f"acct{c % ACCOUNTS:04d}",
                "plan": "per_minute",
                "status": "ended",
                "from_number": "+14155550100",
                "pin_attempts": 0,
                "started_at": start,
                "ended_at": end,
                "end_reason": "completed",
                "closed_by_sweeper": False,
                "last_event_at": end,
                "settled_at": end + dt.timedelta(seconds=300),
                "pay_attempts": 0,
            }
            agent_leg = sid("CA", 10**9 + c)
            timeline = [
                ("conference-start", start, "", ""),
                ("participant-join", start, call_sid, "customer"),
                ("participant-join", start, agent_leg, f"agent:a{c % 50}"),
                ("participant-leave", end, agent_leg, f"agent:a{c % 50}"),
                ("participant-leave", end, call_sid, "customer"),
                ("conference-end", end, "", ""),
            ]
            events = [
                {
                    "dedup_key": f"conference:{call_sid}:{seq}",
                    "route": "conference",
                    "call_sid": call_sid,
                    "kind": kind,
                    "sequence_number": seq,
                    "event_at": at,
                    "participant_sid": participant or None,
                    "label": label or None,
                    "hold": None,
                    "params_json": "[]",
                    "received_at": at,
                }
                for seq, (kind, at, participant, label) in enumerate(timeline)
            ]
            events.append(
                {
                    "dedup_key": f"call-status:{call_sid}:completed",
                    "route": "call-status",
                    "call_sid": call_sid,
                    "kind": "completed",
                    "sequence_number": 0,
                    "event_at": end,
                    "participant_sid": None,
                    "label": None,
                    "hold": None,
                    "params_json": "[]",
                    "received_at": end,
                }
            )
            yield call, events


def _transaction(
    key: str, kind: str, account: str, call_sid: str | None, posted_at: dt.datetime
) -> dict[str, Any]:
    return {
        "idempotency_key": key,
        "fingerprint": "0" * 64,
        "kind": kind,
        "account_id": account,
        "call_sid": call_sid,
        "reverses_key": None,
        "memo": "",
        "posted_at": posted_at,
    }


ACCOUNT_COLUMNS = [
    "account_id", "name", "plan", "fallback_plan", "currency", "products_json",
    "debt_flagged", "created_at", "updated_at",
]  # fmt: skip
BOOK_COLUMNS = ["book", "unit", "kind", "account_id", "allow_negative", "balance"]
TRANSACTION_COLUMNS = [
    "transaction_id", "idempotency_key", "fingerprint", "kind", "account_id", "call_sid",
    "reverses_key", "memo", "posted_at",
]  # fmt: skip
POSTING_COLUMNS = ["posting_id", "transaction_id", "book", "unit", "amount"]
CALL_COLUMNS = [
    "call_sid", "account_id", "plan", "status", "from_number", "pin_attempts", "started_at",
    "ended_at", "end_reason", "closed_by_sweeper", "last_event_at", "settled_at", "pay_attempts",
]  # fmt: skip
EVENT_COLUMNS = [
    "dedup_key", "route", "call_sid", "kind", "sequence_number", "event_at", "participant_sid",
    "label", "hold", "params_json", "received_at",
]  # fmt: skip


def _tables(rows: Rows) -> dict[str, tuple[list[str], Iterator[tuple[Any, ...]]]]:
    """Every table's rows as tuples, ids assigned in order."""

    def books() -> Iterator[tuple[Any, ...]]:
        for b in rows.books():
            yield (b["book"], b["unit"], b["kind"], b.get("account_id"), b["allow_negative"], 0)

    def transactions() -> Iterator[tuple[Any, ...]]:
        for n, (t, _) in enumerate(rows.ledger(), 1):
            yield (n, *(t[c] for c in TRANSACTION_COLUMNS[1:]))

    def postings() -> Iterator[tuple[Any, ...]]:
        posting_id = 0
        for n, (_, legs) in enumerate(rows.ledger(), 1):
            for book, unit, amount in legs:
                posting_id += 1
                yield (posting_id, n, book, unit, amount)

    return {
        "accounts": (
            ACCOUNT_COLUMNS,
            (tuple(a[c] for c in ACCOUNT_COLUMNS) for a in rows.account_rows()),
        ),
        "ledger_books": (BOOK_COLUMNS, books()),
        "ledger_transactions": (TRANSACTION_COLUMNS, transactions()),
        "ledger_postings": (POSTING_COLUMNS, postings()),
        "calls": (
            CALL_COLUMNS,
            (tuple(c[k] for k in CALL_COLUMNS) for c, _ in rows.calls_and_events()),
        ),
        "webhook_events": (
            EVENT_COLUMNS,
            (
                tuple(e[k] for k in EVENT_COLUMNS)
                for _, events in rows.calls_and_events()
                for e in events
            ),
        ),
    }


def _sqlite_value(value: Any) -> Any:
    if isinstance(value, dt.datetime):  # SQLAlchemy's SQLite text form, naive UTC
        return value.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S.%f")
    if isinstance(value, bool):
        return int(value)
    return value


# What the trigger would have kept: customer books' running balances (system books keep none,
# their stored balance stays 0: migration 0006).
SUM_BALANCES = (
    "UPDATE ledger_books SET balance = COALESCE((SELECT SUM(amount) FROM ledger_postings "
    "WHERE ledger_postings.book = ledger_books.book), 0) "
    "WHERE substr(ledger_books.book, 1, 7) <> 'system:'"
)


def load_sqlite(path: Path, rows: Rows) -> None:
    connection = sqlite3.connect(path)
    connection.execute("PRAGMA synchronous=OFF")  # the load only; meterd itself uses FULL
    (move_balance,) = connection.execute(  # put back exactly as the migrations made it
        "SELECT sql FROM sqlite_master WHERE type = 'trigger' "
        "AND name = 'ledger_postings_move_balance'"
    ).fetchone()
    connection.execute("DROP TRIGGER ledger_postings_move_balance")
    for table, (columns, values) in _tables(rows).items():
        marks = ", ".join("?" for _ in columns)
        connection.executemany(
            f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({marks})",
            (tuple(_sqlite_value(v) for v in row) for row in values),
        )
    connection.execute(SUM_BALANCES)
    connection.execute(move_balance)
    connection.commit()
    connection.execute("ANALYZE")
    connection.close()


async def load_postgres(dsn: str, rows: Rows) -> None:
    connection = await asyncpg.connect(dsn)
    try:
        await connection.execute(
            "ALTER TABLE ledger_postings DISABLE TRIGGER ledger_postings_move_balance"
        )
        for table, (columns, values) in _tables(rows).items():
            await connection.copy_records_to_table(table, records=values, columns=columns)
        await connection.execute(SUM_BALANCES)
        await connection.execute(
            "ALTER TABLE ledger_postings ENABLE TRIGGER ledger_postings_move_balance"
        )
        await connection.execute("ANALYZE")
    finally:
        await connection.close()


# --- the measurement, in a process of its own --------------------------------------------------


async def measure(url: str, state_dir: Path) -> dict[str, Any]:
    from meterd.services.ledger_check import check_ledger
    from meterd.services.usage import UsageFile, UsageService, UsageSettings

    database = await open_database(url)
    try:
        clock = lambda: DAY_START + dt.timedelta(days=1, minutes=30)  # noqa: E731
        service = UsageService(database, UsageSettings(state_dir, "UTC", 60, 120), clock)
        rss_before_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        load_before = os.getloadavg()[0]  # other work on the machine skews the figures
        started = time.perf_counter()
        report = await check_ledger(database)
        check_seconds = time.perf_counter() - started
        assert report.ok, report.breaches
        started = time.perf_counter()
        await service.build(DAY)  # checks the ledger again, builds, publishes
        build_seconds = time.perf_counter() - started
        rss_after_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        calls_csv = service.path(DAY, UsageFile.CALLS_CSV)
        started = time.perf_counter()
        await service.build(DAY, regenerate=True)
        regenerate_seconds = time.perf_counter() - started
        return {
            "check_seconds": check_seconds,
            "build_seconds": build_seconds,
            "regenerate_seconds": regenerate_seconds,
            "rss_before_kib": rss_before_kib,
            "load_before": load_before,
            "rss_peak_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
            "rss_after_build_kib": rss_after_kib,
            "calls_csv_bytes": calls_csv.stat().st_size,
            "call_rows": sum(1 for _ in calls_csv.open("rb")) - 1,
        }
    finally:
        await database.close()


def _measure_in_child(url: str, state_dir: Path) -> dict[str, Any]:
    result = subprocess.run(
        [sys.executable, "-m", "bench.usage_report", "--measure", url, str(state_dir)],
        capture_output=True,
        text=True,
        check=False,
        cwd=Path(__file__).parent.parent,
    )
    if result.returncode != 0:
        raise RuntimeError(result.stderr)
    return json.loads(result.stdout.strip().splitlines()[-1])


async def run_backend(
    backend: str, postgres: str, entries: int
) -> tuple[Rows, dict[str, Any], float]:
    rows = Rows(entries)
    with tempfile.TemporaryDirectory() as directory:
        state_dir = Path(directory)
        if backend == "sqlite":
            url = f"sqlite+aiosqlite:///{directory}/bench.sqlite3"
            await (await open_database(url)).close()  # migrate
            started = time.perf_counter()
            load_sqlite(Path(directory) / "bench.sqlite3", rows)
            load_seconds = time.perf_counter() - started
            return rows, _measure_in_child(url, state_dir), load_seconds
        name = f"meterd_bench_{uuid.uuid4().hex[:8]}"
        admin = await asyncpg.connect(postgres)
        await admin.execute(f"CREATE DATABASE {name}")
        try:
            base = postgres.rsplit("/", 1)[0].split("://", 1)[1]
            url = f"postgresql+asyncpg://{base}/{name}"
            await (await open_database(url)).close()
            started = time.perf_counter()
            await load_postgres(f"postgresql://{base}/{name}", rows)
            load_seconds = time.perf_counter() - started
            return rows, _measure_in_child(url, state_dir), load_seconds
        finally:
            await admin.execute(f"DROP DATABASE {name} WITH (FORCE)")
            await admin.close()


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--postgres", default="postgresql://postgres@127.0.0.1:5432/test")
    parser.add_argument("--entries", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--measure", nargs=2, metavar=("URL", "STATE_DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(await measure(args.measure[0], Path(args.measure[1]))))
        return
    lines = [
        "| backend | postings in the day | calls | build + publish s | of which ledger check s "
        "| regenerate s | peak RSS MiB (before the report) | calls.csv MiB |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    notes: list[str] = []
    for entries in args.entries:
        for backend, label in (
            ("sqlite", "SQLite (WAL, synchronous=FULL)"),
            ("postgresql", "PostgreSQL 15 (asyncpg)"),
        ):
            rows, m, load_seconds = await run_backend(backend, args.postgres, entries)
            print(
                f"{label} {rows.postings:,} postings: loaded in {load_seconds:.0f} s; {m}",
                file=sys.stderr,
            )
            if rows.postings >= TARGET_ENTRIES:
                met = (
                    m["build_seconds"] <= TARGET_SECONDS
                    and m["rss_peak_kib"] * 1024 <= TARGET_BYTES
                )
                notes.append(
                    f"{label}, {rows.postings:,} postings: target (issue 8: <= {TARGET_SECONDS} s "
                    f"and <= {TARGET_BYTES // 10**6} MB) {'met' if met else 'MISSED'}; 1-minute "
                    f"load average before the report {m['load_before']:.2f} on "
                    f"{os.cpu_count()} cores"
                )
            lines.append(
                f"| {label} | {rows.postings:,} | {rows.calls:,} | {m['build_seconds']:.1f} "
                f"| {m['check_seconds']:.1f} | {m['regenerate_seconds']:.1f} "
                f"| {m['rss_peak_kib'] / 1024:.0f} ({m['rss_before_kib'] / 1024:.0f}) "
                f"| {m['calls_csv_bytes'] / 2**20:.1f} |"
            )
    append(
        f"Usage report: one business day of {ACCOUNTS:,} accounts and {MINUTES_PER_CALL}-minute "
        "settled calls (build, check, publish; then regenerate and compare), in a fresh process",
        lines + ([""] + [f"- {note}" for note in notes] if notes else []),
    )


if __name__ == "__main__":
    asyncio.run(main())
