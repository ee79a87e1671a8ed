"""The progress bar while a run goes, and its summary tables."""

from __future__ import annotations

import sys
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from meterd.simulate.client import Stats
from meterd.simulate.expectation import Prices, expect
from meterd.simulate.playback import Options
from meterd.simulate.scenarios import PlannedCall


class Progress:
    """rich's progress bar when rich is installed, else a plain line on stderr."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total = total
        self.enabled = enabled
        self.placed = self.settled = self.differing = 0
        self._rich: Any = None
        self._last = 0.0
        if not enabled:
            return
        try:
            from rich.progress import Progress as RichProgress  # type: ignore[import-not-found, unused-ignore]
        except ImportError:
            return
        self._rich = RichProgress(transient=False)
        self._placed_task = self._rich.add_task("calls placed", total=total)
        self._settled_task = self._rich.add_task("calls settled and checked", total=total)
        self._rich.start()

    def update(self, *, placed: int, settled: int, differing: int) -> None:
        self.placed, self.settled, self.differing = placed, settled, differing
        if not self.enabled:
            return
        if self._rich is not None:
            self._rich.update(self._placed_task, completed=placed)
            self._rich.update(self._settled_task, completed=settled)
            return
        now = time.monotonic()
        tty = sys.stderr.isatty()
        if now - self._last < (0.2 if tty else 5.0) and settled < self.total:
            return
        self._last = now
        width = 30
        filled = int(width * settled / max(self.total, 1))
        line = (
            f"[{'#' * filled}{'.' * (width - filled)}] placed {placed}/{self.total}, "
            f"settled and checked {settled}/{self.total}, differing {differing}"
        )
        print(("\r" + line) if tty else line, end="" if tty else "\n", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._rich is not None:
            self._rich.stop()
        elif self.enabled and sys.stderr.isatty():
            print(file=sys.stderr)


def _percentile(values: list[float], fraction: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))]


def print_summary(rows: list[tuple[str, ...]], header: tuple[str, ...], title: str) -> None:
    try:
        from rich.console import Console  # type: ignore[import-not-found, unused-ignore]
        from rich.table import Table  # type: ignore[import-not-found, unused-ignore]
    except ImportError:
        widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
        print(f"\n{title}")
        line = "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))
        print(line)
        print("  ".join("-" * w for w in widths))
        for row in rows:
            cells = [
                (str(c).ljust(w) if i == 0 else str(c).rjust(w))
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            ]
            print("  ".join(cells))
        return
    table = Table(title=title)
    for index, name in enumerate(header):
        table.add_column(name, justify="left" if index == 0 else "right")
    for row in rows:
        table.add_row(*(str(c) for c in row))
    Console().print(table)


@dataclass
class Outcome:
    """What a run found: each call's differences by SID (empty: it matched), the accounts'
    differences, and how long delivering and settling took."""

    results: dict[str, list[str]]
    delivery_seconds: float
    total_seconds: float
    account_problems: list[str] = field(default_factory=list)


def summarise(
    planned: list[PlannedCall],
    stats: Stats,
    prices: Prices,
    outcome: Outcome,
    *,
    options: Options,
    seed: int,
    cps: float,
) -> None:
    """The calls by account (meterd's figures, agent-minutes against the expectation), then the
    run's figures."""
    header = ("account / calls", "calls", "agent-min", "bank min", "deposit", "incidents", "diff")
    print_summary(
        _call_rows(planned, prices, outcome.results),
        header,
        f"meterd simulation: {len(planned)} calls (agent-min: meterd/expected)",
    )
    latencies = [s * 1000 for s in stats.latencies]
    facts: list[tuple[str, ...]] = [
        ("seed", str(seed)),
        ("new calls per second", f"{cps:g}"),
        ("duplicates / reorder", f"{options.duplicates} / {options.reorder}"),
        ("time scale", f"{options.time_scale:g} (0: synthetic timestamps, no waiting)"),
        (
            "webhooks sent (of them duplicates)",
            f"{sum(stats.webhooks.values())} ({stats.duplicates})",
        ),
        ("agent and admin requests", f"{stats.agent_requests} / {stats.admin_requests}"),
        ("HTTP statuses", ", ".join(f"{k}: {v}" for k, v in sorted(stats.statuses.items()))),
        ("connection failures", str(stats.failures)),
        (
            "webhook latency p50 / p99 / max",
            f"{_percentile(latencies, 0.5):.1f} / {_percentile(latencies, 0.99):.1f} / "
            f"{max(latencies, default=float('nan')):.1f} ms",
        ),
        (
            "delivery / until all settled",
            f"{outcome.delivery_seconds:.1f} s / {outcome.total_seconds:.1f} s",
        ),
        ("calls with differences", str(sum(bool(p) for p in outcome.results.values()))),
    ]
    print_summary(facts, ("figure", "value"), "run")


def _call_rows(
    planned: list[PlannedCall], prices: Prices, results: Mapping[str, list[str]]
) -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = []
    for kind in ("bank", "deposit", "mixed", "agreement", "incident"):
        mine = [c for c in planned if c.account.kind == kind]
        seen = [c.observed for c in mine if c.observed]
        expected_minutes = sum(
            a["agent_minutes"] for c in mine for a in expect(c, prices)["agents"].values()
        )
        meterd_minutes = sum(a["agent_minutes"] for v in seen for a in v["agents"].values())
        rows.append(
            (
                f"{kind} ({mine[0].account.plan})" if mine else kind,
                str(len(mine)),
                f"{meterd_minutes}/{expected_minutes}",
                str(sum(v["charges"]["bank_minutes"] for v in seen)),
                f"{sum(v['charges']['deposit_minor'] for v in seen) / 100:,.2f}",
                str(sum(v["charges"]["incidents"] for v in seen)),
                str(sum(1 for c in mine if results.get(c.call_sid))),
            )
        )
    kinds = Counter(c.kind for c in planned)
    pin_callers = sum(c.pin_entry for c in planned)
    researched, waived = sum(bool(c.research) for c in planned), sum(bool(c.waive) for c in planned)
    blank = ("",) * 5
    rows.append(("connected (PIN callers)", f"{kinds['connected']} ({pin_callers})", *blank))
    rows.append(("hung up in the menu", str(kinds["menu_pin"] + kinds["menu_early"]), *blank))
    rows.append(("with research / waived", f"{researched} / {waived}", *blank))
    return rows


def print_differences(
    out: Callable[[str], None], planned: list[PlannedCall], outcome: Outcome, seed: int
) -> bool:
    """The calls that differed (the first 50) and the accounts' differences; False if none."""
    differing = {sid: p for sid, p in outcome.results.items() if p}
    if not differing and not outcome.account_problems:
        return False
    out(f"\nDIFFERENCES in {len(differing)} of {len(planned)} calls:")
    by_sid = {c.call_sid: c for c in planned}
    for shown, (sid, problems) in enumerate(sorted(differing.items())):
        out(f"- {sid} [{by_sid[sid].describe()}]")
        for problem in problems:
            out(f"    {problem}")
        if shown >= 49:
            out(f"  ... and {len(differing) - 50} more calls")
            break
    for problem in outcome.account_problems:
        out(f"- account {problem}")
    out(f"reproduce the scenario with --seed {seed}")
    return True
