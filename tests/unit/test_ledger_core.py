"""The pure ledger vocabulary: transactions balance by construction."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meterd.core import ledger
from meterd.core.ledger import MINUTES, LedgerError, Posting, Transaction, UnbalancedTransaction

books = st.sampled_from(
    ["customer:a:bank", "customer:b:bank", ledger.MINUTES_ISSUED, ledger.MINUTES_USED]
)
amounts = st.integers(-10_000, 10_000).filter(bool)


@given(st.lists(st.tuples(books, amounts), min_size=1, max_size=8))
def test_a_transaction_exists_only_if_it_balances(legs):
    postings = tuple(Posting(book, MINUTES, amount) for book, amount in legs)
    if sum(amount for _, amount in legs) == 0:
        transaction = Transaction("k", "test", postings)
        assert sum(p.amount for p in transaction.postings) == 0
    else:
        with pytest.raises(UnbalancedTransaction):
            Transaction("k", "test", postings)


@given(st.lists(st.tuples(books, amounts), min_size=1, max_size=8), st.randoms())
def test_the_fingerprint_ignores_posting_order_but_not_content(legs, random):
    total = sum(amount for _, amount in legs)
    postings = [Posting(book, MINUTES, amount) for book, amount in legs]
    if total:
        postings.append(Posting("system:minutes:balance", MINUTES, -total))
    shuffled = list(postings)
    random.shuffle(shuffled)
    a = Transaction("k", "test", tuple(postings))
    b = Transaction("k", "test", tuple(shuffled))
    assert a.fingerprint == b.fingerprint
    assert Transaction("k", "other", tuple(postings)).fingerprint != a.fingerprint


@given(st.integers(1, 10**9), st.sampled_from(["USD", "EUR"]))
def test_a_reversal_undoes_the_original_exactly(amount, currency):
    original = ledger.deposit("A1", currency, amount, "ref")
    reversal = ledger.reversal_of(original, "reversal:ref")
    net: dict[str, int] = {}
    for posting in original.postings + reversal.postings:
        net[posting.book] = net.get(posting.book, 0) + posting.amount
    assert set(net.values()) == {0}
    assert reversal.reverses_key == original.key


def test_a_book_in_two_units_is_refused():
    with pytest.raises(UnbalancedTransaction):
        Transaction(
            "k",
            "t",
            (
                Posting("x", "USD", 5),
                Posting("x", MINUTES, -5),
                Posting("y", "USD", -5),
                Posting("y", MINUTES, 5),
            ),
        )


@pytest.mark.parametrize("amount", [0, True, 10**14])
def test_impossible_posting_amounts_are_refused(amount):
    with pytest.raises(LedgerError):
        Posting("x", "USD", amount)


def test_keys_are_derived_from_their_cause_and_bounded():
    assert ledger.deposit("A1", "USD", 5, "wire-7").key == "account:A1:deposit:wire-7"
    assert ledger.included_minutes("A1", 45).key == "account:A1:included-minutes"
    with pytest.raises(LedgerError):
        ledger.deposit("A1", "USD", 5, "x" * 300)
    with pytest.raises(LedgerError):
        ledger.transfer("k", "t", unit="USD", amount=-1, from_book="a", to_book="b")
