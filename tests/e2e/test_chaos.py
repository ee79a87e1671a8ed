"""Issue 12: bench/chaos.py in small. The real daemon is killed with SIGKILL 3 times (at a random
moment, during start-up, just after a minute falls due) while 3 calls are metered live and their
Twilio callbacks are retried until they get a 2xx; afterwards every event answered 2xx is stored
once, every minute of every call stands once in the ledger (none beyond the call's script), the
charges equal the expectation worked out from the script, and `meterd ledger check` passes. The
bench run does 100 kills:

    .venv/bin/python -m bench.chaos --kills 100
"""

from __future__ import annotations

import asyncio

from bench.chaos import ChaosConfig, run_chaos


def test_kill_9_three_times_under_live_metering_loses_and_repeats_nothing(tmp_path):
    config = ChaosConfig(
        kills=3,
        concurrent_calls=3,
        max_calls=3,
        # 70 to 95 s long by Twilio's timestamps, placed 55 to 65 s in: a backlog of minutes is
        # due at once, and the rest (about 10 to 30 s, more than the kills take) is played live
        call_seconds=(70, 95),
        head_start=(55, 65),
        live_seconds_min=10,
        up_seconds=(1.0, 3.0),
        startup_kill_share=0.34,
        seed=1,  # kills: at a random moment, during start-up, aimed at a minute falling due
        workdir=tmp_path,
    )
    result = asyncio.run(run_chaos(config))
    print(result.summary(), result.stats)
    assert result.problems == [], "\n".join(result.problems[:40])
    assert (result.kills, result.calls) == (3, 3)
    assert result.lost == 0 and result.repeated == 0
    assert result.ledger_check_ok
    assert result.stats["kills"].get("start-up") == 1
    assert result.stats["minutes expected"] > 0
    assert result.summary() == "kills=3 calls=3 lost=0 repeated=0 ledger check OK"
