"""Ledger posting throughput on SQLite and PostgreSQL: one balanced transaction per commit,
from N concurrent coroutines, with the idempotency key claimed in the same transaction.

    .venv/bin/python -m bench.ledger_posting [--postgres URL] [--transactions N]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
import uuid

import asyncpg

from bench._machine import append
from meterd.clock import system_clock
from meterd.core import ledger
from meterd.core.ledger import MINUTES
from meterd.services.accounts import AccountService, AccountSettings
from meterd.store import ledger_store
from meterd.store.database import open_database

CONCURRENCY = 8


async def run(url: str, transactions: int) -> tuple[float, float, float]:
    database = await open_database(url)
    accounts = AccountService(
        database, AccountSettings("USD", 0, "bench-pin-secret-0123"), system_clock
    )
    await accounts.create({"account_id": "bench", "name": "bench", "plan": "per_minute"})
    await accounts.grant_minutes("bench", {"minutes": transactions, "reference": "stock"})
    latencies: list[float] = []
    queue: asyncio.Queue[int] = asyncio.Queue()
    for n in range(transactions):
        queue.put_nowait(n)

    async def worker() -> None:
        while not queue.empty():
            n = queue.get_nowait()
            started = time.perf_counter()
            async with database.write() as connection:
                await ledger_store.post(
                    connection,
                    ledger.transfer(
                        f"call:CAbench:agent:a:minute:{n}",
                        "minutes_used",
                        unit=MINUTES,
                        amount=1,
                        from_book=ledger.bank_book("bench"),
                        to_book=ledger.MINUTES_USED,
                        account_id="bench",
                    ),
                    system_clock(),
                )
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    elapsed = time.perf_counter() - started
    await database.close()
    latencies.sort()
    return (
        transactions / elapsed,
        statistics.median(latencies) * 1000,
        latencies[int(len(latencies) * 0.99)] * 1000,
    )


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--postgres", default="postgresql://postgres@127.0.0.1:5432/test")
    parser.add_argument("--transactions", type=int, default=3000)
    args = parser.parse_args()
    rows = ["| backend | transactions/s | p50 ms | p99 ms |", "| --- | --- | --- | --- |"]
    with tempfile.TemporaryDirectory() as directory:
        rate, p50, p99 = await run(
            f"sqlite+aiosqlite:///{directory}/bench.sqlite3", args.transactions
        )
        rows.append(f"| SQLite (WAL, synchronous=FULL) | {rate:,.0f} | {p50:.1f} | {p99:.1f} |")
    name = f"meterd_bench_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(args.postgres)
    await admin.execute(f"CREATE DATABASE {name}")
    try:
        base = args.postgres.rsplit("/", 1)[0].split("://", 1)[1]
        rate, p50, p99 = await run(f"postgresql+asyncpg://{base}/{name}", args.transactions)
        rows.append(f"| PostgreSQL 15 (asyncpg) | {rate:,.0f} | {p50:.1f} | {p99:.1f} |")
    finally:
        await admin.execute(f"DROP DATABASE {name} WITH (FORCE)")
        await admin.close()
    append(
        f"Ledger posting: {args.transactions} one-minute transactions, {CONCURRENCY} "
        "coroutines, one commit each",
        rows,
    )


if __name__ == "__main__":
    asyncio.run(main())
