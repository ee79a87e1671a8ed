"""Reading results back: each settled call and its ledger, compared with the expectation, and
the accounts' balances against their calls' charges."""

from __future__ import annotations

from collections.abc import Mapping

from meterd.simulate.client import Meterd, squash
from meterd.simulate.expectation import Prices, compare, expect
from meterd.simulate.playback import Options
from meterd.simulate.scenarios import PlannedCall, SimAccount


async def verify_call(
    meterd: Meterd, call: PlannedCall, prices: Prices, options: Options
) -> list[str] | None:
    """None while meterd has not settled the call; else its differences (empty: it matched)."""
    status, view = await meterd.admin("GET", f"/admin/calls/{call.call_sid}")
    if status != 200:
        return None if status == 0 else [f"GET /admin/calls: {status} {squash(view)}"]
    if not view.get("settled_at"):
        return None
    if call.waive == "after" and not call.waived_after:
        agent = next((leg.who for leg in call.legs if leg.who != "customer"), "alice")
        body = {"call_sid": call.call_sid, "agent_id": agent, "reason": options.waiver_reason}
        status, answer = await meterd.agents("/agents/waiver", body)
        call.waived_after = True
        if status != 200:
            return [f"waiver after settlement: {status} {squash(answer)}"]
        status, view = await meterd.admin("GET", f"/admin/calls/{call.call_sid}")
        if status != 200:
            return [f"GET /admin/calls after the waiver: {status} {squash(view)}"]
    call.observed = view
    expected = expect(call, prices)
    problems = compare(call, expected, view, prices.rate_minor)
    if not call.waive and call.kind == "connected":
        minutes = sum(a["agent_minutes"] for a in expected["agents"].values())
        used = await _ledger_minutes_used(meterd, call.call_sid)
        if used != minutes:
            problems.append(f"ledger: system:minutes:used moved {used}, expected {minutes}")
    return problems


async def _ledger_minutes_used(meterd: Meterd, call_sid: str) -> int | str:
    total, after = 0, 0
    while True:
        status, page = await meterd.admin(
            "GET", f"/admin/ledger?call_sid={call_sid}&limit=500&after_id={after}"
        )
        if status != 200:
            return f"GET /admin/ledger: {status}"
        for transaction in page["transactions"]:
            for posting in transaction["postings"]:
                if posting["book"] == "system:minutes:used":
                    total += posting["amount"]
        if page.get("next_after_id") is None:
            return total
        after = page["next_after_id"]


async def check_accounts(
    meterd: Meterd, accounts: Mapping[str, SimAccount], calls: list[PlannedCall], prices: Prices
) -> list[str]:
    """Each account moved by exactly what its calls were charged; per_minute money only in
    whole agent-minutes; the bank-then-deposit account's calls together paid their minutes."""
    problems = []
    for account in accounts.values():
        status, view = await meterd.admin("GET", f"/admin/accounts/{account.account_id}")
        if status != 200:
            problems.append(f"{account.account_id}: GET {status} {squash(view)}")
            continue
        charges = [c.observed["charges"] for c in calls if c.account is account and c.observed]
        bank_used = sum(c["bank_minutes"] for c in charges)
        money_used = sum(c["deposit_minor"] for c in charges)
        if account.initial_bank - view["bank_minutes"] != bank_used:
            problems.append(
                f"{account.account_id}: bank went {account.initial_bank} -> "
                f"{view['bank_minutes']}, its calls show {bank_used} minutes"
            )
        if account.initial_deposit - view["deposit_minor"] != money_used:
            problems.append(
                f"{account.account_id}: deposit went {account.initial_deposit} -> "
                f"{view['deposit_minor']}, its calls show {money_used}"
            )
        if account.kind == "mixed" and bank_used > account.initial_bank:
            problems.append(
                f"{account.account_id}: used {bank_used} banked minutes of {account.initial_bank}"
            )
    return problems
