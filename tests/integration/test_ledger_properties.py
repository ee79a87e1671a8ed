"""Hypothesis: random sequences of postings, reversals and repeated keys against a model of the
ledger, on SQLite and on PostgreSQL. After every sequence the database agrees with the model and
`check_ledger` finds nothing."""

from __future__ import annotations

import asyncio
import uuid

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select

from meterd.core import ledger
from meterd.services.ledger_check import check_ledger
from meterd.store import ledger_store
from meterd.store.database import open_database
from meterd.store.schema import ledger_transactions

from .helpers import NOW, account_service, use_deposit, use_minutes

ACCOUNTS = 2
KEYS = 6  # few keys, so repeats (same and different content) are common

operation = st.one_of(
    st.tuples(
        st.just("deposit"),
        st.integers(0, ACCOUNTS - 1),
        st.integers(1, 5000),
        st.integers(0, KEYS - 1),
    ),
    st.tuples(
        st.just("grant"), st.integers(0, ACCOUNTS - 1), st.integers(1, 60), st.integers(0, KEYS - 1)
    ),
    st.tuples(
        st.just("use_minutes"),
        st.integers(0, ACCOUNTS - 1),
        st.integers(1, 60),
        st.integers(0, KEYS - 1),
    ),
    st.tuples(
        st.just("use_deposit"),
        st.integers(0, ACCOUNTS - 1),
        st.integers(1, 5000),
        st.integers(0, KEYS - 1),
    ),
    st.tuples(st.just("reverse"), st.integers(0, 50), st.just(0), st.just(0)),
)


class LedgerModel:
    """What the ledger must hold: balances per book and the content of every claimed key."""

    def __init__(self) -> None:
        self.balances: dict[str, int] = {}
        self.posted: dict[str, ledger.Transaction] = {}

    def expect(self, transaction: ledger.Transaction) -> str:
        earlier = self.posted.get(transaction.key)
        if earlier is not None:
            return "replayed" if earlier.fingerprint == transaction.fingerprint else "conflict"
        after = dict(self.balances)
        for posting in transaction.postings:
            after[posting.book] = after.get(posting.book, 0) + posting.amount
        if any(after[p.book] < 0 for p in transaction.postings if p.book.startswith("customer:")):
            return "insufficient"
        self.balances = after
        self.posted[transaction.key] = transaction
        return "posted"


def _transaction(op: tuple, prefix: str, model: LedgerModel) -> ledger.Transaction | None:
    kind, account_index, amount, key_index = op
    account_id = f"{prefix}-{account_index}"
    key = f"{prefix}:k{key_index}"
    if kind == "deposit":
        return ledger.deposit(account_id, "USD", amount, f"ref{key_index}")
    if kind == "grant":
        return ledger.grant_minutes(account_id, amount, f"ref{key_index}")
    if kind == "use_minutes":
        return use_minutes(account_id, amount, key)
    if kind == "use_deposit":
        return use_deposit(account_id, amount, key)
    originals = [t for t in model.posted.values() if t.reverses_key is None]
    if not originals:
        return None
    original = originals[account_index % len(originals)]
    return ledger.reversal_of(original, f"reversal:{original.key}")


async def _run(database, ops: list[tuple]) -> None:
    prefix = uuid.uuid4().hex[:10]
    model = LedgerModel()
    accounts = account_service(database)
    for index in range(ACCOUNTS):
        await accounts.create(
            {
                "account_id": f"{prefix}-{index}",
                "name": "n",
                "plan": "per_minute",
                "products": [{"product": "web", "kind": "subscription"}],
            }
        )
        model.expect(ledger.included_minutes(f"{prefix}-{index}", 45))
    for op in ops:
        transaction = _transaction(op, prefix, model)
        if transaction is None:
            continue
        expected = model.expect(transaction)
        try:
            async with database.write() as connection:
                result = await ledger_store.post(connection, transaction, NOW)
            outcome = "replayed" if result.replayed else "posted"
        except ledger_store.IdempotencyConflict:
            outcome = "conflict"
        except ledger_store.InsufficientBalance:
            outcome = "insufficient"
        assert outcome == expected, (op, transaction.key)

    async with database.read() as connection:
        for book, expected_balance in model.balances.items():
            if book.startswith("customer:"):
                assert await ledger_store.balance(connection, book) == expected_balance, book
                assert await ledger_store.posted_sum(connection, book) == expected_balance, book
        claimed = await connection.scalar(
            select(func.count())
            .select_from(ledger_transactions)
            .where(ledger_transactions.c.account_id.like(f"{prefix}-%"))
        )
    assert claimed == len(model.posted)
    report = await check_ledger(database)
    assert report.ok, report.breaches


def test_ledger_invariants_hold_for_any_sequence_of_postings(database_url):
    with asyncio.Runner() as runner:
        database = runner.run(open_database(database_url))
        try:

            @settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
            @given(ops=st.lists(operation, min_size=1, max_size=25))
            def check(ops: list[tuple]) -> None:
                runner.run(_run(database, ops))

            check()
        finally:
            runner.run(database.close())
