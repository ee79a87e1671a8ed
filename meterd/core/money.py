"""Money and whole-unit arithmetic. Money is always an integer count of minor units."""

from __future__ import annotations

from iso4217 import Currency

MONEY_MINOR_MAX = 10**13  # 100 billion in a two-decimal currency: no real amount is larger

# Minor-unit exponent of every ISO 4217 currency, from the maintained `iso4217` package (the
# ISO list itself). Codes without minor units in the list (gold, testing, "no currency") are not
# money meterd can bill in.
_CURRENCY_EXPONENTS: dict[str, int] = {
    currency.code: currency.exponent for currency in Currency if currency.exponent is not None
}


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
    """How many decimals the currency's minor unit has (ISO 4217): USD 2, JPY 0, KWD 3, CLF 4."""
    check_currency(currency)
    return _CURRENCY_EXPONENTS[currency]


def check_currency(currency: str) -> str:
    if currency not in _CURRENCY_EXPONENTS:
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
