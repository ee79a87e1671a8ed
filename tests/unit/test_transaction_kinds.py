"""Every ledger transaction the core builds has a kind named in `TransactionKind`."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from meterd.core import ledger
from meterd.core.ledger import MINUTES, TransactionKind
from meterd.core.rating import Source

CORE = Path(__file__).resolve().parents[2] / "meterd" / "core"
INCIDENT_PAYERS = ("deposit", "card", "receivable")


def _every_transaction_core_builds() -> list[ledger.Transaction]:
    built = [
        ledger.deposit("A1", "EUR", 5_000, "ref-1"),
        ledger.grant_minutes("A1", 30, "ref-2"),
        ledger.included_minutes("A1", 60),
        ledger.card_block(
            "op-1", account_id="A1", call_sid="CA1", minutes=30, currency="EUR", amount_minor=900
        ),
        ledger.card_refund(
            "op-2", account_id="A1", call_sid="CA1", minutes=10, currency="EUR", amount_minor=300
        ),
        ledger.transfer(
            "k",
            TransactionKind.MINUTES_GRANTED,
            unit=MINUTES,
            amount=1,
            from_book=ledger.MINUTES_ISSUED,
            to_book=ledger.bank_book("A1"),
        ),
    ]
    for rebooked in (False, True):
        for source in Source:
            built.append(
                ledger.minute(
                    "CA1",
                    "alice",
                    1,
                    account_id="A1",
                    currency="EUR",
                    source=source.value,
                    amount_minor=0 if source in (Source.BANK, Source.COVERED) else 100,
                    rebooked=rebooked,
                )
            )
    for k, payer in enumerate(INCIDENT_PAYERS, start=1):
        built.append(
            ledger.incident(
                "CA1",
                k,
                call_sid="CA1",
                account_id="A1",
                currency="EUR",
                payer=payer,
                amount_minor=2_500,
            )
        )
    return built + [ledger.reversal_of(t) for t in built]


@pytest.mark.parametrize(
    "transaction", _every_transaction_core_builds(), ids=lambda t: f"{t.kind}:{t.key}"
)
def test_every_transaction_core_builds_has_a_named_kind(transaction):
    assert type(transaction.kind) is TransactionKind


def test_every_named_kind_is_built_by_core():
    built = {t.kind for t in _every_transaction_core_builds()}
    assert built == set(TransactionKind)


def test_the_kinds_that_charge_are_named_kinds():
    for kinds in (
        ledger.CHARGE_KINDS,
        ledger.MONEY_MINUTE_KINDS,
        ledger.CARD_KINDS,
        ledger.INCIDENT_KINDS,
    ):
        assert all(type(kind) is TransactionKind for kind in kinds)


def test_a_kind_is_its_stored_string():
    # What the database holds and services compare with: the kinds' values never change.
    assert TransactionKind.MINUTE_BANK == "minute_bank"
    assert f"{TransactionKind.REVERSAL}" == "reversal"
    named = ledger.deposit("A1", "EUR", 1, "r")
    stored = ledger.Transaction(
        key=named.key, kind="deposit", account_id="A1", memo="r", postings=named.postings
    )
    assert named.fingerprint == stored.fingerprint


def _kind_literals(tree: ast.AST) -> list[int]:
    """Lines where a transaction's kind is a string: `Transaction(..., kind="...")`,
    `transfer(key, "...")` or `transfer(key, kind=f"...")`."""
    lines = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
        if name not in ("Transaction", "transfer"):
            continue
        given = [k.value for k in node.keywords if k.arg == "kind"]
        if len(node.args) >= 2:
            given.append(node.args[1])
        lines += [v.lineno for v in given if isinstance(v, ast.Constant | ast.JoinedStr)]
    return lines


def test_no_core_module_posts_a_kind_as_a_plain_string():
    found = {
        path.relative_to(CORE.parent.parent).as_posix(): lines
        for path in sorted(CORE.rglob("*.py"))
        if (lines := _kind_literals(ast.parse(path.read_text())))
    }
    assert found == {}, "name the kind in meterd.core.ledger.TransactionKind"
