"""What docs/billing.md says meterd must show for a planned call, worked out second by second
independently of meterd's code, and the comparison with what meterd shows."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from meterd.simulate.scenarios import Leg, PlannedCall, Research

INCIDENT_SECONDS = 2 * 60 * 60


@dataclass(frozen=True)
class Prices:
    rate_minor: int  # one agent-minute from the deposit
    incident_minor: int
    increment_seconds: int


def expect(call: PlannedCall, prices: Prices) -> dict[str, Any]:
    """What docs/billing.md says meterd must show for the call, counted second by second."""
    zero = {
        "bank_minutes": 0,
        "deposit_minor": 0,
        "card_minor": 0,
        "owed_minor": 0,
        "incidents": 0,
        "waived": bool(call.waive),
    }
    if call.kind != "connected":
        return {
            "status": "rejected" if call.kind == "menu_pin" else "ended",
            "hold_seconds": 0,
            "agents": {},
            "charges": zero,
        }
    seconds, hold, union_billable = _count_seconds(call)
    increment = prices.increment_seconds
    view_agents = {
        agent: {
            "active_seconds": s["active"],
            "research_seconds": s["research"],
            "billable_seconds": s["billable"],
            "agent_minutes": -(-s["billable"] // increment),
        }
        for agent, s in seconds.items()
    }
    minutes = sum(a["agent_minutes"] for a in view_agents.values())
    charges = dict(zero)
    if not call.waive:
        kind = call.account.kind
        if kind == "bank":
            charges["bank_minutes"] = minutes
        elif kind == "deposit":
            charges["deposit_minor"] = minutes * prices.rate_minor
        elif kind == "mixed":  # bank first, then deposit: only the sum is the call's own
            del charges["bank_minutes"], charges["deposit_minor"]
            charges["minutes_paid"] = minutes
        elif kind == "incident":
            incidents = -(-union_billable // INCIDENT_SECONDS)
            charges["incidents"] = incidents
            charges["deposit_minor"] = incidents * prices.incident_minor
    return {"status": "ended", "hold_seconds": hold, "agents": view_agents, "charges": charges}


def _count_seconds(call: PlannedCall) -> tuple[dict[str, dict[str, int]], int, int]:
    """Each agent's active, research and billable seconds; the call's hold seconds; the seconds
    in which at least one agent was billable."""
    customer = [leg for leg in call.legs if leg.who == "customer"]
    agent_legs: dict[str, list[Leg]] = {}
    for leg in call.legs:
        if leg.who != "customer":
            agent_legs.setdefault(leg.who, []).append(leg)
    research: dict[str, list[Research]] = {}
    for mark in call.research:
        research.setdefault(mark.agent, []).append(mark)
    agents = sorted(agent_legs.keys() | research.keys())
    seconds = {a: {"active": 0, "research": 0, "billable": 0} for a in agents}
    hold = union_billable = 0
    horizon = max([call.end, *(m.end for m in call.research)])
    for t in range(horizon):  # second [t, t + 1) of the call; research starts at >= 0
        present = any(leg.join <= t < min(leg.leave, call.end) for leg in customer)
        customer_free = present and any(leg.available(t) for leg in customer) and t < call.end
        someone_active = someone_billable = False
        for agent in agents:
            active = customer_free and any(leg.available(t) for leg in agent_legs.get(agent, ()))
            researching = any(m.start <= t < m.end for m in research.get(agent, ()))
            seconds[agent]["active"] += active
            seconds[agent]["research"] += researching
            seconds[agent]["billable"] += active or researching
            someone_active |= active
            someone_billable |= active or researching
        hold += present and not someone_active
        union_billable += someone_billable
    return seconds, hold, union_billable


def compare(
    call: PlannedCall, expected: dict[str, Any], view: dict[str, Any], rate: int
) -> list[str]:
    """What differs between the expectation and meterd's view of the call."""
    out: list[str] = []

    def differ(what: str, want: Any, got: Any) -> None:
        if want != got:
            out.append(f"{what}: expected {want!r}, meterd {got!r}")

    differ("status", expected["status"], view.get("status"))
    differ("hold_seconds", expected["hold_seconds"], view.get("hold_seconds"))
    got_agents = view.get("agents") or {}
    differ("agents", sorted(expected["agents"]), sorted(got_agents))
    for agent, want in expected["agents"].items():
        for name, value in want.items():
            differ(f"agents.{agent}.{name}", value, got_agents.get(agent, {}).get(name))
    charges = view.get("charges") or {}
    for name, value in expected["charges"].items():
        if name == "minutes_paid":
            bank, money = charges.get("bank_minutes", 0), charges.get("deposit_minor", 0)
            if money % rate or bank + money // rate != value:
                out.append(
                    f"charges: expected {value} minutes from bank and deposit, meterd "
                    f"bank_minutes={bank} deposit_minor={money} (rate {rate})"
                )
        else:
            differ(f"charges.{name}", value, charges.get(name))
    if not view.get("settled_at"):
        out.append("not settled")
    return out
