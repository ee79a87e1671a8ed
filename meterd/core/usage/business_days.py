"""Business days: `[local midnight, next local midnight)` in `business_timezone`, as UTC instants.

So a day lasts 23 or 25 hours on the days daylight saving starts or ends. A midnight that a clock
change skips starts the day at the first instant after the gap; a midnight that happens twice
starts it at the first. `day_bounds(d)[1] == day_bounds(d + 1)[0]` always, so no instant belongs
to two days or to none.

A day is *closed* `close_margin_seconds` after its end (the service's margin lets a write
transaction in flight at midnight commit); only closed days are reported.
"""

from __future__ import annotations

import datetime as dt
import re
from zoneinfo import ZoneInfo

__all__ = [
    "InvalidBusinessDay",
    "business_day_of",
    "day_bounds",
    "last_closed_day",
    "parse_business_day",
]


class InvalidBusinessDay(ValueError):
    """Text that is not a date written YYYY-MM-DD, or a date that does not exist."""


_DAY_TEXT = re.compile(r"^[0-9]{4}-[0-9]{2}-[0-9]{2}$")


def parse_business_day(text: str) -> dt.date:
    if not _DAY_TEXT.fullmatch(text):
        raise InvalidBusinessDay(f"expected a date written YYYY-MM-DD, got {text[:40]!r}")
    try:
        return dt.date.fromisoformat(text)
    except ValueError as error:
        raise InvalidBusinessDay(f"{text} is not a date: {error}") from None


def _local_midnight(day: dt.date, zone: ZoneInfo) -> dt.datetime:
    # fold=0: a repeated midnight is its first occurrence; a skipped one resolves (by PEP 495's
    # rule, the offset before the gap) to the instant the gap ends.
    return dt.datetime.combine(day, dt.time(0), tzinfo=zone).astimezone(dt.UTC)


def day_bounds(day: dt.date, timezone: str) -> tuple[dt.datetime, dt.datetime]:
    """The business day `day` in `timezone` as `[start, end)` in UTC."""
    zone = ZoneInfo(timezone)
    return _local_midnight(day, zone), _local_midnight(day + dt.timedelta(days=1), zone)


def business_day_of(instant: dt.datetime, timezone: str) -> dt.date:
    """The business day an instant belongs to."""
    if instant.tzinfo is None:
        raise ValueError("a naive datetime has no business day")
    return instant.astimezone(ZoneInfo(timezone)).date()


def last_closed_day(now: dt.datetime, timezone: str, close_margin_seconds: int) -> dt.date:
    """The newest day whose end is at least `close_margin_seconds` before `now`: the day before
    the business day of `now - margin` (that day started at or before `now - margin`)."""
    settled = now - dt.timedelta(seconds=close_margin_seconds)
    return business_day_of(settled, timezone) - dt.timedelta(days=1)
