"""What the desk's live page shows (`/desk/`): every open call with its state, agents, charges
and the funds its account has left, and the calls that ended in the last hour. The page and
`GET /admin/calls` read the same call summaries (`CallViewService.list`)."""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from dataclasses import dataclass
from typing import Any

from meterd.clock import Clock
from meterd.services.accounts import AccountService
from meterd.services.call_view import CallViewService
from meterd.services.errors import NotFound

BOARD_FRESH_SECONDS = 0.4
RECENT = dt.timedelta(hours=1)  # ended calls stay on the page this long
CALLS_SHOWN_MAX = 200


def call_state(call: dict[str, Any]) -> str:
    """How a call stands, in the desk's words: connecting (in the menu), paying (giving a
    card), talking (an agent's billable time is running), on hold (nobody's is), low funds
    (warned), grace (out of funds, the hang-up coming), ended, settled, rejected."""
    status = call["status"]
    if status == "menu":
        return "paying" if call.get("pay_attempts") else "connecting"
    if status == "rejected":
        return "rejected"
    if call.get("ended_at"):
        return "settled" if call.get("settled_at") else "ended"
    if call.get("exhausted_at"):
        return "grace"
    if call.get("warned_at"):
        return "low funds"
    talking = any(agent.get("accruing") for agent in call.get("agents", {}).values())
    return "talking" if talking else "on hold"


@dataclass(frozen=True)
class Board:
    open_calls: list[dict[str, Any]]  # each with "state"
    ended_calls: list[dict[str, Any]]  # ended in the last hour, each with "state"
    funds: dict[str, dict[str, Any]]  # by account id: bank_minutes, deposit_minor, currency, card
    at: dt.datetime


class DeskService:
    def __init__(self, call_view: CallViewService, accounts: AccountService, clock: Clock) -> None:
        self._call_view = call_view
        self._accounts = accounts
        self._clock = clock
        self._shared: tuple[float, Board] | None = None  # (monotonic read at, board)
        self._reading = asyncio.Lock()

    async def board(self, *, shared: bool = False) -> Board:
        """What the page shows. `shared` (the event streams): every open page shares one read
        at most every BOARD_FRESH_SECONDS, so ten desk leads watching cost the database what
        one does; a page loaded (or reloaded after a waiver) reads afresh."""
        if not shared:
            return await self._read_board()
        async with self._reading:
            if self._shared and time.monotonic() - self._shared[0] < BOARD_FRESH_SECONDS:
                return self._shared[1]
            board = await self._read_board()
            self._shared = (time.monotonic(), board)
            return board

    async def _read_board(self) -> Board:
        now = self._clock()
        open_calls = await self._calls(ended=False, since=None)
        ended_calls = await self._calls(ended=True, since=now - RECENT)
        funds: dict[str, dict[str, Any]] = {}
        for call in open_calls + ended_calls:
            account_id = call.get("account_id")
            if account_id and account_id not in funds:
                funds[account_id] = await self._funds(account_id)
        return Board(open_calls, ended_calls, funds, now)

    async def _calls(self, *, ended: bool, since: dt.datetime | None) -> list[dict[str, Any]]:
        page = await self._call_view.list(
            ended=ended, account_id=None, since=since, after_sid=None, limit=CALLS_SHOWN_MAX
        )
        return [call | {"state": call_state(call)} for call in page["calls"]]

    async def _funds(self, account_id: str) -> dict[str, Any]:
        try:
            view = await self._accounts.view(account_id)
        except NotFound:  # an account removed since: show the call without its funds
            return {}
        keys = ("name", "plan", "currency", "bank_minutes", "deposit_minor", "card_on_file")
        return {key: view[key] for key in keys}

    async def account(self, account_id: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """An account's view and its calls (open, then those ended in the last 30 days)."""
        view = await self._accounts.view(account_id)
        since = self._clock() - dt.timedelta(days=30)
        calls = []
        for ended in (False, True):
            page = await self._call_view.list(
                ended=ended,
                account_id=account_id,
                since=since if ended else None,
                after_sid=None,
                limit=CALLS_SHOWN_MAX,
            )
            calls += [call | {"state": call_state(call)} for call in page["calls"]]
        return view, calls
