"""A connection flood against the real daemon (issue 12, acceptance 4), smaller than the bench
run (bench/connections.py: 2,000 idle and 800 slowloris) and with short timeouts: the clients past
the limits are closed, the health probe keeps getting in, and memory stays bounded."""

from __future__ import annotations

import asyncio

from bench.connections import flood, flood_env

from .daemon import Daemon

CONNECTIONS_MAX = 100
RSS_BOUND_MIB = 200  # the README's bound at the default limits; this run is smaller


def test_idle_and_slow_clients_are_closed_and_healthz_keeps_answering(tmp_path):
    daemon = Daemon(tmp_path, env=flood_env(CONNECTIONS_MAX, 3, 3)).start()
    try:
        report = asyncio.run(
            flood(
                daemon,
                idle=600,
                slow=200,
                floods=20,
                idle_timeout_seconds=3,
                read_timeout_seconds=3,
            )
        )
    finally:
        assert daemon.stop() == 0
    print("\n".join(report.lines()))
    assert report.open_reported == 1  # the /metrics request itself: every flood client is gone
    # 127 headers of 8 KB: refused before any work, by aiohttp's header limits (400) or, when
    # every slot is held by a client still within its grace period, at the connection (503)
    assert sum(report.flood_answers.values()) == 20, report.flood_answers
    assert set(report.flood_answers) <= {"400", "503"}, report.flood_answers
    answered = len(report.probe_latencies)
    assert answered >= 10 and report.probe_failures <= answered // 10, report.lines()
    assert report.rss_peak_kib < RSS_BOUND_MIB * 1024, report.lines()
