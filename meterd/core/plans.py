"""Plans, products and the rules that choose which plan governs a call."""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass
from enum import StrEnum


class Plan(StrEnum):
    SERVICE_AGREEMENT = "service_agreement"
    PER_INCIDENT = "per_incident"
    PER_MINUTE = "per_minute"


class ProductKind(StrEnum):
    LICENSE = "license"
    SUBSCRIPTION = "subscription"


MAIN_PRODUCTS = frozenset({"desktop", "web"})
PRODUCT_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,39}$")


@dataclass(frozen=True)
class Product:
    """A product an account holds. `active_until` ends a subscription; `ump_until` ends the
    maintenance plan (UMP) of a licence. None means open-ended."""

    product: str
    kind: ProductKind
    active_until: dt.date | None = None
    ump_until: dt.date | None = None

    @property
    def is_main(self) -> bool:
        return self.product in MAIN_PRODUCTS


def brings_included_minutes(products: tuple[Product, ...]) -> bool:
    """A first purchase or subscription of a main product (Desktop or Web) brings the included
    minutes; add-ons and maintenance plans never do. Once per account is the ledger's job."""
    return any(p.is_main for p in products)


def effective_plan(
    plan: Plan, valid_until: dt.date | None, fallback_plan: Plan, today: dt.date
) -> Plan:
    """The plan that governs a call today: a service agreement past `valid_until` falls back."""
    if plan is Plan.SERVICE_AGREEMENT and valid_until is not None and today > valid_until:
        return fallback_plan
    return plan
