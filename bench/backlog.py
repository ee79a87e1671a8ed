"""A day of backlog against the real daemon: how long do webhooks wait while it is posted?

    .venv/bin/python -m bench.backlog [--backlog-hours 24] [--interval-ms 50]

Issue 12, finding 0: a join a day old once posted 1,440 minutes in one 5-s transaction that held
the write lock, and every webhook waited behind it. Now the tick posts at most
MINUTES_PER_TRANSACTION_MAX minutes of a call per transaction and yields between batches. This
bench starts `meterd run` (SQLite), connects a service-agreement call whose customer and agent
joined `backlog-hours` ago, and while the tick catches up it sends a signed conference callback
(hold / unhold of a second call) every `interval-ms`, timing each. It reports how long the
catch-up took and the callbacks' latency (p50, p99, max) during it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import shutil
import sqlite3
import tempfile
import time
from pathlib import Path

import aiohttp

from bench._machine import append
from meterd.services.minute_posting import MINUTES_PER_TRANSACTION_MAX
from tests.call_scripts import CallScript
from tests.e2e.daemon import Daemon
from tests.e2e.test_call_timelines import PUBLIC_BASE_URL, TWILIO_TOKEN, post_twilio
from tests.e2e.test_metering_daemon import daemon_env
from tests.twilio_payloads import encode_form, sign


def _percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))] if ordered else 0.0


async def measure(daemon: Daemon, backlog_hours: float, interval_ms: int) -> list[str]:
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    old = CallScript(1, now - dt.timedelta(hours=backlog_hours), from_number="+14155550101")
    old.join("customer", 0).join("agent:alice", 0)
    live = CallScript(2, now, from_number="+14155550102")
    live.join("customer", 0).join("agent:bob", 0)
    for script in (old, live):
        assert "<Conference" in post_twilio(daemon, "/twilio/voice", script.voice())[1]
    for params in live.events:
        assert post_twilio(daemon, "/twilio/conference", params)[0] == 204
    for offset in range(1, 100_000):
        (live.hold if offset % 2 else live.unhold)("customer", 0)
    callbacks = live.events[3:]
    expected = int(backlog_hours * 60)
    latencies: list[float] = []
    started = time.monotonic()
    for params in old.events:  # the day-old joins: the tick starts on the backlog
        assert post_twilio(daemon, "/twilio/conference", params)[0] == 204
    url = daemon.base_url + "/twilio/conference"
    async with aiohttp.ClientSession() as session:
        index = 0
        while True:
            params = callbacks[index]
            index += 1
            body = encode_form(params)
            headers = {
                "Content-Type": "application/x-www-form-urlencoded",
                "X-Twilio-Signature": sign(
                    PUBLIC_BASE_URL + "/twilio/conference", params, TWILIO_TOKEN
                ),
            }
            sent = time.monotonic()
            async with session.post(url, data=body, headers=headers) as response:
                assert response.status == 204, await response.text()
            latencies.append(time.monotonic() - sent)
            if index % 20 == 0:
                caught_up = await _caught_up(daemon, old.call_sid, expected)
                if caught_up:
                    break
            await asyncio.sleep(interval_ms / 1000)
    catch_up_seconds = time.monotonic() - started
    return [
        f"`python -m bench.backlog --backlog-hours {backlog_hours:g} --interval-ms "
        f"{interval_ms}`, SQLite, MINUTES_PER_TRANSACTION_MAX {MINUTES_PER_TRANSACTION_MAX}",
        "",
        f"- backlog: one call, one agent, {expected} minutes due at the join; caught up in "
        f"{catch_up_seconds:.1f} s",
        f"- conference callbacks meanwhile: {len(latencies)}, latency p50 "
        f"{_percentile(latencies, 0.5) * 1000:.0f} ms, "
        f"p99 {_percentile(latencies, 0.99) * 1000:.0f} ms, max {max(latencies) * 1000:.0f} ms",
    ]


async def _caught_up(daemon: Daemon, call_sid: str, expected: int) -> bool:
    def read() -> bool:
        path = daemon.cwd / "var" / "meterd.sqlite3"
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
            (posted,) = db.execute(
                "SELECT count(*) FROM ledger_transactions WHERE idempotency_key LIKE ?",
                (f"call:{call_sid}:agent:%:minute:%",),
            ).fetchone()
        return posted >= expected

    return await asyncio.to_thread(read)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backlog-hours", type=float, default=24)
    parser.add_argument("--interval-ms", type=int, default=50)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="meterd-backlog-"))
    env = daemon_env(
        METERD_TWILIO_CLOCK_SKEW_SECONDS_MAX=str(int(args.backlog_hours * 3600) + 3600)
    )
    daemon = Daemon(workdir, env=env).start()
    try:
        status, body = daemon.admin(
            "POST",
            "/admin/accounts",
            {
                "account_id": "acme",
                "name": "Acme",
                "plan": "service_agreement",
                "caller_ids": ["+14155550101", "+14155550102"],
            },
        )
        assert status == 201, body
        lines = asyncio.run(measure(daemon, args.backlog_hours, args.interval_ms))
    finally:
        daemon.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    append("A day of backlog while webhooks arrive (bench/backlog.py)", lines)


if __name__ == "__main__":
    main()
