"""Crontab expressions are read as cron reads them (meterd/crontab.py): weekday 0 and 7 are
Sunday, 1 is Monday. APScheduler 3's own parser counts from Monday, so `30 0 * * 1-5` would run
Tuesday to Saturday; these tests fail if the translation breaks."""

from __future__ import annotations

import datetime as dt

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meterd import crontab
from meterd.config import ConfigError, load_settings

SUNDAY = dt.datetime(2026, 11, 29, tzinfo=dt.UTC)  # a Sunday


def _days_fired(expression: str, days: int = 14) -> list[str]:
    """The names of the days the expression fires on over `days` days from SUNDAY."""
    trigger = crontab.trigger(expression, dt.UTC)
    fired, previous, now = [], None, SUNDAY
    while True:
        when = trigger.get_next_fire_time(previous, now)
        if when is None or when >= SUNDAY + dt.timedelta(days=days):
            return fired
        fired.append(when.strftime("%a").lower())
        previous, now = when, when + dt.timedelta(seconds=1)


def test_one_to_five_is_monday_to_friday():
    assert _days_fired("30 0 * * 1-5", 7) == ["mon", "tue", "wed", "thu", "fri"]


@pytest.mark.parametrize("sunday", ["0", "7", "sun", "SUN"])
def test_zero_and_seven_are_sunday(sunday):
    assert _days_fired(f"0 3 * * {sunday}", 14) == ["sun", "sun"]


def test_names_ranges_and_steps_mean_what_they_mean_in_cron():
    assert _days_fired("0 0 * * mon-fri", 7) == _days_fired("0 0 * * 1-5", 7)
    assert _days_fired("0 0 * * */2", 7) == ["sun", "tue", "thu", "sat"]
    assert _days_fired("0 0 * * 1/2", 7) == ["sun", "mon", "wed", "fri"]  # 1, 3, 5, 7
    assert _days_fired("0 0 * * 5-7", 7) == ["sun", "fri", "sat"]
    assert _days_fired("0 0 * * *", 7) == ["sun", "mon", "tue", "wed", "thu", "fri", "sat"]


@given(st.sets(st.integers(0, 7), min_size=1))
def test_any_list_of_cron_weekdays_fires_on_exactly_those_days(days):
    expected = {crontab.DAY_NAMES[n % 7] for n in days}
    fired = _days_fired("15 1 * * " + ",".join(map(str, sorted(days))), 7)
    assert sorted(fired) == sorted(expected)


@pytest.mark.parametrize("weekday", ["8", "5-1", "x", "1/0"])
def test_a_weekday_cron_cannot_read_is_refused(weekday):
    with pytest.raises(ValueError):
        crontab.trigger(f"0 0 * * {weekday}", dt.UTC)


def test_the_setting_is_refused_with_a_clear_message(tmp_path):
    path = tmp_path / "meterd.toml"
    path.write_text('[schedule]\nusage_cron = "0 0 * * 9"\n')
    with pytest.raises(ConfigError, match=r"usage_cron.*not a crontab expression.*Sunday"):
        load_settings(path, {"METERD_STATE_DIR": str(tmp_path)})
