"""Half-open intervals of integer seconds, and the set algebra a call's time is built with.

Every function takes intervals in any order, overlapping or not, and returns them sorted,
disjoint and non-empty.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["Interval", "difference", "intersection", "total_seconds", "union"]


@dataclass(frozen=True, order=True)
class Interval:
    """Half-open `[start_seconds, end_seconds)`; never negative."""

    start_seconds: int
    end_seconds: int

    def __post_init__(self) -> None:
        if self.end_seconds < self.start_seconds:
            raise ValueError(f"interval ends before it starts: {self}")

    @property
    def seconds(self) -> int:
        return self.end_seconds - self.start_seconds


def union(intervals: Iterable[Interval]) -> tuple[Interval, ...]:
    """Sorted, disjoint, non-empty intervals covering the same time; touching ones are merged."""
    merged: list[Interval] = []
    for interval in sorted(i for i in intervals if i.seconds > 0):
        if merged and interval.start_seconds <= merged[-1].end_seconds:
            last = merged[-1]
            if interval.end_seconds > last.end_seconds:
                merged[-1] = Interval(last.start_seconds, interval.end_seconds)
        else:
            merged.append(interval)
    return tuple(merged)


def intersection(left: Iterable[Interval], right: Iterable[Interval]) -> tuple[Interval, ...]:
    """Time covered by both."""
    a, b = union(left), union(right)
    out: list[Interval] = []
    i = j = 0
    while i < len(a) and j < len(b):
        start = max(a[i].start_seconds, b[j].start_seconds)
        end = min(a[i].end_seconds, b[j].end_seconds)
        if start < end:
            out.append(Interval(start, end))
        if a[i].end_seconds <= b[j].end_seconds:
            i += 1
        else:
            j += 1
    return tuple(out)


def difference(minuend: Iterable[Interval], subtrahend: Iterable[Interval]) -> tuple[Interval, ...]:
    """Time covered by `minuend` and not by `subtrahend`."""
    cuts = union(subtrahend)
    out: list[Interval] = []
    for interval in union(minuend):
        start = interval.start_seconds
        for cut in cuts:
            if cut.end_seconds <= start:
                continue
            if cut.start_seconds >= interval.end_seconds:
                break
            if cut.start_seconds > start:
                out.append(Interval(start, cut.start_seconds))
            start = cut.end_seconds
            if start >= interval.end_seconds:
                break
        if start < interval.end_seconds:
            out.append(Interval(start, interval.end_seconds))
    return union(out)


def total_seconds(intervals: Iterable[Interval]) -> int:
    return sum(i.seconds for i in intervals)
