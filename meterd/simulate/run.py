"""The run: set up its accounts, place the calls at the given rate, read each back as meterd
settles it, check the accounts, summarise."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping

import aiohttp

from meterd.simulate.client import Meterd, SetupFailed, read_prices, set_up_accounts
from meterd.simulate.expectation import Prices
from meterd.simulate.playback import Options, place_call
from meterd.simulate.readback import check_accounts, verify_call
from meterd.simulate.scenarios import AGENT_NAMES, PlannedCall, plan_calls
from meterd.simulate.summary import Outcome, Progress, print_differences, summarise

EXIT_OK, EXIT_DIFFERENCES, EXIT_CANNOT_RUN = 0, 1, 2
REQUEST_TIMEOUT_SECONDS = 30
READ_BACKS_IN_FLIGHT = 8  # reading back must not crowd out the traffic


async def simulate(
    base_url: str,
    *,
    calls: int,
    cps: float,
    agents_max: int = 3,
    duplicates: bool = False,
    reorder: bool = False,
    time_scale: float = 0.0,
    twilio_auth_token: str,
    public_base_url: str,
    admin_token: str,
    agents_token: str,
    seed: int,
    progress: bool = True,
    settle_delay: int = 300,
    increment_seconds: int = 60,
    max_call_seconds: int = 900,
    settle_timeout: float | None = None,
    concurrency: int = 64,
    waiver_reason: str = "software_defect",
    out: Callable[[str], None] = print,
) -> int:
    """Run the simulation; 0 if every call matched, 1 with differences, 2 if it could not run."""
    tokens = {
        "twilio auth token": twilio_auth_token,
        "admin token": admin_token,
        "agents token": agents_token,
    }
    refusal = _refusal(calls, cps, agents_max, time_scale, tokens)
    if refusal:
        out(refusal)
        return EXIT_CANNOT_RUN
    rng = random.Random(seed)
    nonce = int.from_bytes(os.urandom(4), "big")
    options = Options(duplicates, reorder, time_scale, settle_delay, waiver_reason)
    async with _session(concurrency) as session:
        meterd = Meterd(
            session,
            base_url,
            public_base_url or base_url,
            twilio_auth_token=twilio_auth_token,
            admin_token=admin_token,
            agents_token=agents_token,
            concurrency=concurrency,
        )
        try:
            accounts = await set_up_accounts(meterd, rng, nonce, calls)
            prices = await read_prices(meterd, accounts["bank"].currency, increment_seconds)
        except (SetupFailed, aiohttp.ClientError, OSError, KeyError) as error:
            out(f"simulate: cannot set up at {base_url}: {error}")
            return EXIT_CANNOT_RUN
        planned = plan_calls(
            rng,
            accounts,
            calls=calls,
            agents_max=agents_max,
            max_call_seconds=max_call_seconds,
            nonce=nonce,
        )
        outcome = await _play_and_check(
            meterd, planned, prices, options, rng, cps, progress, settle_timeout
        )
        outcome.account_problems = await check_accounts(meterd, accounts, planned, prices)
    summarise(planned, meterd.stats, prices, outcome, options=options, seed=seed, cps=cps)
    return _verdict(out, planned, outcome, seed)


def _verdict(
    out: Callable[[str], None], planned: list[PlannedCall], outcome: Outcome, seed: int
) -> int:
    """Every difference, or that there were none: the exit status."""
    if print_differences(out, planned, outcome, seed):
        return EXIT_DIFFERENCES
    out(f"\nOK: all {len(planned)} calls matched the expectation (seed {seed}).")
    return EXIT_OK


@contextlib.asynccontextmanager
async def _session(concurrency: int) -> AsyncIterator[aiohttp.ClientSession]:
    """The HTTP session of the run's requests: at most `concurrency` connections at a time, each
    request given up after `REQUEST_TIMEOUT_SECONDS`."""
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_SECONDS)
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        yield session


def _refusal(
    calls: int, cps: float, agents_max: int, time_scale: float, tokens: Mapping[str, str]
) -> str | None:
    """Why the run cannot start, if it cannot."""
    if calls < 1 or cps <= 0 or not 1 <= agents_max <= len(AGENT_NAMES) or time_scale < 0:
        return "simulate: need calls >= 1, cps > 0, 1 <= agents_max <= 10, time_scale >= 0"
    missing = [name for name, value in tokens.items() if not value]
    if missing:
        return (
            f"simulate: missing {', '.join(missing)}: give them, or the daemon's state "
            f"directory (--state-dir), whose secrets/ holds them (see --help)"
        )
    return None


async def _play_and_check(
    meterd: Meterd,
    planned: list[PlannedCall],
    prices: Prices,
    options: Options,
    rng: random.Random,
    cps: float,
    progress: bool,
    settle_timeout: float | None,
) -> Outcome:
    """Place the calls, `cps` new calls a second, and read each finished one back until meterd
    has settled it; `settle_timeout` seconds (default: the settle delay + 120) after the last
    call was delivered (and the longest call lasted, in real time), the calls still not settled
    are differences."""
    longest = max(c.end for c in planned) * options.time_scale
    patience = (settle_timeout or options.settle_delay + 120) + longest
    call_rngs = [random.Random(rng.getrandbits(64)) for _ in planned]
    bar = Progress(len(planned), progress)
    results: dict[str, list[str]] = {}
    started = time.monotonic()

    async def place_all() -> None:
        tasks = []
        for index, call in enumerate(planned):
            wait = started + index / cps - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            tasks.append(asyncio.create_task(place_call(meterd, call, options, call_rngs[index])))
        await asyncio.gather(*tasks)

    read_back_slots = asyncio.Semaphore(READ_BACKS_IN_FLIGHT)

    async def verify(call: PlannedCall) -> list[str] | None:
        async with read_back_slots:
            return await verify_call(meterd, call, prices, options)

    placing = asyncio.create_task(place_all())
    delivered_at: float | None = None
    while True:
        if placing.done() and delivered_at is None:
            delivered_at = time.monotonic()
            placing.result()
        await _read_back_finished(planned, results, verify)
        bar.update(
            placed=sum(c.finished for c in planned),
            settled=len(results),
            differing=sum(bool(p) for p in results.values()),
        )
        if len(results) == len(planned):
            break
        if delivered_at is not None and time.monotonic() - delivered_at > patience:
            for call in planned:
                results.setdefault(call.call_sid, [*call.problems, "not settled in time"])
            break
        await asyncio.sleep(1.0)
    settled_at = time.monotonic()
    bar.close()
    return Outcome(results, (delivered_at or settled_at) - started, settled_at - started)


async def _read_back_finished(
    planned: list[PlannedCall],
    results: dict[str, list[str]],
    verify: Callable[[PlannedCall], Awaitable[list[str] | None]],
) -> None:
    """Into `results`: each call played to its end and settled (its differences), and each call
    meterd's answers stopped early (its problems)."""
    ready = [c for c in planned if c.finished and c.call_sid not in results]
    for call in ready:
        if call.aborted:
            results[call.call_sid] = list(call.problems)
    checking = [c for c in ready if not c.aborted]
    checks = await asyncio.gather(*(verify(c) for c in checking))
    for call, differences in zip(checking, checks, strict=True):
        if differences is not None:
            results[call.call_sid] = call.problems + differences
