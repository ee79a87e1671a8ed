from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meterd.core.money import (
    MoneyError,
    ceil_div,
    check_currency,
    currency_exponent,
    format_minor,
)


@given(st.integers(0, 10**12), st.integers(1, 10**6))
def test_ceil_div_is_the_smallest_whole_cover(numerator, denominator):
    result = ceil_div(numerator, denominator)
    assert (
        result * denominator >= numerator > (result - 1) * denominator or numerator == result == 0
    )


@pytest.mark.parametrize(
    ("amount", "currency", "text"),
    [
        (12345, "USD", "123.45"),
        (-5, "USD", "-0.05"),
        (0, "EUR", "0.00"),
        (1500, "JPY", "1500"),
        (1, "KWD", "0.001"),
        # from the ISO 4217 list, not a hand table (which gave these two decimals)
        (1500, "XOF", "1500"),
        (1500, "UGX", "1500"),
        (1500, "IQD", "1.500"),
        (12345, "CLF", "1.2345"),
    ],
)
def test_format_minor_is_exact_decimal_text(amount, currency, text):
    assert format_minor(amount, currency) == text


def test_bad_input_is_refused():
    with pytest.raises(MoneyError):
        ceil_div(5, 0)
    with pytest.raises(MoneyError):
        ceil_div(-1, 60)
    with pytest.raises(MoneyError):
        format_minor(1, "usd")
    for not_a_currency in ("ABC", "XAU", "XXX", "XTS"):  # unknown, or no minor unit in ISO 4217
        with pytest.raises(MoneyError):
            check_currency(not_a_currency)


@pytest.mark.parametrize(("currency", "exponent"), [("JPY", 0), ("KWD", 3), ("XOF", 0), ("CLF", 4)])
def test_every_exponent_comes_from_iso_4217(currency, exponent):
    assert currency_exponent(currency) == exponent
