"""Email and ticket eligibility, row by row of docs/billing.md's table."""

from __future__ import annotations

import datetime as dt

import pytest

from meterd.core.entitlements import email_ticket_eligibility
from meterd.core.plans import Plan, Product, ProductKind, brings_included_minutes, effective_plan

TODAY = dt.date(2026, 11, 22)
LATER = dt.date(2027, 1, 1)
EARLIER = dt.date(2026, 1, 1)
L, S = ProductKind.LICENSE, ProductKind.SUBSCRIPTION


@pytest.mark.parametrize(
    ("products", "plan", "valid_until", "eligible", "covers"),
    [
        ((Product("desktop", L, ump_until=LATER),), Plan.PER_MINUTE, None, True, ("desktop",)),
        ((Product("desktop", L, ump_until=EARLIER),), Plan.PER_MINUTE, None, False, ()),
        ((Product("desktop", L),), Plan.PER_MINUTE, None, False, ()),
        ((Product("desktop", S, active_until=LATER),), Plan.PER_MINUTE, None, True, ("desktop",)),
        ((Product("desktop", S, active_until=EARLIER),), Plan.PER_MINUTE, None, False, ()),
        ((Product("web", S),), Plan.PER_INCIDENT, None, True, ("web",)),
        (
            (Product("web", S), Product("desktop", L, ump_until=EARLIER)),
            Plan.PER_MINUTE,
            None,
            True,
            ("web",),
        ),
        ((Product("quotevalet", S),), Plan.PER_MINUTE, None, False, ()),
        ((), Plan.SERVICE_AGREEMENT, LATER, True, ("all",)),
        ((), Plan.SERVICE_AGREEMENT, EARLIER, False, ()),
    ],
)
def test_eligibility_follows_the_table(products, plan, valid_until, eligible, covers):
    result = email_ticket_eligibility(products, plan, valid_until, TODAY)
    assert (result.eligible, result.covers) == (eligible, covers)
    assert result.reason


def test_only_main_products_bring_included_minutes():
    assert brings_included_minutes((Product("desktop", L),))
    assert brings_included_minutes((Product("web", S),))
    assert not brings_included_minutes((Product("vendorrfq", S),))
    assert not brings_included_minutes(())


def test_an_agreement_past_valid_until_falls_back():
    assert (
        effective_plan(Plan.SERVICE_AGREEMENT, EARLIER, Plan.PER_INCIDENT, TODAY)
        is Plan.PER_INCIDENT
    )
    assert (
        effective_plan(Plan.SERVICE_AGREEMENT, TODAY, Plan.PER_INCIDENT, TODAY)
        is Plan.SERVICE_AGREEMENT
    )
    assert effective_plan(Plan.PER_MINUTE, EARLIER, Plan.PER_INCIDENT, TODAY) is Plan.PER_MINUTE
