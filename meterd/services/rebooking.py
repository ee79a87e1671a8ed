"""How settlement changes its mind about a minute: the posting reversed, the minute posted
again under a suffixed key (`ledger.minute(..., rebooked=|repriced=)`). Nothing is edited."""

from __future__ import annotations

import datetime as dt

from meterd.core import ledger
from meterd.services.errors import InvariantBroken
from meterd.store import ledger_store
from meterd.store.transaction import Record, Transaction


async def load_minute(connection: Transaction, key: str) -> ledger.Transaction:
    """A minute's transaction that a listing named (it must be there)."""
    original = await ledger_store.load_transaction(connection, key)
    if original is None:
        raise InvariantBroken(f"{key} is listed but not in the ledger")
    return original


async def rebook(
    connection: Transaction,
    call: Record,
    original: ledger.Transaction,
    *,
    source: str,
    currency: str,
    price: int,
    now: dt.datetime,
    repriced: bool = False,
) -> None:
    """Settlement's word on how a minute of `call` is paid: the posting reversed, the minute
    posted again from `source` under its rebooked (or `repriced`) key."""
    await ledger_store.post(connection, unbooked(original, source, repriced=repriced), now)
    again = booked_again(
        call, original, source=source, currency=currency, price=price, repriced=repriced
    )
    await ledger_store.post(connection, again, now)


def unbooked(
    original: ledger.Transaction, source: str, *, repriced: bool = False
) -> ledger.Transaction:
    """The reversal of a minute settlement books again (from `source`, or `repriced`)."""
    memo = (
        "settlement: priced at its final due moment"
        if repriced
        else f"settlement: paid from the {source} instead"
    )
    return ledger.reversal_of(original, memo=memo)


def booked_again(
    call: Record,
    original: ledger.Transaction,
    *,
    source: str,
    currency: str,
    price: int,
    repriced: bool = False,
) -> ledger.Transaction:
    """A minute of `call` posted again from `source` under its rebooked (or `repriced`) key."""
    agent_id, n = ledger.parse_minute_key(original.key)
    return ledger.minute(
        call.call_sid,
        agent_id,
        n,
        account_id=call.account_id,
        currency=currency,
        source=source,
        amount_minor=price,
        rebooked=not repriced,
        repriced=repriced,
    )
