"""Restart recovery: a real `meterd run` metering 10,000 open calls is killed with SIGKILL and
started again; how long from the new process's start until it meters again?

    .venv/bin/python -m bench.recovery [--calls 10000] [--run-before-kill 20]
        [--backends sqlite,postgresql]

The open calls (one billable agent each, joined over the last minute) are written into the
database with the rows meterd itself writes for them (see bench/metering_capacity.py). meterd is
started, meters for `run-before-kill` seconds, gets `kill -9`, and is started again at once.
Measured from the second process's start (fork/exec):
- healthy: `/healthz` answers 200 (migrations checked, scheduler running);
- first minute: the first ledger minute posted by the new process;
- caught up: every minute that had fallen due by the restart is in the ledger, i.e. every open
  call has been metered again up to the moment of the crash (the target: <= 5 s);
and that the crash lost and repeated nothing: the minutes in the ledger equal the "minutes
posted" markers (`call_agent_minutes`) and never exceed the minutes due.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import random
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import func, select

from bench.ingest import (
    MeterdProcess,
    add_profile_arguments,
    backend_url,
    create_account,
    profile_summary,
    profiled,
    report,
)
from bench.metering_capacity import count_minutes, minutes_due, posted_minutes, seed_open_calls
from meterd.store.database import open_database
from meterd.store.schema import call_agent_minutes

RECOVERY_TARGET_SECONDS = 5.0


async def marker_total(url: str) -> int:
    database = await open_database(url, upgrade=False)
    try:
        async with database.read() as connection:
            value = await connection.scalar(select(func.sum(call_agent_minutes.c.minutes_posted)))
    finally:
        await database.close()
    return int(value or 0)


@dataclass
class Recovery:
    backend: str
    calls: int
    posted_before_kill: int
    due_at_restart: int
    healthy: float
    first_minute: float | None
    caught_up: float | None
    cpu_seconds: float
    consistency: str  # ledger minutes / markers / minutes due at the end
    profile: list[str]


async def measure(backend: str, args: argparse.Namespace, workdir: Path) -> Recovery:
    run = random.SystemRandom().randrange(16**8)
    state = workdir / backend
    async with backend_url(backend, state) as url:
        meterd = MeterdProcess(state, url).start()
        create_account(meterd, "bench", [f"+1555{run % 10**6:06d}{k:03d}" for k in range(50)])
        meterd.stop()
        seeded = await seed_open_calls(meterd.database_url, "bench", args.calls, run=run)
        meterd.start()
        await asyncio.sleep(args.run_before_kill)
        meterd.kill9()
        posted_before = await count_minutes(meterd.database_url)
        meterd.start(wait=False)  # at once, as systemd's Restart= would
        restart_wall = meterd.started_wall
        due = minutes_due(seeded.joins, restart_wall)
        profile_path = state / "profile.txt"
        first = caught = None
        try:
            healthy = meterd.wait_healthy()
            cpu_before = meterd.cpu_seconds()
            with profiled(meterd.pid, args.py_spy, profile_path):
                deadline = time.time() + args.limit_seconds
                while time.time() < deadline and caught is None:
                    posted = await count_minutes(meterd.database_url)
                    now = time.time()
                    if first is None and posted > posted_before:
                        first = now - restart_wall
                    if posted >= due:
                        caught = now - restart_wall
                    await asyncio.sleep(0.1)
            cpu = meterd.cpu_seconds() - cpu_before
        finally:
            meterd.stop()
        if first is not None:  # the exact moment, from the ledger
            since = dt.datetime.fromtimestamp(restart_wall, dt.UTC)
            after = await posted_minutes(meterd.database_url, since)
            if after:
                first = min(at.timestamp() for at in after.values()) - restart_wall
        total = await count_minutes(meterd.database_url)
        markers = await marker_total(meterd.database_url)
        due_at_stop = minutes_due(seeded.joins, time.time())
        shutil.rmtree(state, ignore_errors=True)
    profile = profile_summary(profile_path) if args.py_spy else []
    if profile:
        print("\n".join(profile), flush=True)
    return Recovery(
        backend,
        args.calls,
        posted_before,
        due,
        healthy,
        first,
        caught,
        cpu,
        f"{total:,} / {markers:,} / {due_at_stop:,}"
        + ("" if total == markers and total <= due_at_stop else " BROKEN"),
        profile,
    )


def _seconds(value: float | None, limit: float) -> str:
    return f"{value:.2f}" if value is not None else f"not within {limit:.0f} s"


async def main_async(args: argparse.Namespace) -> None:
    results = []
    with tempfile.TemporaryDirectory(prefix="meterd-bench-") as directory:
        for backend in args.backends.split(","):
            result = await measure(backend, args, Path(directory))
            results.append(result)
            print(result, flush=True)
    lines = [
        "| backend | open calls | minutes posted before the kill | minutes due at restart | "
        "start to healthy s | start to first minute s | start to caught up s | "
        "CPU s until caught up | ledger minutes / markers / due at the end | caught up <= 5 s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        met = r.caught_up is not None and r.caught_up <= RECOVERY_TARGET_SECONDS
        lines.append(
            f"| {r.backend} | {r.calls:,} | {r.posted_before_kill:,} | {r.due_at_restart:,} | "
            f"{r.healthy:.2f} | {_seconds(r.first_minute, args.limit_seconds)} | "
            f"{_seconds(r.caught_up, args.limit_seconds)} | {r.cpu_seconds:.1f} | "
            f"{r.consistency} | {'met' if met else 'MISSED'} |"
        )
    lines += [
        "",
        "Target (2 cores): recovery of 10,000 open calls in <= 5 s (here: every minute due by "
        "the restart posted).",
    ]
    if args.note:
        lines.append(args.note)
    report(
        args,
        f"Restart recovery: kill -9 after {args.run_before_kill:g} s of metering "
        f"{args.calls:,} open calls, then start again at once",
        lines,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=10_000)
    parser.add_argument("--run-before-kill", type=float, default=20.0)
    parser.add_argument("--limit-seconds", type=float, default=300.0, help="give up after")
    parser.add_argument("--backends", default="sqlite,postgresql")
    parser.add_argument("--note", default="", help="a sentence added to RESULTS.md")
    parser.add_argument("--no-append", action="store_true", help="print, do not append")
    add_profile_arguments(parser)
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
