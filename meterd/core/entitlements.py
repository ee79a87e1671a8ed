"""Email and ticket support eligibility (docs/billing.md, the eligibility table)."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from meterd.core.plans import Plan, Product, ProductKind


@dataclass(frozen=True)
class Eligibility:
    eligible: bool
    covers: tuple[str, ...]  # which products email/ticket support covers, e.g. ("web",)
    reason: str


def _current(until: dt.date | None, today: dt.date) -> bool:
    return until is None or today <= until


def email_ticket_eligibility(
    products: tuple[Product, ...], plan: Plan, valid_until: dt.date | None, today: dt.date
) -> Eligibility:
    """Apply the table row by row; every product that qualifies adds itself to `covers`.

    A service agreement in force covers everything. Otherwise: a Desktop licence is covered while
    its UMP is current; a Desktop or Web subscription while it is active (Web covers Web only);
    add-on subscriptions never qualify.
    """
    if plan is Plan.SERVICE_AGREEMENT and _current(valid_until, today):
        return Eligibility(True, ("all",), "service agreement active")
    covers: list[str] = []
    reasons: list[str] = []
    for product in products:
        name = product.product
        if product.kind is ProductKind.LICENSE and name == "desktop":
            if product.ump_until is not None and today <= product.ump_until:
                covers.append(name)
                reasons.append(
                    f"desktop licence with maintenance plan (UMP) current until "
                    f"{product.ump_until.isoformat()}"
                )
            else:
                reasons.append("desktop licence without a current maintenance plan (UMP)")
        elif product.kind is ProductKind.SUBSCRIPTION and product.is_main:
            if _current(product.active_until, today):
                covers.append(name)
                reasons.append(f"{name} subscription active")
            else:
                reasons.append(f"{name} subscription ended")
        else:
            reasons.append(f"{name} {product.kind.value} does not include email/ticket support")
    if not reasons:
        reasons.append("no products")
    unique_covers = tuple(dict.fromkeys(covers))
    return Eligibility(bool(unique_covers), unique_covers, "; ".join(reasons))
