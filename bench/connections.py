"""A connection flood against the real daemon: idle clients, slowloris, header floods.

    .venv/bin/python -m bench.connections [--idle 2000] [--slow 800] [--floods 100]
        [--idle-timeout 15] [--read-timeout 10] [--connections-max 512]

Against one `meterd run` (SQLite, its own state directory) it opens `idle` connections that send
nothing, `slow` connections that send a request a byte a second (half trickle their headers, half
their body), and `floods` requests with 127 headers of 8 KB each, all at once. Throughout, a
health probe opens a fresh connection every 0.25 s and times `GET /healthz`, and the daemon's
resident memory (VmRSS) is sampled. It reports how many of the clients' connections the daemon
closed and when, how many are still open at the end, the health probes' latency, and RSS before,
at its peak and after. `tests/e2e/test_connection_flood.py` runs it smaller, with short timeouts.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from bench._machine import append
from tests.e2e.daemon import Daemon

PROBE_INTERVAL_SECONDS = 0.25
SETTLE_SECONDS = 5.0  # after the last limit could have acted


@dataclass
class FloodReport:
    idle: int
    slow: int
    floods: int
    closed_by_server: int = 0
    still_open: int = 0
    flood_answers: dict[str, int] = field(default_factory=dict)
    probe_latencies: list[float] = field(default_factory=list)
    probe_failures: int = 0
    probe_failure_reasons: dict[str, int] = field(default_factory=dict)
    rss_before_kib: int = 0
    rss_peak_kib: int = 0
    rss_after_kib: int = 0
    open_reported: int = -1  # meterd_http_connections at the end

    @property
    def probe_max_seconds(self) -> float:
        return max(self.probe_latencies, default=float("nan"))

    def lines(self) -> list[str]:
        latencies = sorted(self.probe_latencies)
        p99 = latencies[int(len(latencies) * 0.99) - 1] if latencies else float("nan")
        return [
            f"- clients: {self.idle} idle, {self.slow} slowloris (half headers, half body, "
            f"1 byte/s), {self.floods} requests with 127 headers of 8 KB",
            f"- connections meterd holds at the end (meterd_http_connections, the /metrics "
            f"request itself included): {self.open_reported}; the clients had seen "
            f"{self.closed_by_server} of {self.idle + self.slow} closed",
            f"- header floods answered: {self.flood_answers}",
            f"- /healthz probes: {len(self.probe_latencies)} answered, {self.probe_failures} "
            f"failed {self.probe_failure_reasons or ''}; p99 {p99 * 1000:.0f} ms, "
            f"max {self.probe_max_seconds * 1000:.0f} ms",
            f"- RSS: {self.rss_before_kib / 1024:.0f} MiB before, peak "
            f"{self.rss_peak_kib / 1024:.0f} MiB, {self.rss_after_kib / 1024:.0f} MiB after",
        ]


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


async def _until_closed(reader: asyncio.StreamReader) -> None:
    with contextlib.suppress(ConnectionError):
        while await reader.read(65536):
            pass


async def _idle(port: int, closed: list[float]) -> asyncio.StreamWriter | None:
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        closed.append(time.monotonic())
        return None
    asyncio.get_running_loop().create_task(_watch(reader, closed))
    return writer


async def _watch(reader: asyncio.StreamReader, closed: list[float]) -> None:
    await _until_closed(reader)
    closed.append(time.monotonic())


async def _slowloris(port: int, body: bool, closed: list[float], stop: asyncio.Event) -> None:
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        closed.append(time.monotonic())
        return
    watcher = asyncio.get_running_loop().create_task(_watch(reader, closed))
    head = b"POST /twilio/conference HTTP/1.1\r\nHost: meterd\r\n"
    if body:
        writer.write(
            head + b"Content-Type: application/x-www-form-urlencoded\r\n"
            b"Content-Length: 100000\r\n\r\n"
        )
        trickle = b"a" * 100000
    else:
        trickle = b"X-Slow: " + b"a" * 100000
    with contextlib.suppress(ConnectionError, RuntimeError):
        for byte in trickle:
            if watcher.done() or stop.is_set():
                break
            writer.write(bytes([byte]))
            await asyncio.sleep(1.0)
    writer.close()


async def _flood(port: int, answers: dict[str, int]) -> None:
    headers = b"".join(b"X-Flood-%d: %s\r\n" % (n, b"f" * 8000) for n in range(127))
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: meterd\r\n" + headers + b"\r\n")
        await writer.drain()
        status_line = await asyncio.wait_for(reader.readline(), 30)
        key = status_line.split(b" ")[1].decode() if status_line else "closed"
    except (OSError, TimeoutError, IndexError):
        key = "closed"
    answers[key] = answers.get(key, 0) + 1
    with contextlib.suppress(Exception):
        writer.close()


async def _probe(port: int, report: FloodReport, stop: asyncio.Event) -> None:
    request = b"GET /healthz HTTP/1.1\r\nHost: meterd\r\nConnection: close\r\n\r\n"
    while not stop.is_set():
        started = time.monotonic()
        try:
            async with asyncio.timeout(5):
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(request)
                answer = await reader.read()
                writer.close()
            if answer.startswith(b"HTTP/1.1 200 "):
                report.probe_latencies.append(time.monotonic() - started)
                reason = ""
            else:
                reason = answer[:12].decode(errors="replace") or "closed without an answer"
        except (OSError, TimeoutError) as error:
            reason = type(error).__name__
        if reason:
            report.probe_failures += 1
            report.probe_failure_reasons[reason] = report.probe_failure_reasons.get(reason, 0) + 1
        await asyncio.sleep(PROBE_INTERVAL_SECONDS)


async def _sample_rss(pid: int, report: FloodReport, stop: asyncio.Event) -> None:
    while not stop.is_set():
        report.rss_peak_kib = max(report.rss_peak_kib, rss_kib(pid))
        await asyncio.sleep(0.2)


async def flood(
    daemon: Daemon,
    *,
    idle: int,
    slow: int,
    floods: int,
    idle_timeout_seconds: float,
    read_timeout_seconds: float,
) -> FloodReport:
    assert daemon.process is not None
    pid = daemon.process.pid
    report = FloodReport(idle=idle, slow=slow, floods=floods)
    report.rss_before_kib = rss_kib(pid)
    stop = asyncio.Event()
    closed: list[float] = []
    background = [
        asyncio.create_task(_probe(daemon.port, report, stop)),
        asyncio.create_task(_sample_rss(pid, report, stop)),
    ]
    writers = await asyncio.gather(*(_idle(daemon.port, closed) for _ in range(idle)))
    slow_tasks = [
        asyncio.create_task(_slowloris(daemon.port, n % 2 == 1, closed, stop)) for n in range(slow)
    ]
    await asyncio.gather(*(_flood(daemon.port, report.flood_answers) for _ in range(floods)))
    # every limit has acted by now: idle and header trickles at the idle timeout, bodies at
    # the read timeout after their headers
    await asyncio.sleep(max(idle_timeout_seconds, read_timeout_seconds) + SETTLE_SECONDS)
    report.closed_by_server = len(closed)
    report.still_open = idle + slow - len(closed)
    # the health probe stops first: a probe in flight would be counted with the /metrics request
    stop.set()
    await asyncio.gather(*background, return_exceptions=True)
    with contextlib.suppress(Exception):
        metrics = await asyncio.to_thread(_get, daemon.base_url + "/metrics")
        line = next(x for x in metrics.splitlines() if x.startswith("meterd_http_connections "))
        report.open_reported = int(float(line.split()[1]))
    for writer in writers:
        if writer is not None:
            writer.close()
    await asyncio.gather(*slow_tasks, return_exceptions=True)
    await asyncio.sleep(1)
    report.rss_after_kib = rss_kib(pid)
    return report


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as answer:  # noqa: S310 - http to the daemon
        return answer.read().decode()


def flood_env(connections_max: int, idle_timeout: float, read_timeout: float) -> dict[str, str]:
    return {
        "METERD_HTTP_CONNECTIONS_MAX": str(connections_max),
        "METERD_HTTP_IDLE_TIMEOUT_SECONDS": str(int(idle_timeout)),
        "METERD_HTTP_REQUEST_READ_TIMEOUT_SECONDS": str(int(read_timeout)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--idle", type=int, default=2000)
    parser.add_argument("--slow", type=int, default=800)
    parser.add_argument("--floods", type=int, default=100)
    parser.add_argument("--idle-timeout", type=int, default=15)
    parser.add_argument("--read-timeout", type=int, default=10)
    parser.add_argument("--connections-max", type=int, default=512)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="meterd-flood-"))
    daemon = Daemon(
        workdir, env=flood_env(args.connections_max, args.idle_timeout, args.read_timeout)
    ).start()
    try:
        report = asyncio.run(
            flood(
                daemon,
                idle=args.idle,
                slow=args.slow,
                floods=args.floods,
                idle_timeout_seconds=args.idle_timeout,
                read_timeout_seconds=args.read_timeout,
            )
        )
    finally:
        daemon.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    append(
        "Connection flood (bench/connections.py)",
        [
            f"`python -m bench.connections --idle {args.idle} --slow {args.slow} --floods "
            f"{args.floods}`, http_connections_max {args.connections_max}, idle timeout "
            f"{args.idle_timeout} s, read timeout {args.read_timeout} s, SQLite",
            "",
            *report.lines(),
        ],
    )


if __name__ == "__main__":
    main()
