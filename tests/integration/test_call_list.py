"""`GET /admin/calls`: the open and ended calls a desk lead lists, paged, on both backends."""

from __future__ import annotations

import pytest
from sqlalchemy import text

from .test_metering import START, account, deliver, finish, run_until, start_call
from .twilio_app import ManualClock, admin, build_app


async def make_outbound(database, call_sid: str) -> None:
    """The call as a callback the desk placed (issue 17): until the callback feature places
    one, the direction is set in the database, as the feature will record it."""
    async with database.write() as connection:
        done = await connection.execute(
            text("UPDATE calls SET direction = 'outbound' WHERE call_sid = :sid"), {"sid": call_sid}
        )
        assert done.rowcount == 1


@pytest.fixture
def clock():
    return ManualClock(START)


@pytest.fixture
async def client(aiohttp_client, database, tmp_path, clock):
    return await aiohttp_client(
        build_app(database, tmp_path, clock, METERD_SETTLE_DELAY_SECONDS="60")
    )


async def _calls(client, query: str) -> dict:
    response = await admin(client, "GET", f"/admin/calls{query}")
    assert response.status == 200, await response.text()
    return await response.json()


async def test_open_calls_then_ended_with_their_live_charges(client, clock):
    await account(client)
    first, second, third = [await start_call(client, n) for n in (1, 2, 3)]
    for script in (first, second, third):
        script.join("customer", 0).join("agent:alice", 0)
        await deliver(client, script.events)
    await run_until(client, clock, 70)
    listed = await _calls(client, "?state=open")
    assert [c["call_sid"] for c in listed["calls"]] == [s.call_sid for s in (first, second, third)]
    assert listed["next_after"] is None
    # 70 s of talk each: minutes 1 and 2 taken live, shown while the call is up
    assert {c["charges"]["bank_minutes"] for c in listed["calls"]} == {2}
    assert listed["calls"][0]["agents"]["alice"]["active_seconds"] == 70
    assert "timeline" not in listed["calls"][0]

    second.end(75)
    await deliver(client, second.events[-2:])
    await deliver(client, second.status_events)
    await finish(client, clock, second, 75)
    open_now = await _calls(client, "?state=open")
    assert [c["call_sid"] for c in open_now["calls"]] == [first.call_sid, third.call_sid]
    ended = await _calls(client, "?state=ended&account_id=acme")
    assert [c["call_sid"] for c in ended["calls"]] == [second.call_sid]
    assert ended["calls"][0]["settled_at"] is not None
    assert (await _calls(client, "?state=ended&account_id=other"))["calls"] == []


async def test_the_view_and_the_list_say_each_call_s_direction(client, clock, database):
    await account(client)
    inbound, outbound = [await start_call(client, n) for n in (1, 2)]
    await make_outbound(database, outbound.call_sid)
    for script in (inbound, outbound):
        view = await (await admin(client, "GET", f"/admin/calls/{script.call_sid}")).json()
        assert view["direction"] == ("outbound" if script is outbound else "inbound"), view
    listed = (await _calls(client, "?state=open"))["calls"]
    assert [(c["call_sid"], c["direction"]) for c in listed] == [
        (inbound.call_sid, "inbound"),
        (outbound.call_sid, "outbound"),
    ]
    # and still once it ended: the list of ended calls says it too
    outbound.join("customer", 0).end(30)
    await deliver(client, outbound.events + outbound.status_events)
    await finish(client, clock, outbound, 30)
    (ended,) = (await _calls(client, "?state=ended"))["calls"]
    assert (ended["call_sid"], ended["direction"]) == (outbound.call_sid, "outbound")


async def test_pages_follow_each_other_without_gaps_or_repeats(client, clock):
    await account(client)
    scripts = [await start_call(client, n) for n in range(1, 6)]
    seen: list[str] = []
    after = ""
    while True:
        page = await _calls(client, f"?state=open&limit=2{after}")
        seen += [c["call_sid"] for c in page["calls"]]
        if page["next_after"] is None:
            break
        after = f"&after={page['next_after']}"
    assert seen == [s.call_sid for s in scripts]


async def test_since_keeps_the_calls_started_from_then(client, clock):
    await account(client)
    await start_call(client, 1)
    later = (await _calls(client, "?since=2030-01-01T00:00:00Z"))["calls"]
    assert later == []
    assert len((await _calls(client, "?since=2020-01-01T00:00:00Z"))["calls"]) == 1


@pytest.mark.parametrize(
    "query, says",
    [
        ("?state=closed", "state must be one of open, ended"),
        ("?limit=zero", "limit must be a whole number"),
        ("?limit=0", "limit must be at least 1"),
        ("?since=yesterday", "since is not an ISO 8601 time"),
        ("?after=CAnosuchcall", "after names no call"),
    ],
)
async def test_a_bad_query_is_a_clear_400(client, query, says):
    response = await admin(client, "GET", f"/admin/calls{query}")
    assert response.status == 400
    assert says in (await response.json())["detail"]


async def test_the_list_needs_the_admin_token(client):
    response = await client.get("/admin/calls")
    assert response.status == 401
