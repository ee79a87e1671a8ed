"""Crontab expressions as cron reads them, for APScheduler 3.

APScheduler 3's own `CronTrigger.from_crontab` numbers the days of the week from Monday (0 =
Monday ... 6 = Sunday), where cron numbers them from Sunday (0 or 7 = Sunday, 1 = Monday ...).
An operator who writes `30 0 * * 1-5` means Monday to Friday; APScheduler would run it Tuesday to
Saturday. So the weekday field is translated to day names (which both read the same way) before
APScheduler sees it: `1-5` becomes `mon,tue,wed,thu,fri`, `0` and `7` become `sun`.
"""

from __future__ import annotations

from datetime import tzinfo

from apscheduler.triggers.cron import CronTrigger

DAY_NAMES = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")  # cron's 0 to 6 (7 is sun again)


def trigger(crontab: str, timezone: tzinfo) -> CronTrigger:
    """A trigger for a five-field crontab (minute hour day month weekday), read as cron reads
    it. Raises ValueError if it is not one."""
    fields = crontab.split()
    if len(fields) != 5:
        raise ValueError(f"wrong number of fields; got {len(fields)}, expected 5")
    minute, hour, day, month, weekday = fields
    return CronTrigger(
        minute=minute,
        hour=hour,
        day=day,
        month=month,
        day_of_week=cron_weekdays(weekday),
        timezone=timezone,
    )


def cron_weekdays(field: str) -> str:
    """Cron's weekday field in day names: numbers (and numeric ranges, with steps) are cron's
    (0 or 7 = Sunday); names, `*` and `?` pass as they are."""
    if field in ("*", "?"):
        return field
    return ",".join(_part(part) for part in field.split(","))


def _part(part: str) -> str:
    span, _, step_text = part.partition("/")
    if span != "*" and not any(ch.isdigit() for ch in span):
        return part  # names (mon-fri) mean the same days in both
    step = int(step_text) if step_text else 1
    if step < 1:
        raise ValueError(f"weekday step must be at least 1, got {step_text!r}")
    if span == "*":
        first, last = 0, 6
    else:
        low, _, high = span.partition("-")
        first, last = _day(low), _day(high) if high else _day(low)
        if step_text and not high:  # "1/2": from Monday to the end of the week
            last = 7
    if first > last:
        raise ValueError(f"weekday range {span!r} runs backwards")
    days = sorted({DAY_NAMES[n % 7] for n in range(first, last + 1, step)}, key=DAY_NAMES.index)
    return ",".join(days)


def _day(text: str) -> int:
    if text.isdigit() and 0 <= int(text) <= 7:
        return int(text)
    if text.lower() in DAY_NAMES:
        return DAY_NAMES.index(text.lower())
    raise ValueError(f"{text!r} is not a weekday (0-7 or sun-sat)")
