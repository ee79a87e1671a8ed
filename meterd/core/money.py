"""Money and whole-unit arithmetic. Money is always an integer count of minor units."""

from __future__ import annotations

import re

MONEY_MINOR_MAX = 10**13  # 100 billion in a two-decimal currency: no real amount is larger

# Minor-unit exponent per ISO 4217 code; anything not listed has two decimals.
_CURRENCY_EXPONENTS = {
    "JPY": 0,
    "KRW": 0,
    "ISK": 0,
    "CLP": 0,
    "VND": 0,
    "BHD": 3,
    "KWD": 3,
    "JOD": 3,
    "OMR": 3,
    "TND": 3,
}
_CURRENCY_CODE = re.compile(r"^[A-Z]{3}$")


class MoneyError(ValueError):
    """An amount or currency that cannot be money."""


def ceil_div(numerator: int, denominator: int) -> int:
    """Integer division rounding up, for non-negative numerators: ceil(numerator / denominator)."""
    if denominator <= 0:
        raise MoneyError(f"cannot divide by {denominator}")
    if numerator < 0:
        raise MoneyError(f"ceil_div of a negative amount {numerator}")
    return -(-numerator // denominator)


def currency_exponent(currency: str) -> int:
    check_currency(currency)
    return _CURRENCY_EXPONENTS.get(currency, 2)


def check_currency(currency: str) -> str:
    if not _CURRENCY_CODE.fullmatch(currency):
        raise MoneyError(f"{currency!r} is not an ISO 4217 currency code such as USD")
    return currency


def format_minor(amount_minor: int, currency: str) -> str:
    """Decimal text of an amount, e.g. (12345, "USD") -> "123.45"; exact, never via float."""
    exponent = currency_exponent(currency)
    sign = "-" if amount_minor < 0 else ""
    whole, fraction = divmod(abs(amount_minor), 10**exponent)
    if exponent == 0:
        return f"{sign}{whole}"
    return f"{sign}{whole}.{fraction:0{exponent}d}"
