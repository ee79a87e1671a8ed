"""Two daemons on one PostgreSQL against one: webhook ingest throughput.

    .venv/bin/python -m bench.two_daemons [--calls 2500] [--events-per-call 8]
        [--concurrency 32]

Each configuration gets a fresh PostgreSQL database. One daemon: every signed conference
callback goes to it, `concurrency` in flight. Two daemons (same tokens and PIN secret, as the
README requires): the callbacks are spread over both, request by request, as a load balancer in
front of them would, with the same total concurrency. The calls are created first through
`/twilio/voice` (not timed). Both daemons run their metering ticks, which share the calls
through `FOR UPDATE SKIP LOCKED`. Afterwards every callback is checked to be recorded exactly
once (the webhook_events rows equal the callbacks sent).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import tempfile
import time
from pathlib import Path

import aiohttp
from sqlalchemy import func, select

from bench.ingest import (
    LoadResult,
    MeterdProcess,
    Prepared,
    conference_events,
    create_account,
    fresh_postgres,
    post_prepared,
    report,
    send_all,
    voice,
)
from meterd.store.database import open_database
from meterd.store.schema import webhook_events


async def spread_closed_loop(
    base_urls: list[str], requests: list[Prepared], concurrency: int
) -> LoadResult:
    """Like bench.ingest.closed_loop, with request i going to daemon i % len(base_urls)."""
    result = LoadResult(len(requests), 0.0)
    position = 0
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=concurrency),
        timeout=aiohttp.ClientTimeout(total=60),
    ) as session:

        async def worker() -> None:
            nonlocal position
            while position < len(requests):
                index = position
                position += 1
                base = base_urls[index % len(base_urls)]
                status, seconds = await post_prepared(session, base, requests[index])
                result.statuses[status] += 1
                result.latencies.append(seconds)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        result.elapsed = time.perf_counter() - started
    return result


async def recorded_conference_events(url: str) -> int:
    database = await open_database(url, upgrade=False)
    try:
        async with database.read() as connection:
            value = await connection.scalar(
                select(func.count())
                .select_from(webhook_events)
                .where(webhook_events.c.route == "conference")
            )
    finally:
        await database.close()
    return int(value or 0)


async def measure(daemons: int, args: argparse.Namespace, workdir: Path) -> tuple[LoadResult, str]:
    async with fresh_postgres() as url:
        processes = [MeterdProcess(workdir / f"{daemons}-{k}", url).start() for k in range(daemons)]
        try:
            run = int.from_bytes(os.urandom(4), "big")
            numbers = [f"+1555{run % 10**6:06d}{k:03d}" for k in range(50)]
            create_account(processes[0], "bench", numbers)
            bases = [p.base_url for p in processes]
            for k, base in enumerate(bases):  # each daemon answers a share of the calls
                await send_all(
                    base,
                    (voice(run, n, numbers[n % 50]) for n in range(k, args.calls, daemons)),
                )
            base_time = int(time.time()) - 120
            events = [
                e
                for n in range(args.calls)
                for e in conference_events(run, n, base_time, args.events_per_call)
            ]
            random.Random(run).shuffle(events)  # calls interleave, as they do live
            cpu_before = [p.cpu_seconds() for p in processes]
            result = await spread_closed_loop(bases, events, args.concurrency)
            cpu = sum(p.cpu_seconds() for p in processes) - sum(cpu_before)
            recorded = await recorded_conference_events(url)
            check = f"{recorded:,} of {len(events):,} recorded" + (
                "" if recorded == len(events) else " MISMATCH"
            )
            check += f"; daemon CPU {cpu / len(events) * 1000:.2f} ms/event"
        finally:
            for process in processes:
                process.stop()
        for k in range(daemons):
            shutil.rmtree(workdir / f"{daemons}-{k}", ignore_errors=True)
    return result, check


async def main_async(args: argparse.Namespace) -> None:
    rows = [
        "| daemons on one PostgreSQL | requests/s | p50 ms | p99 ms | vs one | refused | check |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    results = {}
    with tempfile.TemporaryDirectory(prefix="meterd-bench-") as directory:
        for daemons in (1, 2):
            result, check = await measure(daemons, args, Path(directory))
            results[daemons] = result
            print(f"{daemons} daemon(s): {result.rate:,.0f}/s; {check}", flush=True)
            rows.append(
                f"| {daemons} | {result.rate:,.0f} | {result.percentile_ms(0.5):.1f} | "
                f"{result.percentile_ms(0.99):.1f} | {result.rate / results[1].rate:.2f}x | "
                f"{result.failed} | {check} |"
            )
    events = args.calls * args.events_per_call
    lines = [*rows]
    if args.note:
        lines += ["", args.note]
    report(
        args,
        f"Two daemons on one PostgreSQL against one: {events:,} signed conference callbacks "
        f"({args.calls:,} calls x {args.events_per_call}), concurrency {args.concurrency} in "
        "total, client on the same 2 cores",
        lines,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=2500)
    parser.add_argument("--events-per-call", type=int, default=8, choices=range(1, 9))
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--note", default="", help="a sentence added to RESULTS.md")
    parser.add_argument("--no-append", action="store_true", help="print, do not append")
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
