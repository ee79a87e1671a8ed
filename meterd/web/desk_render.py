"""The desk's pages as HTML: server-rendered, no build step, readable without JavaScript (the
page refreshes itself); with JavaScript, the calls region is replaced live from the server-sent
events of `/desk/events`. Every value shown is escaped; every form carries the CSRF token."""

from __future__ import annotations

from collections.abc import Sequence
from html import escape
from typing import Any

from meterd.core.money import format_minor
from meterd.services.desk import CALLS_SHOWN_MAX, Board
from meterd.web.desk_session import Session

PREFIX = "/desk"
REFRESH_SECONDS = 10  # without JavaScript, the page reloads itself this often

_STYLE = """
body{font-family:system-ui,sans-serif;color:#111;background:#fff;margin:1rem 2rem;line-height:1.4}
h1{font-size:1.5rem}h2{font-size:1.2rem;margin-top:1.5rem}
table{border-collapse:collapse;width:100%;margin:.5rem 0}
th,td{border:1px solid #6b6b6b;padding:.3rem .5rem;text-align:left;vertical-align:top}
th{background:#e8e8e8}
.state{font-weight:bold}.state-grace,.state-low-funds{color:#8a0000}
a{color:#0645ad}
a:focus,button:focus,input:focus,select:focus{outline:3px solid #1a5fb4;outline-offset:2px}
button{padding:.2rem .6rem}label{margin-right:.3rem}
.error{color:#8a0000;font-weight:bold}
.callback{border:1px solid #1a5fb4;color:#1a5fb4;border-radius:3px;padding:0 .25rem;font-size:.8em}
nav form{display:inline}
"""


def _page(title: str, body: str, *, head: str = "") -> str:
    return (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>{escape(title)}</title><style>{_STYLE}</style>{head}</head>"
        f"<body>{body}</body></html>"
    )


def sign_in_page(csrf: str, error: str = "") -> str:
    problem = f"<p class='error' role='alert'>{escape(error)}</p>" if error else ""
    return _page(
        "meterd desk: sign in",
        "<main><h1>meterd desk</h1>"
        f"{problem}"
        f"<form method='post' action='{PREFIX}/sign-in'>"
        f"<input type='hidden' name='csrf' value='{escape(csrf)}'>"
        "<p><label for='token'>Desk token (admin or agents)</label>"
        "<input id='token' name='token' type='password' autocomplete='current-password' "
        "required></p><p><button type='submit'>Sign in</button></p></form></main>",
    )


def _duration(seconds: int) -> str:
    minutes, rest = divmod(int(seconds), 60)
    return f"{minutes}:{rest:02d}"


def _money(amount_minor: int, currency: str | None) -> str:
    return format_minor(amount_minor, currency) if currency else str(amount_minor)


def _waive_form(call: dict[str, Any], csrf: str, reasons: Sequence[str]) -> str:
    if call["charges"].get("waived"):
        return "waived"
    sid = escape(call["call_sid"])
    options = "".join(f"<option>{escape(r)}</option>" for r in reasons)
    return (
        f"<form method='post' action='{PREFIX}/calls/{sid}/waive'>"
        f"<input type='hidden' name='csrf' value='{escape(csrf)}'>"
        f"<label for='reason-{sid}'>Reason</label>"
        f"<select id='reason-{sid}' name='reason'>{options}</select> "
        f"<label for='agent-{sid}'>By</label>"
        f"<input id='agent-{sid}' name='agent_id' value='desk' size='8' required> "
        f"<button type='submit'>Waive {sid[-6:]}</button></form>"
    )


def _agents(call: dict[str, Any]) -> str:
    items = []
    for agent_id, time in call.get("agents", {}).items():
        doing = "talking" if time.get("accruing") else "on hold or away"
        items.append(
            f"<li data-agent='{escape(agent_id)}'><b>{escape(agent_id)}</b> "
            f"<span class='agent-state'>{doing}</span>: "
            f"active {_duration(time['active_seconds'])}, "
            f"research {_duration(time['research_seconds'])}, "
            f"{time['agent_minutes']} min</li>"
        )
    return f"<ul>{''.join(items)}</ul>" if items else "none yet"


def _callback_tag(call: dict[str, Any]) -> str:
    """An outbound call is one the desk placed to call a customer back: tagged so, beside the
    number, for a lead reading the board (who called whom changes nothing else it shows)."""
    if call.get("direction") != "outbound":
        return ""
    return " <span class='callback' title='outbound: the desk called back'>callback</span>"


def _row(
    call: dict[str, Any], funds: dict[str, Any], session: Session, csrf: str, reasons: Sequence[str]
) -> str:
    charges = call["charges"]
    currency = funds.get("currency")
    money = charges["deposit_minor"] + charges["card_minor"] + charges["owed_minor"]
    account_id = call.get("account_id") or ""
    account = escape(account_id) or "unknown"
    if account_id and session.admin:
        account = f"<a href='{PREFIX}/accounts/{escape(account_id)}'>{account}</a>"
    left = (
        f"{funds.get('bank_minutes', 0)} min, {_money(funds.get('deposit_minor', 0), currency)}"
        + (", card on file" if funds.get("card_on_file") else "")
        if funds
        else ""
    )
    state = escape(call["state"])
    return (
        f"<tr id='call-{escape(call['call_sid'])}' data-state='{state}'>"
        f"<td>{escape(call.get('from') or '')}{_callback_tag(call)}"
        f"<br><small>{escape(call['call_sid'])}</small></td>"
        f"<td>{account}<br>{escape(call.get('plan') or '')}</td>"
        f"<td class='state state-{state.replace(' ', '-')}'>{state}</td>"
        f"<td>{_agents(call)}</td>"
        f"<td>hold {_duration(call.get('hold_seconds', 0))}</td>"
        f"<td class='charged'>{charges['bank_minutes']} banked min, "
        f"{_money(money, currency)}"
        + (f", {charges['incidents']} incident(s)" if charges.get("incidents") else "")
        + f"</td><td class='funds-left'>{left}</td>"
        f"<td>{_waive_form(call, csrf, reasons)}</td></tr>"
    )


_HEAD = (
    "<tr><th scope='col'>Caller</th><th scope='col'>Account, plan</th>"
    "<th scope='col'>State</th><th scope='col'>Agents</th><th scope='col'>Hold</th>"
    "<th scope='col'>Charged so far</th><th scope='col'>Funds left</th>"
    "<th scope='col'>Waive</th></tr>"
)


def calls_region(board: Board, session: Session, csrf: str, reasons: Sequence[str]) -> str:
    """The live part of the page: open calls, then those ended in the last hour."""

    def table(caption: str, calls: list[dict[str, Any]], name: str) -> str:
        rows = "".join(
            _row(c, board.funds.get(c.get("account_id") or "", {}), session, csrf, reasons)
            for c in calls
        )
        empty = "<tr><td colspan='8'>none</td></tr>"
        if len(calls) >= CALLS_SHOWN_MAX:
            caption += f": the oldest {CALLS_SHOWN_MAX} (all of them: GET /admin/calls)"
        return (
            f"<table id='{name}'><caption><h2>{escape(caption)}</h2></caption>"
            f"<thead>{_HEAD}</thead><tbody>{rows or empty}</tbody></table>"
        )

    return (
        f"<p>As of {escape(board.at.isoformat(timespec='seconds'))}.</p>"
        + table(f"Open calls ({len(board.open_calls)})", board.open_calls, "open-calls")
        + table("Ended in the last hour", board.ended_calls, "ended-calls")
    )


_LIVE_SCRIPT = (
    "<script>(function(){if(!window.EventSource)return;"
    "var region=document.getElementById('calls');"
    f"var source=new EventSource('{PREFIX}/events');"
    "source.addEventListener('calls',function(e){region.innerHTML=e.data;});"
    "document.getElementById('refresh-note').hidden=true;})();</script>"
)


def _nav(session: Session, csrf: str) -> str:
    return (
        f"<nav><a href='{PREFIX}/'>Live calls</a> · signed in as {escape(session.role)} · "
        f"<form method='post' action='{PREFIX}/sign-out'>"
        f"<input type='hidden' name='csrf' value='{escape(csrf)}'>"
        "<button type='submit'>Sign out</button></form></nav>"
    )


def desk_page(
    board: Board, session: Session, csrf: str, reasons: Sequence[str], notice: str = ""
) -> str:
    said = f"<p role='status'>{escape(notice)}</p>" if notice else ""
    return _page(
        "meterd desk: live calls",
        f"{_nav(session, csrf)}<main><h1>Live calls</h1>{said}"
        f"<p id='refresh-note'>This page reloads every {REFRESH_SECONDS} s.</p>"
        f"<div id='calls' aria-live='polite'>{calls_region(board, session, csrf, reasons)}</div>"
        f"</main>{_LIVE_SCRIPT}",
        head=f"<noscript><meta http-equiv='refresh' content='{REFRESH_SECONDS}'></noscript>",
    )


def account_page(
    view: dict[str, Any],
    calls: list[dict[str, Any]],
    session: Session,
    csrf: str,
    reasons: Sequence[str],
) -> str:
    currency = view["currency"]
    funds = {k: view[k] for k in ("currency", "bank_minutes", "deposit_minor", "card_on_file")}
    rows = "".join(_row(c, funds, session, csrf, reasons) for c in calls)
    account_id = escape(view["account_id"])
    return _page(
        f"meterd desk: {view['account_id']}",
        f"{_nav(session, csrf)}<main><h1>{escape(view['name'])} ({account_id})</h1>"
        "<table id='balances'><caption><h2>Balances</h2></caption><tbody>"
        f"<tr><th scope='row'>Plan</th><td>{escape(view['plan'])}</td></tr>"
        f"<tr><th scope='row'>Banked minutes</th><td>{view['bank_minutes']}</td></tr>"
        f"<tr><th scope='row'>Deposit</th><td>{_money(view['deposit_minor'], currency)}</td></tr>"
        f"<tr><th scope='row'>Card on file</th><td>{'yes' if view['card_on_file'] else 'no'}"
        "</td></tr></tbody></table>"
        f"<p><a href='{PREFIX}/accounts/{account_id}/statement'>Statement, this month "
        "(printable)</a></p>"
        "<table id='account-calls'><caption><h2>Calls, last 30 days</h2></caption>"
        f"<thead>{_HEAD}</thead><tbody>{rows or '<tr><td colspan=8>none</td></tr>'}</tbody>"
        "</table></main>",
    )
