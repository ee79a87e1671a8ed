"""HTTP fuzzing against a real `meterd run` (issue 12, acceptance 3): N random requests to every
route, signed and unsigned, `concurrency` in flight; then 0 answers >= 500, 0 rows stored from a
request without valid credentials, and `meterd ledger check` OK.

    .venv/bin/python -m bench.fuzz [--requests 50000] [--concurrency 16] [--seed 1]
                                   [--backend sqlite|postgresql] [--no-append] [--note ...]

The requests are those of tests/integration/test_http_fuzz.py (`fuzz_request`), drawn from
`random.Random(seed)` instead of hypothesis: random methods, targets, headers, content types and
bodies; Twilio forms with mutated fields, signed over the daemon's public_base_url with its auth
token or not (no header, garbage, the wrong token or URL, a field added after signing); JSON
bodies for /admin and /agents with absurd values, with the right bearer token or not. Accounts
and calls are made first (and yesterday's usage built, so /finance serves a file), so signed
events land on real calls; the daemon meters them as it runs.

Checked afterwards, with the daemon stopped:
- no answer had a status >= 500, and every request got an answer (a request that finds its
  keep-alive connection closed by the server is sent once more on a new one, and counted);
- every identifier made up for a request without valid credentials carries TAINT; no text
  column of any table contains it (`rows from unsigned requests`);
- `meterd ledger check` exits 0;
- the daemon exited 0 on SIGTERM.
The summary is appended to bench/RESULTS.md (unless --no-append); the first requests that got a
5xx or no answer are printed with the exception meterd logged.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import random
import shutil
import subprocess
import tempfile
import time
from collections import Counter
from pathlib import Path

import aiohttp

from bench.ingest import (
    ADMIN_TOKEN,
    AGENTS_TOKEN,
    METERD,
    PUBLIC_BASE_URL,
    TWILIO_TOKEN,
    MeterdProcess,
    backend_url,
    report,
)
from meterd.store.database import open_database
from tests.integration.test_http_fuzz import (
    TAINT,
    FuzzRequest,
    RandomDraw,
    World,
    fuzz_request,
    rows_containing,
    seed_requests,
    send,
)

SHOWN_MAX = 10  # failing requests printed in full


def family(request: FuzzRequest) -> str:
    kind = request.kind.split(" ")[0]
    if kind.startswith("/twilio/") or kind.startswith("twilio/"):
        return "twilio webhooks"
    for prefix in ("/admin/", "/agents/", "/finance/"):
        if kind.startswith(prefix):
            return prefix + "*"
    if kind in ("/healthz", "/metrics"):
        return "/healthz, /metrics"
    return "other paths"


class Tally:
    def __init__(self) -> None:
        self.statuses: Counter[tuple[str, bool, int]] = Counter()  # family, credentialed, status
        self.failures: list[str] = []
        self.server_errors = 0
        self.unanswered = 0
        self.resent = 0
        self.unsendable = 0
        self.sent = 0

    def add(self, request: FuzzRequest, status: int, text: str) -> None:
        self.sent += 1
        self.statuses[(family(request), request.credentialed, status)] += 1
        if status == -1:
            self.unsendable += 1
        elif status == 0 or status >= 500:
            if status == 0:
                self.unanswered += 1
            else:
                self.server_errors += 1
            if len(self.failures) < SHOWN_MAX:
                self.failures.append(
                    f"--- {status or 'no answer'}: {text[:300]}\n{request.repro()}"
                )


async def run_load(meterd: MeterdProcess, world: World, args: argparse.Namespace) -> Tally:
    tally = Tally()
    draw = RandomDraw(random.Random(args.seed))
    remaining = args.requests
    timeout = aiohttp.ClientTimeout(total=60)
    async with (
        aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=args.concurrency), timeout=timeout
        ) as session,
        aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(force_close=True), timeout=timeout
        ) as fresh,
    ):

        async def worker() -> None:
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                request = fuzz_request(draw, world)
                status, text = await send(session, meterd.base_url, request)
                if status == 0:
                    # the server may have closed a keep-alive connection just as it was reused
                    # (it closes one after a request it could not read to its end): once more
                    # on a connection of its own
                    tally.resent += 1
                    status, text = await send(fresh, meterd.base_url, request)
                tally.add(request, status, text)
                if tally.sent % 5000 == 0:
                    print(f"{tally.sent:,} sent", flush=True)

        await asyncio.gather(*(worker() for _ in range(args.concurrency)))
    return tally


async def seed(meterd: MeterdProcess, world: World) -> None:
    async with aiohttp.ClientSession() as session:
        for request, expected in seed_requests(world):
            status, text = await send(session, meterd.base_url, request)
            if status != expected:
                raise RuntimeError(f"seeding: {status} {text[:300]}\n{request.repro()}")


def logged_errors(log: str) -> Counter[str]:
    """The error lines of the daemon's log with a traceback, by message and exception (the
    traceback's last line)."""
    found: Counter[str] = Counter()
    for line in log.splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        exception = (entry.get("exception") or "").strip().splitlines()
        if entry.get("level") not in ("error", "critical") or not exception:
            continue  # e.g. "twilio used the fallback URL": what a fallback request is for
        found[f"{entry.get('event')}: {exception[-1].strip()[:120]}"] += 1
    return found


def meterd_cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([METERD, *args], env=env, capture_output=True, text=True, timeout=600)


async def main_async(args: argparse.Namespace) -> bool:
    with tempfile.TemporaryDirectory(prefix="meterd-fuzz-") as directory:
        state_dir = Path(directory) / "state"
        async with backend_url(args.backend, Path(directory)) as url:
            meterd = MeterdProcess(state_dir, url).start()
            try:
                world = World(
                    now=lambda: dt.datetime.now(dt.UTC),
                    public_base_url=PUBLIC_BASE_URL,
                    twilio_token=TWILIO_TOKEN,
                    tokens={
                        "/admin/": ADMIN_TOKEN,
                        "/agents/": AGENTS_TOKEN,
                        "/finance/": meterd.env["METERD_FINANCE_TOKEN"],
                    },
                    days=tuple(
                        str(dt.datetime.now(dt.UTC).date() + dt.timedelta(days=d))
                        for d in (-1, 0, 1)
                    ),
                )
                await seed(meterd, world)
                yesterday = world.days[0]
                built = await asyncio.to_thread(
                    meterd_cli, ["usage", "--date", yesterday], meterd.env
                )
                if built.returncode != 0:
                    print(f"(usage of {yesterday} not built: {built.stderr[-300:]})")
                started = time.perf_counter()
                tally = await run_load(meterd, world, args)
                elapsed = time.perf_counter() - started
                alive = meterd.process is not None and meterd.process.poll() is None
            finally:
                exit_code = meterd.stop()
            log = meterd.log()
            database = await open_database(meterd.database_url, upgrade=False)
            try:
                tainted = await rows_containing(database, TAINT)
                control = await rows_containing(database, world.calls[0].call_sid)
            finally:
                await database.close()
            ledger = await asyncio.to_thread(meterd_cli, ["ledger", "check"], meterd.env)
            if args.keep_log:
                shutil.copy(meterd.log_path, args.keep_log)
    return summarise(args, tally, elapsed, alive, exit_code, tainted, control, ledger, log)


def summarise(
    args: argparse.Namespace,
    tally: Tally,
    elapsed: float,
    alive: bool,
    exit_code: int,
    tainted: dict[str, int],
    control: dict[str, int],
    ledger: subprocess.CompletedProcess[str],
    log: str,
) -> bool:
    for failure in tally.failures:
        print(failure)
    errors = logged_errors(log)
    unsigned_rows = sum(tainted.values())
    ledger_line = (ledger.stdout.strip().splitlines() or ["(no output)"])[-1]
    ledger_ok = ledger.returncode == 0
    met = (
        tally.server_errors == 0
        and tally.unanswered == 0
        and unsigned_rows == 0
        and bool(control.get("calls"))
        and ledger_ok
        and alive
        and exit_code == 0
    )
    families = sorted({f for f, _, _ in tally.statuses})
    rows = [
        "| requests to | with valid credentials | 2xx | 3xx | 4xx | 5xx | no answer |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name in families:
        for credentialed in (True, False):
            by_class: Counter[str] = Counter()
            for (f, c, status), n in tally.statuses.items():
                if f == name and c == credentialed and status >= 0:
                    by_class[f"{status // 100}xx" if status > 0 else "none"] += n
            if by_class:
                rows.append(
                    f"| {name} | {'yes' if credentialed else 'no'} | {by_class['2xx']:,} | "
                    f"{by_class['3xx']:,} | {by_class['4xx']:,} | {by_class['5xx']:,} | "
                    f"{by_class['none']:,} |"
                )
    statuses = Counter()
    for (_, _, status), n in tally.statuses.items():
        statuses[status] += n
    unsigned = sum(n for (_, c, _), n in tally.statuses.items() if not c)
    lines = [
        *rows,
        "",
        f"- {tally.sent:,} requests in {elapsed:.0f} s ({tally.sent / elapsed:,.0f}/s), seed "
        f"{args.seed}; {unsigned:,} of them without valid credentials; statuses: "
        + ", ".join(f"{s if s > 0 else 'none'} x {n:,}" for s, n in sorted(statuses.items())),
        f"- 5xx: {tally.server_errors:,}; no answer: {tally.unanswered:,}"
        f" (sent again on a new connection after the server closed a keep-alive one: "
        f"{tally.resent:,}; refused by the client itself: {tally.unsendable:,})",
        f"- rows from requests without valid credentials: {unsigned_rows}"
        + (f" ({tainted})" if tainted else "")
        + f" (the same search finds the first seeded call in {control})",
        f"- `meterd ledger check`: exit {ledger.returncode}, {ledger_line}",
        f"- daemon: {'running' if alive else 'DEAD'} at the end, exit {exit_code} on SIGTERM; "
        "error lines logged: "
        + (", ".join(f"{n:,} x {e}" for e, n in errors.most_common(8)) or "none"),
        f"- Acceptance (issue 12, #3: 0 5xx, 0 rows from unsigned requests, ledger check OK): "
        f"{'met' if met else 'MISSED'}",
        *([args.note] if args.note else []),
    ]
    report(
        args,
        f"HTTP fuzzing: {tally.sent:,} random requests to every route of a real meterd on "
        f"{args.backend}, concurrency {args.concurrency}",
        lines,
    )
    return met


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=50_000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--backend", choices=["sqlite", "postgresql"], default="sqlite")
    parser.add_argument("--keep-log", default="", help="copy the daemon's log here")
    parser.add_argument("--note", default="", help="a sentence added to RESULTS.md")
    parser.add_argument("--no-append", action="store_true", help="print, do not append")
    args = parser.parse_args()
    raise SystemExit(0 if asyncio.run(main_async(args)) else 1)


if __name__ == "__main__":
    main()
