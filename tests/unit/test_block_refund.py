"""A block's unused minutes are refunded pro rata, rounded up: never against the customer."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meterd.core.rating import block_refund_minor


def test_a_block_that_does_not_divide_evenly_is_refunded_rounded_up():
    # 10.00 for 30 minutes is 33.33... a minute: 29 unused minutes give back 9.67, not 9.66
    assert block_refund_minor(1000, 30, 29) == 967
    assert block_refund_minor(1000, 30, 1) == 34
    assert block_refund_minor(3000, 30, 30) == 3000
    assert block_refund_minor(3000, 30, 0) == 0


@given(
    price=st.integers(0, 10**9),
    block=st.integers(1, 1000),
    data=st.data(),
)
def test_the_refund_is_the_exact_share_rounded_up_and_never_more_than_paid(price, block, data):
    returned = data.draw(st.integers(0, block))
    refund = block_refund_minor(price, block, returned)
    exact_times_block = price * returned
    assert refund * block >= exact_times_block  # never less than the exact share
    assert (refund - 1) * block < exact_times_block  # by less than one minor unit
    assert 0 <= refund <= price
    # what the customer keeps paying is never more than the exact price of what they used
    assert (price - refund) * block <= price * (block - returned)


def test_returning_more_minutes_than_the_block_had_is_a_programming_error():
    with pytest.raises(ValueError):
        block_refund_minor(3000, 30, 31)
