"""`GET /admin/accounts/{id}/statement`: an account's statement over business days, read from
the published nightly usage (`meterd/core/usage/statement.py`), so that its per-day figures are
finance's own. A day not built yet is built first, as `meterd usage --date` would."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
from typing import Any

from meterd.core.usage.render import ACCOUNT_COLUMNS, Cell
from meterd.core.usage.statement import Statement, build_statement, with_direction, zero_row
from meterd.services.errors import InvalidRequest, NotFound
from meterd.services.usage import UsageFile, UsageService
from meterd.store import accounts_store
from meterd.store.database import Database

STATEMENT_DAYS_MAX = 92  # a quarter: longer periods are several statements


class StatementService:
    def __init__(self, database: Database, usage: UsageService) -> None:
        self._database = database
        self._usage = usage

    async def statement(self, account_id: str, first_day: dt.date, last_day: dt.date) -> Statement:
        """The account's statement from `first_day` to `last_day`, both included. Raises
        NotFound (no such account), InvalidRequest (a period backwards or too long), and the
        usage's own UsageNotReady / UsageRefused for a day that cannot be read."""
        async with self._database.read() as connection:
            currency = await accounts_store.account_currency(connection, account_id)
        if currency is None:
            raise NotFound(f"no account {account_id}")
        days = (last_day - first_day).days + 1
        if days < 1:
            raise InvalidRequest("from must be on or before to")
        if days > STATEMENT_DAYS_MAX:
            raise InvalidRequest(f"a statement covers at most {STATEMENT_DAYS_MAX} days")
        self._usage.require_closed(last_day)
        rows_by_day = []
        calls: list[dict[str, str]] = []
        for offset in range(days):
            day = first_day + dt.timedelta(days=offset)
            await self._usage.build(day)
            rows_by_day.append((day, self._account_row(day, account_id, currency)))
            calls += self._calls_of(day, account_id)
        return build_statement(account_id, currency, rows_by_day, calls)

    def _account_row(self, day: dt.date, account_id: str, currency: str) -> dict[str, Any]:
        """The account's row of the day's accounts file, money in minor units."""
        document = json.loads(self._usage.path(day, UsageFile.ACCOUNTS_JSON).read_text())
        for row in document["accounts"]:
            if row["account_id"] == account_id:
                return {
                    name: row[f"{name}_minor"] if kind is Cell.MONEY else row[name]
                    for name, kind in ACCOUNT_COLUMNS
                }
        return zero_row(account_id, currency)

    def _calls_of(self, day: dt.date, account_id: str) -> list[dict[str, str]]:
        """The account's rows of the day's calls file, as the file writes them; a file published
        before the calls had a `direction` column says none, and its calls were all inbound."""
        text = self._usage.path(day, UsageFile.CALLS_CSV).read_text(encoding="utf-8")
        return [
            with_direction(row)
            for row in csv.DictReader(io.StringIO(text))
            if row["account_id"] == account_id
        ]
