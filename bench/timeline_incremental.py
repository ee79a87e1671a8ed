"""Cost of keeping a call's timeline incrementally (meterd/core/timeline_incremental.py) against
rebuilding it from all its events (`build_timeline`), for calls of N conference events.

    .venv/bin/python -m bench.timeline_incremental [--sizes 10,100,1000] [--repeat 5]

Per size, best of `--repeat` runs, in microseconds:
- `add in order`: `TimelineState.add_event` per event, every event arriving in sequence order;
- `add 10% late`: the same with every tenth event arriving three events late (each late one takes
  back and replays the three after it);
- `timeline_at`: building the result from the state holding the N events;
- `rebuild`: `build_timeline` of the N events (what a tick does today, after loading them);
- `per event, incremental`: one `add_event` then one `timeline_at` (the state kept current and
  read after every event), against `per event, rebuild`: one `build_timeline` of them all.
Prints a table; writes nothing (bench/RESULTS.md is edited by hand).
"""

from __future__ import annotations

import argparse
import random
import time
from collections.abc import Callable

from meterd.core.timeline import ConferenceEvent, ResearchMark, build_timeline
from meterd.core.timeline_incremental import TimelineState

T0 = 1_700_000_000
CUSTOMER = "CAcustomer"
AGENTS = ("CAagent0", "CAagent1", "CAagent2")
RESEARCH_MAX_SECONDS = 7200


def call_events(count: int, seed: int = 1) -> list[ConferenceEvent]:
    """A customer and three agents: joins, then holds, unholds, leaves and re-joins."""
    rng = random.Random(seed)
    labels = {CUSTOMER: "customer", **{sid: f"agent:a{n}" for n, sid in enumerate(AGENTS)}}
    inside = {sid: False for sid in labels}
    events: list[ConferenceEvent] = [ConferenceEvent(0, T0, "conference-start")]
    at = T0
    while len(events) < count:
        at += rng.randint(1, 30)
        sid = rng.choice([CUSTOMER, *AGENTS])
        if not inside[sid]:
            kind, hold = "participant-join", False
            inside[sid] = True
        else:
            kind = rng.choice(["participant-hold", "participant-unhold", "participant-leave"])
            hold = kind == "participant-hold"
            inside[sid] = kind != "participant-leave"
        events.append(ConferenceEvent(len(events), at, kind, sid, labels[sid], hold))
    return events


def ten_percent_late(events: list[ConferenceEvent]) -> list[ConferenceEvent]:
    arrivals = list(events)
    for index in range(5, len(arrivals) - 3, 10):
        arrivals.insert(index + 3, arrivals.pop(index))
    return arrivals


def best_seconds(run: Callable[[], object], repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - started)
    return best


def fed(arrivals: list[ConferenceEvent]) -> TimelineState:
    state = TimelineState(customer_call_sid=CUSTOMER)
    for event in arrivals:
        state.add_event(event)
    return state


def measure(count: int, repeat: int) -> dict[str, float]:
    """Microseconds for each figure of the module's docstring."""
    events = call_events(count)
    marks = [ResearchMark("a0", T0 + 10, T0 + 100), ResearchMark("a1", T0 + 50, None)]
    now_seconds = events[-1].at_seconds + 30
    state = fed(events)
    for mark in marks:
        state.add_research(mark)

    def read() -> object:
        return state.timeline_at(now_seconds=now_seconds, research_max_seconds=RESEARCH_MAX_SECONDS)

    def rebuild() -> object:
        return build_timeline(
            events,
            marks,
            now_seconds=now_seconds,
            research_max_seconds=RESEARCH_MAX_SECONDS,
            customer_call_sid=CUSTOMER,
        )

    if read() != rebuild():
        raise SystemExit(f"N={count}: the incremental timeline differs from the rebuild")
    late = ten_percent_late(events)
    micro = 1e6
    add_in_order = best_seconds(lambda: fed(events), repeat) * micro / count
    return {
        "add in order": add_in_order,
        "add 10% late": best_seconds(lambda: fed(late), repeat) * micro / count,
        "timeline_at": best_seconds(read, repeat) * micro,
        "rebuild": best_seconds(rebuild, repeat) * micro,
        "per event, incremental": add_in_order + best_seconds(read, repeat) * micro,
        "per event, rebuild": best_seconds(rebuild, repeat) * micro,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10,100,1000")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    sizes = [int(size) for size in args.sizes.split(",")]
    rows = {size: measure(size, args.repeat) for size in sizes}
    names = list(next(iter(rows.values())))
    print(f"{'microseconds':<24}" + "".join(f"{f'N={size}':>12}" for size in sizes))
    for name in names:
        print(f"{name:<24}" + "".join(f"{rows[size][name]:>12.1f}" for size in sizes))
    print(
        f"{'speed-up per event':<24}"
        + "".join(
            f"{rows[s]['per event, rebuild'] / rows[s]['per event, incremental']:>11.1f}x"
            for s in sizes
        )
    )
    print(
        f"{'add vs rebuild':<24}"
        + "".join(f"{rows[s]['rebuild'] / rows[s]['add in order']:>11.0f}x" for s in sizes)
    )


if __name__ == "__main__":
    main()
