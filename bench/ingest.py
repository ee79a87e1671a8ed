"""Webhook ingest: signed Twilio conference callbacks into a real `meterd run`, with signature
checks and durable records, against a bare aiohttp handler (parse + signature check, 204) started
in a separate process in the same run. The ratio is the headline.

    .venv/bin/python -m bench.ingest [--calls 2500] [--events-per-call 8] [--concurrency 32]
                                     [--rate 500,100] [--rate-seconds 10]
                                     [--backends sqlite,postgresql]

1. Closed loop: `calls` x `events-per-call` conference callbacks, `concurrency` in flight, from
   an aiohttp client in this process: requests/s, p50, p99 (each request timed on its own).
2. Open loop at each fixed `rate` (events/s) for `rate-seconds`: latency counted from the moment
   each request was due, so a server that falls behind shows it (no coordinated omission).
The calls are created first through `/twilio/voice` (not timed); the callbacks of all calls are
shuffled together (live calls interleave; sending one call's 8 callbacks at once would measure
the queue on that call's row instead). meterd runs as deployed: its
metering tick works on the calls the callbacks wake while they arrive.

This module also holds what the other benches share: `MeterdProcess` (a real daemon with its
own state directory), `fresh_postgres`, payload builders and the load generators.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg

from bench._machine import append
from meterd.simulate.wire import conference_params, signed_form, voice_params

METERD = str(Path(sys.executable).parent / "meterd")
POSTGRES_ADMIN_URL = os.environ.get(
    "METERD_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"
)
TWILIO_TOKEN = "bench-twilio-token-0123456789abcdef"  # noqa: S105 - a bench's own daemon
ADMIN_TOKEN = "bench-admin-token-0123456789abcdef"  # noqa: S105 - a bench's own daemon
AGENTS_TOKEN = "bench-agents-token-0123456789abcdef"  # noqa: S105 - a bench's own daemon
PIN_SECRET = "bench-pin-secret-0123456789abcdef"  # noqa: S105 - a bench's own daemon
PUBLIC_BASE_URL = "https://calls.example.com/meterd"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


# --- a real meterd -----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class MeterdProcess:
    """`meterd run` in its own state directory; `database_url` None means SQLite there."""

    def __init__(self, state_dir: Path, database_url: str | None = None, **settings: str) -> None:
        self.state_dir = state_dir
        self.port = free_port()
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("METERD_")}
        self.env.update(
            {
                "METERD_LISTEN": f"127.0.0.1:{self.port}",
                "METERD_STATE_DIR": str(state_dir),
                "METERD_ADMIN_TOKEN": ADMIN_TOKEN,
                "METERD_AGENTS_TOKEN": AGENTS_TOKEN,
                "METERD_FINANCE_TOKEN": "bench-finance-token-0123456789abcdef",
                "METERD_PIN_SECRET": PIN_SECRET,
                "METERD_TWILIO_AUTH_TOKEN": TWILIO_TOKEN,
                "METERD_PUBLIC_BASE_URL": PUBLIC_BASE_URL,
                "METERD_LOG_LEVEL": "warning",
            }
        )
        if database_url:
            self.env["METERD_DATABASE_URL"] = database_url
        self.env.update({f"METERD_{k.upper()}": v for k, v in settings.items()})
        self.process: subprocess.Popen[bytes] | None = None
        self.started_monotonic = 0.0
        self.started_wall = 0.0
        self.log_path = state_dir / f"meterd-{self.port}.log"

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def database_url(self) -> str:
        return self.env.get(
            "METERD_DATABASE_URL", f"sqlite+aiosqlite:///{self.state_dir}/meterd.sqlite3"
        )

    def start(self, wait: bool = True, timeout: float = 120) -> MeterdProcess:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.started_monotonic = time.monotonic()
            self.started_wall = time.time()
            self.process = subprocess.Popen(
                [METERD, "run"], env=self.env, stdout=log, stderr=subprocess.STDOUT
            )
        if wait:
            self.wait_healthy(timeout)
        return self

    def wait_healthy(self, timeout: float = 120) -> float:
        """Seconds from process start until /healthz answered 200."""
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"meterd exited {self.process.returncode}:\n{self.log()}")
            with contextlib.suppress(OSError):
                if self.request("GET", "/healthz", timeout=2)[0] == 200:
                    return time.monotonic() - self.started_monotonic
            time.sleep(0.02)
        raise RuntimeError(f"meterd did not become healthy:\n{self.log()[-3000:]}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> int:
        if self.process is None or self.process.poll() is not None:
            return 0 if self.process is None else self.process.returncode
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait(10)

    def kill9(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait(10)

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def cpu_seconds(self) -> float:
        """User + system CPU of the daemon so far (/proc/<pid>/stat, fields 14 and 15)."""
        with open(f"/proc/{self.pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS

    def rss_mib(self) -> float:
        with open(f"/proc/{self.pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        return 0.0

    def request(
        self, method: str, path: str, body: Any = None, *, token: str = ADMIN_TOKEN, timeout=60
    ) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(  # noqa: S310 - http://127.0.0.1 only
            self.base_url + path, data=data, method=method
        )
        if data is not None:
            request.add_header("Content-Type", "application/json")
        request.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
                raw = response.read()
                try:
                    return response.status, json.loads(raw or b"null")
                except ValueError:
                    return response.status, raw.decode(errors="replace")
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode(errors="replace")

    def metrics(self) -> str:
        url = self.base_url + "/metrics"
        with urllib.request.urlopen(url, timeout=30) as response:  # noqa: S310
            return response.read().decode()


@contextlib.asynccontextmanager
async def fresh_postgres(admin_url: str = POSTGRES_ADMIN_URL) -> AsyncIterator[str]:
    """A new PostgreSQL database (asyncpg), dropped afterwards; yields its SQLAlchemy URL."""
    name = f"meterd_bench_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(admin_url)
    try:
        await admin.execute(f"CREATE DATABASE {name}")
    finally:
        await admin.close()
    try:
        base = admin_url.rsplit("/", 1)[0].split("://", 1)[1]
        yield f"postgresql+asyncpg://{base}/{name}"
    finally:
        admin = await asyncpg.connect(admin_url)
        try:
            await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        finally:
            await admin.close()


@contextlib.asynccontextmanager
async def backend_url(backend: str, state_dir: Path) -> AsyncIterator[str | None]:
    """None (meterd's SQLite in its state directory) or a fresh PostgreSQL database."""
    if backend == "sqlite":
        yield None
    else:
        async with fresh_postgres() as url:
            yield url


# --- Twilio's requests ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Prepared:
    path: str
    body: bytes
    headers: dict[str, str]


def prepare(path: str, params: dict[str, str]) -> Prepared:
    """A signed form POST, encoded once (signing is not part of what is measured)."""
    body, headers = signed_form(PUBLIC_BASE_URL + path, params, TWILIO_TOKEN)
    return Prepared(path, body, headers)


def call_sid(run: int, n: int) -> str:
    return f"CA{run:08x}{n:016x}{0:08x}"


def voice(run: int, n: int, from_number: str) -> Prepared:
    return prepare("/twilio/voice", voice_params(call_sid(run, n), from_number))


def conference_events(run: int, n: int, base: int, count: int = 8) -> list[Prepared]:
    """Up to 8 callbacks of one call, in Twilio's order: start, customer and agent joins, holds,
    a second agent joining and leaving (on hold). Offsets (seconds) from `base` (epoch)."""
    sid = call_sid(run, n)
    agent_a, agent_b = f"{sid[:-8]}{1:08x}", f"{sid[:-8]}{2:08x}"
    script: list[tuple[int, str, str, str, bool]] = [  # offset, event, CallSid, label, held
        (0, "conference-start", "", "", False),
        (0, "participant-join", sid, "customer", False),
        (5, "participant-join", agent_a, "agent:alice", False),
        (40, "participant-hold", sid, "customer", True),
        (55, "participant-unhold", sid, "customer", False),
        (60, "participant-join", agent_b, "agent:bob", False),
        (80, "participant-hold", agent_b, "agent:bob", True),
        (90, "participant-leave", agent_b, "agent:bob", True),
    ]
    out = []
    for sequence, (offset, event, leg, label, held) in enumerate(script[:count], start=1):
        conference_sid, at = f"CF{sid[2:]}", base + offset
        params = conference_params(
            conference_sid, sid, event, sequence, at, call_sid=leg, label=label, hold=held
        )
        out.append(prepare("/twilio/conference", params))
    return out


def create_account(meterd: MeterdProcess, account_id: str, numbers: Sequence[str]) -> None:
    """A per_minute account with plenty of banked minutes (nothing runs out in a bench)."""
    status, body = meterd.request(
        "POST",
        "/admin/accounts",
        {
            "account_id": account_id,
            "name": account_id,
            "plan": "per_minute",
            "caller_ids": list(numbers),
            "products": [{"product": "desktop", "kind": "license"}],
        },
    )
    if status != 201:
        raise RuntimeError(f"creating {account_id}: {status} {body}")
    status, body = meterd.request(
        "POST",
        f"/admin/accounts/{account_id}/minutes",
        {"minutes": 100_000_000, "reference": "bench-stock"},
    )
    if status != 201:
        raise RuntimeError(f"granting minutes: {status} {body}")


# --- load generators -----------------------------------------------------------------------------


@dataclass
class LoadResult:
    sent: int
    elapsed: float
    latencies: list[float] = field(default_factory=list)  # seconds
    statuses: Counter[int] = field(default_factory=Counter)

    @property
    def rate(self) -> float:
        return self.sent / self.elapsed if self.elapsed else 0.0

    def percentile_ms(self, fraction: float) -> float:
        if not self.latencies:
            return float("nan")
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))] * 1000

    @property
    def failed(self) -> int:
        return sum(n for status, n in self.statuses.items() if not 200 <= status < 300)


async def post_prepared(
    session: aiohttp.ClientSession, base_url: str, request: Prepared
) -> tuple[int, float]:
    started = time.perf_counter()
    try:
        async with session.post(
            base_url + request.path, data=request.body, headers=request.headers
        ) as response:
            await response.read()
            return response.status, time.perf_counter() - started
    except (TimeoutError, aiohttp.ClientError):
        return 0, time.perf_counter() - started


async def closed_loop(base_url: str, requests: Sequence[Prepared], concurrency: int) -> LoadResult:
    """`concurrency` workers, each sending the next request as soon as its last one answered."""
    result = LoadResult(len(requests), 0.0)
    position = 0
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=concurrency), timeout=timeout
    ) as session:

        async def worker() -> None:
            nonlocal position
            while position < len(requests):
                request = requests[position]
                position += 1
                status, seconds = await post_prepared(session, base_url, request)
                result.statuses[status] += 1
                result.latencies.append(seconds)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        result.elapsed = time.perf_counter() - started
    return result


async def open_loop(
    base_url: str, requests: Sequence[Prepared], rate: float, max_in_flight: int = 1024
) -> LoadResult:
    """Request i is due at i / rate seconds; its latency counts from then (waiting included)."""
    result = LoadResult(len(requests), 0.0)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=max_in_flight), timeout=timeout
    ) as session:
        started = time.perf_counter()

        async def one(index: int, request: Prepared) -> None:
            due = started + index / rate
            status, _ = await post_prepared(session, base_url, request)
            result.statuses[status] += 1
            result.latencies.append(time.perf_counter() - due)

        tasks = []
        for index, request in enumerate(requests):
            wait = started + index / rate - time.perf_counter()
            if wait > 0:
                await asyncio.sleep(wait)
            tasks.append(asyncio.create_task(one(index, request)))
        await asyncio.gather(*tasks)
        result.elapsed = time.perf_counter() - started
    return result


async def send_all(base_url: str, requests: Iterable[Prepared], concurrency: int = 16) -> None:
    """Set-up traffic (not measured); raises on any refusal."""
    result = await closed_loop(base_url, list(requests), concurrency)
    if result.failed:
        raise RuntimeError(f"set-up requests refused: {dict(result.statuses)}")


# --- the bare aiohttp handler --------------------------------------------------------------------


def serve_bare(port: int) -> None:
    """Parse the form, check the signature (twilio's RequestValidator, as meterd), answer 204."""
    from aiohttp import web
    from twilio.request_validator import RequestValidator

    validator = RequestValidator(TWILIO_TOKEN)

    async def handler(request: web.Request) -> web.Response:
        form = await request.post()
        url = PUBLIC_BASE_URL + request.raw_path
        if not validator.validate(url, form, request.headers.get("X-Twilio-Signature", "")):
            return web.Response(status=403)
        return web.Response(status=204)

    app = web.Application(client_max_size=64 * 1024)
    app.router.add_post("/twilio/{name}", handler)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


@contextlib.contextmanager
def bare_server() -> Any:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "bench.ingest", "--serve-bare", str(port)],
        cwd=Path(__file__).parent.parent,
    )
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                break
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(10)


# --- profiling (optional: py-spy, installed outside the project) --------------------------------


@contextlib.contextmanager
def profiled(pid: int, py_spy: str | None, output: Path) -> Any:
    """Sample `pid` with `py-spy record` (collapsed stacks to `output`) while the block runs."""
    if not py_spy:
        yield None
        return
    process = subprocess.Popen(
        [
            py_spy,
            "record",
            "--pid",
            str(pid),
            "--rate",
            "200",
            "--format",
            "raw",
            "-o",
            str(output),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(0.5)
    try:
        yield output
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()


PROFILE_PARTS = (
    ("SQLite work on aiosqlite's thread (SQL, commit, fsync)", "aiosqlite/core.py"),
    ("event loop waiting for I/O (idle)", "selectors.py"),
    ("metering tick (meterd/services/metering.py)", "meterd/services/metering.py"),
    ("webhook handling (meterd/web/twilio.py)", "meterd/web/twilio.py"),
    ("  of which recording the event (meterd/services/ingest.py)", "meterd/services/ingest.py"),
    ("  of which form + signature (twilio_request.py)", "meterd/web/twilio_request.py"),
    ("SQLAlchemy (all callers)", "sqlalchemy/"),
    ("asyncpg (all callers)", "asyncpg/"),
    ("structlog logging (all callers)", "structlog/"),
    ("aiohttp (all callers)", "aiohttp/"),
    ("prometheus_client (all callers)", "prometheus_client/"),
)


def profile_summary(path: Path, top: int = 12) -> list[str]:
    """Where the sampled time went: the share of samples whose stack passes through each part
    (parts overlap), then meterd's innermost frames."""
    if not path.exists():
        return [f"(no profile at {path})"]
    parts: Counter[str] = Counter()
    own: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        for name, needle in PROFILE_PARTS:
            if needle in stack:
                parts[name] += count
        frames = [f for f in stack.split(";") if "(meterd/" in f and "cli.py" not in f]
        if frames:
            own[frames[-1]] += count
    if not total:
        return ["(empty profile)"]
    lines = [f"py-spy: {total} samples (all threads); share of samples through:"]
    lines += [f"  {parts[name] / total:6.1%}  {name}" for name, _ in PROFILE_PARTS]
    lines.append("innermost meterd frames (their own time + the libraries they called):")
    lines += [f"  {count / total:6.1%}  {frame}" for frame, count in own.most_common(top)]
    return lines


# --- the bench -----------------------------------------------------------------------------------


async def measure_meterd(
    backend: str, args: argparse.Namespace, workdir: Path
) -> tuple[LoadResult, dict[float, LoadResult], float]:
    rates = [float(r) for r in args.rate.split(",")]
    paced_events = [int(rate * args.rate_seconds) for rate in rates]
    async with backend_url(backend, workdir) as url:
        meterd = MeterdProcess(workdir / backend, url).start()
        try:
            run = int.from_bytes(os.urandom(4), "big")
            numbers = [f"+1555{run % 10**6:06d}{k:03d}" for k in range(50)]
            create_account(meterd, "bench", numbers)
            paced_calls = [-(-n // args.events_per_call) for n in paced_events]
            total_calls = args.calls + sum(paced_calls)
            await send_all(
                meterd.base_url,
                (voice(run, n, numbers[n % len(numbers)]) for n in range(total_calls)),
            )
            base = int(time.time()) - 120

            def events_of(first: int, count: int) -> list[Prepared]:
                """The callbacks of `count` calls, interleaved as live calls interleave (one
                call's callbacks all at once would queue on that call's row lock)."""
                out = [
                    e
                    for n in range(first, first + count)
                    for e in conference_events(run, n, base, args.events_per_call)
                ]
                random.Random(first).shuffle(out)
                return out

            events = events_of(0, args.calls)
            cpu_before = meterd.cpu_seconds()
            profile = workdir / f"ingest-{backend}.txt"
            with profiled(meterd.pid, args.py_spy, profile):
                closed = await closed_loop(meterd.base_url, events, args.concurrency)
            cpu = meterd.cpu_seconds() - cpu_before
            if args.py_spy:
                print("\n".join(profile_summary(profile)), flush=True)
                if args.keep_profiles:
                    shutil.copy(profile, Path(args.keep_profiles) / profile.name)
            opened = {}
            first = args.calls
            for rate, count, calls_needed in zip(rates, paced_events, paced_calls, strict=True):
                await asyncio.sleep(5)  # let the tick work off what the last burst woke
                paced = events_of(first, calls_needed)[:count]
                first += calls_needed
                opened[rate] = await open_loop(meterd.base_url, paced, rate)
                print(
                    f"{backend} at {rate:g}/s: p99 {opened[rate].percentile_ms(0.99):,.0f} ms",
                    flush=True,
                )
            if "InvariantBroken" in meterd.log() or meterd.process.poll() is not None:
                raise RuntimeError(f"meterd failed during the bench:\n{meterd.log()[-3000:]}")
        finally:
            meterd.stop()
    return closed, opened, cpu


async def measure_bare(args: argparse.Namespace) -> LoadResult:
    run = 7
    base = int(time.time()) - 120
    events = [
        e for n in range(args.calls) for e in conference_events(run, n, base, args.events_per_call)
    ]
    with bare_server() as url:
        await closed_loop(url, events[: min(2000, len(events))], args.concurrency)  # warm up
        return await closed_loop(url, events, args.concurrency)


async def main_async(args: argparse.Namespace) -> None:
    events = args.calls * args.events_per_call
    bare = await measure_bare(args)
    print(f"bare aiohttp: {bare.rate:,.0f}/s p50 {bare.percentile_ms(0.5):.1f} ms", flush=True)
    rows = [
        "| handler | requests/s | p50 ms | p99 ms | vs bare | daemon CPU ms/event | refused |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        f"| bare aiohttp, parse + signature check, 204 (separate process) | {bare.rate:,.0f} | "
        f"{bare.percentile_ms(0.5):.1f} | {bare.percentile_ms(0.99):.1f} | 100% | | "
        f"{bare.failed} |",
    ]
    paced_rows = [
        "| meterd on | offered events/s | achieved/s | p50 ms | p99 ms | max ms | refused |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    verdicts = []
    with tempfile.TemporaryDirectory(prefix="meterd-bench-") as directory:
        for backend in args.backends.split(","):
            closed, opened, cpu = await measure_meterd(backend, args, Path(directory))
            ratio = closed.rate / bare.rate
            print(f"{backend}: {closed.rate:,.0f}/s ({ratio:.0%} of bare)", flush=True)
            rows.append(
                f"| meterd on {backend} (signature check, durable record) | {closed.rate:,.0f} | "
                f"{closed.percentile_ms(0.5):.1f} | {closed.percentile_ms(0.99):.1f} | "
                f"{ratio:.1%} | {cpu / events * 1000:.2f} | {closed.failed} |"
            )
            for rate, result in opened.items():
                paced_rows.append(
                    f"| {backend} | {rate:g} | {result.rate:,.0f} | "
                    f"{result.percentile_ms(0.5):,.1f} | {result.percentile_ms(0.99):,.1f} | "
                    f"{result.percentile_ms(1.0):,.0f} | {result.failed} |"
                )
            at_500 = opened.get(500.0)
            verdicts.append(
                f"- {backend}: >= 50% of bare: {'met' if ratio >= 0.5 else 'MISSED'} "
                f"({ratio:.1%}); >= 2,000 events/s: "
                f"{'met' if closed.rate >= 2000 else 'MISSED'} ({closed.rate:,.0f})"
                + (
                    f"; p99 <= 25 ms at 500 events/s: "
                    f"{'met' if at_500.percentile_ms(0.99) <= 25 else 'MISSED'} "
                    f"({at_500.percentile_ms(0.99):,.0f} ms)"
                    if at_500
                    else ""
                )
            )
            shutil.rmtree(Path(directory) / backend, ignore_errors=True)
    report(
        args,
        f"Webhook ingest: {events:,} signed conference callbacks ({args.calls:,} calls x "
        f"{args.events_per_call}), concurrency {args.concurrency}; then a fixed rate for "
        f"{args.rate_seconds:g} s each",
        [
            *rows,
            "",
            "Open loop (latency counted from when each request was due):",
            "",
            *paced_rows,
            "",
            "Targets (2 cores): ingest >= 50% of bare aiohttp and >= 2,000 events/s; p99 <= 25 ms "
            "at 500 events/s.",
            *verdicts,
            *([args.note] if args.note else []),
        ],
    )


def add_profile_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--py-spy",
        default=None,
        help="path of a py-spy binary: sample meterd during the measurement and print where "
        "the time goes (pip install --target /tmp/pyspy py-spy)",
    )
    parser.add_argument("--keep-profiles", default=None, help="directory to copy profiles to")


def report(args: argparse.Namespace, title: str, lines: list[str]) -> None:
    """Append to bench/RESULTS.md (with date, machine, commit), or only print (--no-append)."""
    one, five, _ = os.getloadavg()
    lines = [
        *lines,
        "",
        f"Load average when written: {one:.2f} (1 min), {five:.2f} (5 min); other sessions may "
        "share the machine, so figures vary by tens of percent between runs.",
    ]
    if getattr(args, "no_append", False):
        print(f"\n## {title}\n\n" + "\n".join(lines))
    else:
        append(title, lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=2500)
    parser.add_argument("--events-per-call", type=int, default=8, choices=range(1, 9))
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rate", default="500", help="fixed rates (events/s), comma-separated")
    parser.add_argument("--rate-seconds", type=float, default=10.0)
    parser.add_argument("--backends", default="sqlite,postgresql")
    parser.add_argument("--note", default="", help="a sentence added to RESULTS.md")
    parser.add_argument("--no-append", action="store_true", help="print, do not append")
    add_profile_arguments(parser)
    parser.add_argument("--serve-bare", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_bare is not None:
        serve_bare(args.serve_bare)
        return
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
