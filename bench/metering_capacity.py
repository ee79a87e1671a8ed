"""Live metering capacity: how many concurrent open calls can a real `meterd run` meter with every
minute posted within 2 s of falling due (tick lag), and what CPU each call costs.

    .venv/bin/python -m bench.metering_capacity [--calls 250,500,1000,2000,5000,10000,20000]
        [--target 20000] [--observe-seconds 65] [--backends sqlite,postgresql]

For each size N and backend: a fresh database; meterd started once (migrations) to create a
per_minute account with plenty of banked minutes; then N connected calls, each with one agent
billable since a moment spread over the last minute, are written into the database with the rows
meterd itself writes for `/twilio/voice` and three conference callbacks (start, customer join,
agent join) - creating 20,000 calls over HTTP would take longer than the measurement. meterd is
started again and posts minute 1 (and 2) of every call: the backlog (its drain time is shown).
Once caught up, every minute falling due during `observe-seconds` is timed: lag = the ledger
transaction's `posted_at` minus the moment the minute fell due (the agent's join + (n - 1) x 60
s). A minute still missing at the end counts with the lag it had then. CPU is the daemon's
user + system time over the window (/proc/<pid>/stat).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import random
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import func, insert, select

from bench.ingest import (
    MeterdProcess,
    add_profile_arguments,
    backend_url,
    create_account,
    profile_summary,
    profiled,
    report,
)
from meterd.simulate.wire import ACCOUNT_SID
from meterd.store.database import open_database
from meterd.store.schema import calls, ledger_transactions, webhook_events

SEED_BATCH = 2000
# the kinds of a live or settled minute (meterd/core/ledger.py); "minutes_granted" is not one
MINUTE_KINDS = (
    "minute_bank",
    "minute_deposit",
    "minute_debt",
    "minute_receivable",
    "minute_card",
    "minute_covered",
)
LAG_TARGET_SECONDS = 2.0


@dataclass
class Seeded:
    joins: dict[str, int]  # call sid -> epoch second its agent (alice) became billable
    seconds: float


def _sid(run: int, n: int, leg: int = 0) -> str:
    return f"CA{run:08x}{n:016x}{leg:08x}"


async def seed_open_calls(
    url: str, account_id: str, count: int, *, run: int, join_spread: tuple[int, int] = (3, 63)
) -> Seeded:
    """`count` connected calls, one billable agent each, as meterd would have recorded them:
    the voice webhook, conference-start, customer join and agent join; `next_due_at` now (as
    `wake` leaves it). Agents joined `join_spread` seconds before now, uniformly."""
    started = time.perf_counter()
    rng = random.Random(run)
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    joins: dict[str, int] = {}
    database = await open_database(url, upgrade=False)
    try:
        for first in range(0, count, SEED_BATCH):
            call_rows, event_rows = [], []
            for n in range(first, min(count, first + SEED_BATCH)):
                sid, agent_sid = _sid(run, n), _sid(run, n, 1)
                conference_sid = "CF" + sid[2:]
                joined = now - dt.timedelta(seconds=rng.randint(*join_spread))
                joins[sid] = int(joined.timestamp())
                answered = joined - dt.timedelta(seconds=5)
                number = f"+1555{run % 10**6:06d}{n % 50:03d}"
                call_rows.append(
                    {
                        "call_sid": sid,
                        "account_id": account_id,
                        "plan": "per_minute",
                        "status": "connected",
                        "from_number": number,
                        "conference_sid": conference_sid,
                        "pin_attempts": 0,
                        "started_at": answered,
                        "ended_at": None,
                        "end_reason": None,
                        "closed_by_sweeper": False,
                        "last_event_at": joined,
                        "next_due_at": now,
                        "settled_at": None,
                        "incident_group": None,
                        "waived_at": None,
                        "waiver_reason": None,
                        "warned_at": None,
                        "exhausted_at": None,
                        "pay_attempts": 0,
                    }
                )
                voice = [("AccountSid", ACCOUNT_SID), ("CallSid", sid), ("From", number)]
                event_rows.append(_event(f"voice:{sid}", "voice", sid, "incoming", voice, answered))
                for sequence, (kind, participant, label) in enumerate(
                    [
                        ("conference-start", None, None),
                        ("participant-join", sid, "customer"),
                        ("participant-join", agent_sid, "agent:alice"),
                    ],
                    start=1,
                ):
                    params = [
                        ("AccountSid", ACCOUNT_SID),
                        ("ConferenceSid", conference_sid),
                        ("FriendlyName", sid),
                        ("StatusCallbackEvent", kind),
                        ("SequenceNumber", str(sequence)),
                    ]
                    if participant:
                        params += [("CallSid", participant), ("ParticipantLabel", label)]
                        params += [("Hold", "false")]
                    event_rows.append(
                        _event(
                            f"conference:{conference_sid}:{sequence}",
                            "conference",
                            sid,
                            kind,
                            params,
                            joined,
                            sequence=sequence,
                            participant=participant,
                            label=label,
                            hold=False if participant else None,
                        )
                    )
            async with database.write() as connection:
                await connection.execute(insert(calls), call_rows)
                await connection.execute(insert(webhook_events), event_rows)
    finally:
        await database.close()
    return Seeded(joins, time.perf_counter() - started)


def _event(
    dedup_key: str,
    route: str,
    sid: str,
    kind: str,
    params: list[tuple[str, str]],
    at: dt.datetime,
    *,
    sequence: int | None = None,
    participant: str | None = None,
    label: str | None = None,
    hold: bool | None = None,
) -> dict[str, object]:
    return {
        "dedup_key": dedup_key,
        "route": route,
        "call_sid": sid,
        "kind": kind,
        "sequence_number": sequence,
        "event_at": at if route == "conference" else None,
        "participant_sid": participant,
        "label": label,
        "hold": hold,
        "params_json": json.dumps(params),
        "received_at": at,
    }


async def posted_minutes(url: str, since: dt.datetime | None = None) -> dict[str, dt.datetime]:
    """Minute transactions in the ledger (key -> posted_at), optionally posted since a time."""
    database = await open_database(url, upgrade=False)
    try:
        async with database.read() as connection:
            query = select(
                ledger_transactions.c.idempotency_key, ledger_transactions.c.posted_at
            ).where(ledger_transactions.c.kind.in_(MINUTE_KINDS))
            if since is not None:
                query = query.where(ledger_transactions.c.posted_at >= since)
            rows = (await connection.execute(query)).all()
    finally:
        await database.close()
    return {row.idempotency_key: row.posted_at for row in rows}


async def count_minutes(url: str) -> int:
    database = await open_database(url, upgrade=False)
    try:
        async with database.read() as connection:
            return int(
                await connection.scalar(
                    select(func.count())
                    .select_from(ledger_transactions)
                    .where(ledger_transactions.c.kind.in_(MINUTE_KINDS))
                )
                or 0
            )
    finally:
        await database.close()


def minutes_due(joins: dict[str, int], at: float) -> int:
    """Minutes fallen due by `at` over all calls: ceil(billable / 60) each."""
    return sum(-(-int(at - join) // 60) for join in joins.values() if at > join)


async def wait_caught_up(
    url: str, joins: dict[str, int], limit_seconds: float
) -> tuple[float | None, int]:
    """Poll the ledger until every minute due 3 s ago is posted; the moment that happened
    (None: not within `limit_seconds`) and how many minutes it took."""
    deadline = time.time() + limit_seconds
    while time.time() < deadline:
        posted = await count_minutes(url)
        if posted >= minutes_due(joins, time.time() - 3):
            return time.time(), posted
        await asyncio.sleep(1.0)
    return None, await count_minutes(url)


@dataclass
class Lags:
    lags: list[float]
    missing: int
    minutes: int

    def percentile(self, fraction: float) -> float:
        if not self.lags:
            return float("nan")
        ordered = sorted(self.lags)
        return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))]

    @property
    def within_target(self) -> float:
        if not self.lags:
            return 0.0
        return sum(lag <= LAG_TARGET_SECONDS for lag in self.lags) / len(self.lags)


def lags_in_window(
    joins: dict[str, int], posted: dict[str, dt.datetime], start: float, end: float, now: float
) -> Lags:
    """Lag of every minute of alice on every call that fell due in [start, end)."""
    lags, missing = [], 0
    for sid, join in joins.items():
        first = max(1, int((start - join) // 60) + 1)
        for n in range(first, first + 3):
            due = join + (n - 1) * 60
            if due < start:
                continue
            if due >= end:
                break
            at = posted.get(f"call:{sid}:agent:alice:minute:{n}")
            if at is None:
                missing += 1
                lags.append(now - due)
            else:
                lags.append(at.timestamp() - due)
    return Lags(lags, missing, len(lags))


def tick_histogram(metrics_text: str) -> dict[str, float]:
    """meterd_tick_lag_seconds buckets (le -> cumulative count) from /metrics."""
    buckets: dict[str, float] = {}
    for line in metrics_text.splitlines():
        if line.startswith("meterd_tick_lag_seconds_bucket"):
            le = line.split('le="', 1)[1].split('"', 1)[0]
            buckets[le] = float(line.rsplit(" ", 1)[1])
    return buckets


@dataclass
class StepResult:
    backend: str
    calls: int
    seed_seconds: float
    start_to_healthy: float
    backlog_minutes: int
    backlog_seconds: float | None
    lags: Lags | None
    cpu_seconds: float
    window_seconds: float
    ticks: float
    ticks_within_2s: float
    rss_mib: float
    profile: list[str]
    backlog_timeout: float = 0.0

    @property
    def met(self) -> bool:
        return bool(self.lags and self.lags.lags and max(self.lags.lags) <= LAG_TARGET_SECONDS)


async def measure(
    backend: str,
    count: int,
    args: argparse.Namespace,
    workdir: Path,
    backlog_timeout: float | None = None,
) -> StepResult:
    backlog_timeout = backlog_timeout or args.backlog_timeout
    run = random.SystemRandom().randrange(16**8)
    state = workdir / f"{backend}-{count}"
    async with backend_url(backend, state) as url:
        meterd = MeterdProcess(state, url, tick_batch_max=str(args.tick_batch_max)).start()
        create_account(meterd, "bench", [f"+1555{run % 10**6:06d}{k:03d}" for k in range(50)])
        meterd.stop()
        seeded = await seed_open_calls(meterd.database_url, "bench", count, run=run)
        meterd.start(wait=False)
        healthy = meterd.wait_healthy()
        try:
            caught_up, backlog = await wait_caught_up(
                meterd.database_url, seeded.joins, backlog_timeout
            )
            backlog_seconds = None if caught_up is None else caught_up - meterd.started_wall
            lags, profile = None, []
            cpu = ticks = ticks_ok = 0.0
            window = args.observe_seconds
            if caught_up is not None:
                before = tick_histogram(meterd.metrics())
                cpu_before = meterd.cpu_seconds()
                start = time.time()
                profile_path = state / "profile.txt"
                with profiled(meterd.pid, args.py_spy, profile_path):
                    await asyncio.sleep(window)
                end = time.time()
                cpu = meterd.cpu_seconds() - cpu_before
                after = tick_histogram(meterd.metrics())
                ticks = after.get("+Inf", 0) - before.get("+Inf", 0)
                ticks_ok = after.get("2.0", 0) - before.get("2.0", 0)
                await asyncio.sleep(3)  # minutes due at the very end get their chance
                posted = await posted_minutes(
                    meterd.database_url, dt.datetime.fromtimestamp(start - 5, dt.UTC)
                )
                lags = lags_in_window(seeded.joins, posted, start, end - 3, time.time())
                if args.py_spy:
                    profile = profile_summary(profile_path)
                    print("\n".join(profile), flush=True)
            rss = meterd.rss_mib()
        finally:
            meterd.stop()
        shutil.rmtree(state, ignore_errors=True)
    return StepResult(
        backend,
        count,
        seeded.seconds,
        healthy,
        backlog,
        backlog_seconds,
        lags,
        cpu,
        window,
        ticks,
        ticks_ok,
        rss,
        profile,
        backlog_timeout,
    )


def row(result: StepResult) -> str:
    lags = result.lags
    if lags is None:
        return (
            f"| {result.backend} | {result.calls:,} | not caught up after "
            f"{result.backlog_timeout:.0f} s ({result.backlog_minutes:,} minutes posted, "
            f"{result.backlog_minutes / result.backlog_timeout:,.0f}/s) "
            "| | | | | | | | | "
            f"{result.rss_mib:.0f} | MISSED |"
        )
    per_call_minute_ms = result.cpu_seconds / (result.calls * result.window_seconds / 60) * 1000
    return (
        f"| {result.backend} | {result.calls:,} | {result.backlog_minutes:,} in "
        f"{result.backlog_seconds:.1f} s | {lags.minutes:,} | {lags.percentile(0.5):.2f} | "
        f"{lags.percentile(0.99):.2f} | {max(lags.lags, default=float('nan')):.2f} | "
        f"{lags.within_target:.1%} ({lags.missing} missing) | "
        f"{result.cpu_seconds / result.window_seconds:.0%} | {per_call_minute_ms:.2f} | "
        f"{result.ticks_within_2s:.0f}/{result.ticks:.0f} | {result.rss_mib:.0f} | "
        f"{'met' if result.met else 'MISSED'} |"
    )


async def main_async(args: argparse.Namespace) -> None:
    sizes = [int(n) for n in args.calls.split(",")]
    results: list[StepResult] = []
    with tempfile.TemporaryDirectory(prefix="meterd-bench-") as directory:
        for backend in args.backends.split(","):
            for count in sizes:
                result = await measure(backend, count, args, Path(directory))
                results.append(result)
                print(row(result), flush=True)
                if not result.met:
                    break  # larger sizes only lag more; the target size is still shown below
            if args.target and not any(
                r.backend == backend and r.calls >= args.target for r in results
            ):
                # a smaller size already missed: a shorter look shows how far off it is
                result = await measure(backend, args.target, args, Path(directory), 120.0)
                results.append(result)
                print(row(result), flush=True)
    capacity = {
        backend: max((r.calls for r in results if r.backend == backend and r.met), default=0)
        for backend in args.backends.split(",")
    }
    lines = [
        "| backend | open calls | backlog at start: minutes in s | minutes timed | lag p50 s | "
        "p99 s | max s | within 2 s | CPU (of one core) | CPU ms per call-minute | "
        "ticks with lag <= 2 s (/metrics) | RSS MiB | every minute <= 2 s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        *(row(r) for r in results),
        "",
        "Capacity (largest size measured with every minute posted within 2 s): "
        + ", ".join(f"{b} {n:,}" for b, n in capacity.items())
        + ". Target (2 cores): 20,000 concurrent metered calls with tick lag <= 2 s: "
        + ", ".join(f"{b} {'met' if n >= 20_000 else 'MISSED'}" for b, n in capacity.items())
        + ".",
    ]
    if args.note:
        lines.append(args.note)
    report(
        args,
        f"Metering capacity: one billable agent per open call, observed {args.observe_seconds:g} s "
        "after the start-up backlog",
        lines,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--calls",
        default="250,500,1000,2000,5000,10000,20000",
        help="sizes, comma-separated, ascending: measured until one misses the 2 s target",
    )
    parser.add_argument(
        "--target", type=int, default=20_000, help="size measured once in any case (0: no)"
    )
    parser.add_argument("--observe-seconds", type=float, default=65.0)
    parser.add_argument("--backlog-timeout", type=float, default=240.0)
    parser.add_argument("--tick-batch-max", type=int, default=2000, help="meterd's setting")
    parser.add_argument("--backends", default="sqlite,postgresql")
    parser.add_argument("--note", default="", help="a sentence added to RESULTS.md")
    parser.add_argument("--no-append", action="store_true", help="print, do not append")
    add_profile_arguments(parser)
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
