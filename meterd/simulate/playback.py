"""Playing a call: every request of a planned call (Twilio's webhooks and callbacks, the agents'
research and waivers) with when and in which order, and sending them to meterd."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import random
import time
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass, field
from typing import Any

from meterd.simulate.client import Meterd, squash
from meterd.simulate.scenarios import PlannedCall, Research
from meterd.simulate.wire import call_status_params, conference_params, gather_params, voice_params


@dataclass
class Step:
    due: float  # wall seconds after the call was placed
    rank: float  # order among steps due at the same moment
    route: str  # /twilio/conference, /twilio/call-status, /agents/research, /agents/waiver
    payload: dict[str, Any]
    what: str
    twins: list[Step] = field(default_factory=list)  # duplicates sent at the same moment


@dataclass
class Options:
    duplicates: bool
    reorder: bool
    time_scale: float
    settle_delay: int
    waiver_reason: str


def conference_steps(call: PlannedCall, options: Options) -> tuple[list[Step], list[Step]]:
    """The conference and call-status callbacks of a connected call, in Twilio's order, split
    into those before the hang-up and those of the hang-up itself."""
    customer = call.legs[0]
    events: list[tuple[int, int, str, dict[str, Any]]] = [  # (offset, order, event, details)
        (0, 0, "conference-start", {}),
        (0, 1, "participant-join", {"call_sid": customer.sid, "label": "customer"}),
    ]
    for leg in call.legs:
        who = {"call_sid": leg.sid, "label": leg.label}
        if leg.who != "customer":
            events.append((leg.join, 2, "participant-join", who))
        for start, stop in leg.holds:
            events.append((start, 3, "participant-hold", who))
            if stop is not None:
                events.append((stop, 3, "participant-unhold", who))
        hung_up = leg.who == "customer" or leg.leave < call.end
        leave = who | {
            "hold": any(s < leg.leave and e is None for s, e in leg.holds),
            "ReasonParticipantLeft": "participant_hung_up"
            if hung_up
            else "conference_ended_via_api",
        }
        order = 4 if leg.who == "customer" else 5  # the customer's exit ends the conference
        events.append((leg.leave, order, "participant-leave", leave))
    end = {"ReasonConferenceEnded": "participant-with-end-conference-on-exit-left"}
    events.append(
        (call.end, 6, "conference-end", end | {"call_sid": customer.sid, "label": "customer"})
    )
    events.sort(key=lambda e: (e[0], e[1]))
    before: list[Step] = []
    ending: list[Step] = []
    scale = options.time_scale
    for sequence, (offset, _, event, details) in enumerate(events, start=1):
        at = call.base + offset
        params = conference_params(
            call.conference_sid, call.call_sid, event, sequence, at, **details
        )
        step = Step(offset * scale, sequence, "/twilio/conference", params, f"{event} #{sequence}")
        (ending if offset == call.end else before).append(step)
    ending.append(hang_up_step(call, options, rank=len(events) + 1))
    return before, ending


def hang_up_step(call: PlannedCall, options: Options, rank: float) -> Step:
    params = call_status_params(
        call.call_sid,
        "completed",
        0,
        call.base + call.end,
        from_number=call.from_number,
        duration_seconds=call.end,
    )
    return Step(call.end * options.time_scale, rank, "/twilio/call-status", params, "completed")


def plan_steps(call: PlannedCall, options: Options, rng: random.Random) -> list[Step]:
    """Every request of the call after the voice webhook, with when and in which order."""
    if call.kind != "connected":
        return [hang_up_step(call, options, 0)]
    before, ending = conference_steps(call, options)
    middle = _agent_steps(call, options, rng)
    end_due = call.end * options.time_scale
    # Phases: what shapes the timeline, then the agents' requests, then the hang-up itself.
    for phase, steps in enumerate((before, middle, ending)):
        if options.reorder:
            rng.shuffle(steps)
        for position, step in enumerate(steps):
            step.rank = phase * 1_000_000 + position
            if options.reorder and options.time_scale:
                limit = end_due if phase < 2 else end_due + min(2.0, options.settle_delay / 3)
                step.due = min(step.due + rng.uniform(0, 3.0 * options.time_scale + 0.5), limit)
            elif phase == 2:
                step.due = end_due
    steps = before + middle + ending
    if options.duplicates:
        steps += _duplicates(steps, end_due, options.time_scale, rng)
    steps.sort(key=lambda s: (s.due, s.rank))
    return steps


def _agent_steps(call: PlannedCall, options: Options, rng: random.Random) -> list[Step]:
    """The agents' tool's requests: research intervals, a waiver during the call, research
    started as the caller hangs up (before meterd hears of it)."""
    scale = options.time_scale
    steps = []
    for mark in call.research:  # the agent's tool sends the interval once it is over
        body = {
            "call_sid": call.call_sid,
            "agent_id": mark.agent,
            "start": iso(call.base + mark.start),
            "end": iso(call.base + mark.end),
        }
        what = f"research {mark.agent} {mark.start}-{mark.end}"
        steps.append(Step(mark.end * scale, 0, "/agents/research", body, what))
    if call.waive == "during":
        agent = next(leg.who for leg in call.legs if leg.who != "customer")
        at = rng.randint(1, call.end)
        body = {"call_sid": call.call_sid, "agent_id": agent, "reason": options.waiver_reason}
        steps.append(Step(at * scale, 0, "/agents/waiver", body, "waiver"))
    if call.research_after_hang_up:
        body = {
            "call_sid": call.call_sid,
            "agent_id": call.research_after_hang_up,
            "action": "start",
        }
        steps.append(Step(call.end * scale, 0, "/agents/research", body, "research start"))
    return steps


def _duplicates(steps: list[Step], end_due: float, scale: float, rng: random.Random) -> list[Step]:
    """A quarter of the steps delivered twice: half of them racing the original (its twins),
    the others as later retries, returned."""
    later = []
    for step in steps:
        if rng.random() >= 0.25:
            continue
        copy = dataclasses.replace(
            step, payload=dict(step.payload), what=step.what + " (dup)", twins=[]
        )
        if rng.random() < 0.5:  # a retry racing its original
            step.twins.append(copy)
            continue
        if step.route.startswith("/agents/"):  # the agents' tool retried, before the hang-up
            copy.rank = rng.uniform(step.rank + 0.1, 1_999_999)
            copy.due = min(step.due + rng.uniform(0, 1), end_due)
        else:  # Twilio retried: it may come after the hang-up, even after settlement
            copy.rank = step.rank + rng.uniform(0.1, 3_000_000)
            copy.due = step.due + rng.uniform(0, 2 * scale + 0.2)
        later.append(copy)
    return later


async def place_call(
    meterd: Meterd, call: PlannedCall, options: Options, rng: random.Random
) -> None:
    """Play one call against meterd; whatever meterd refuses goes into `call.problems`."""
    try:
        if not await _play(meterd, call, options, rng):
            call.aborted = True
    except Exception as error:  # a bug here must not hide the other calls' results
        call.problems.append(f"simulator error: {type(error).__name__}: {error}")
        call.aborted = True
    finally:
        call.finished = True


async def _play(meterd: Meterd, call: PlannedCall, options: Options, rng: random.Random) -> bool:
    started = time.monotonic()
    scale = options.time_scale
    shift = options.settle_delay + 2 if scale == 0 else 0
    call.base = int(time.time() - call.end * (1 - scale)) - shift
    steps = plan_steps(call, options, rng)  # after base: payloads carry timestamps
    if not await _answer(meterd, call, options.duplicates, rng):
        return False
    live: Research | None = None  # research started after the hang-up, by the server's clock
    for step in steps:
        wait = started + step.due - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        sent = [step, *step.twins]
        results = await asyncio.gather(*(_send(meterd, s) for s in sent))
        for one, (status, answer) in zip(sent, results, strict=True):
            if not 200 <= status < 300:
                call.problems.append(f"{one.route} {one.what}: {status} {squash(answer)}")
            elif one is step and step.payload.get("action") == "start":
                open_marks = [r for r in answer.get("research", []) if r["end"] is None]
                if open_marks:
                    start = _epoch(open_marks[-1]["start"])
                    live = Research(call.research_after_hang_up, start, start)
    if call.research_after_hang_up:
        return await _stop_research(meterd, call, live, rng)
    return True


async def _answer(meterd: Meterd, call: PlannedCall, duplicates: bool, rng: random.Random) -> bool:
    """The voice webhook, the PIN `<Gather>` of a withheld number; True when meterd put the
    call through to its conference (or, for a caller hanging up at the PIN prompt, asked)."""
    voice = voice_params(call.call_sid, call.from_number)
    twiml = await _voice_request(meterd, call, "/twilio/voice", voice, duplicates, rng)
    if twiml is None:
        return False
    if call.kind == "menu_pin" or call.pin_entry:
        if _element(twiml, "Gather") is None:
            call.problems.append(f"voice: expected the PIN prompt, got {squash(twiml)}")
            return False
        if call.pin_entry:
            attempts = ["12", call.account.pin] if call.wrong_pin_first else [call.account.pin]
            for digits in attempts:
                gather = _element(twiml, "Gather")
                if gather is None:
                    call.problems.append(f"PIN: expected another prompt, got {squash(twiml)}")
                    return False
                path = _local_path(meterd, gather.get("action", ""))
                params = gather_params(call.call_sid, digits, call.from_number)
                twiml = await _voice_request(meterd, call, path, params, duplicates, rng)
                if twiml is None:
                    return False
    if call.kind != "menu_pin":
        conference = _element(twiml, "Conference")
        if conference is None or (conference.text or "").strip() != call.call_sid:
            call.problems.append(f"voice: expected the conference, got {squash(twiml)}")
            return False
    return True


async def _stop_research(
    meterd: Meterd, call: PlannedCall, live: Research | None, rng: random.Random
) -> bool:
    """The agent stops the research it started as the caller hung up; the interval meterd
    recorded (by its own clock) joins the call's plan."""
    await asyncio.sleep(rng.uniform(0.5, 2.0))
    body = {"call_sid": call.call_sid, "agent_id": call.research_after_hang_up, "action": "stop"}
    status, answer = await meterd.agents("/agents/research", body)
    if status != 200 or live is None:
        call.problems.append(f"research stop: {status} {squash(answer)}")
        return False
    for recorded in answer["research"]:
        if _epoch(recorded["start"]) == live.start and recorded["end"]:
            live.end = _epoch(recorded["end"])
    call.research.append(Research(live.agent, live.start - call.base, live.end - call.base))
    return True


async def _send(meterd: Meterd, step: Step) -> tuple[int, Any]:
    if step.route.startswith("/twilio/"):
        if step.what.endswith("(dup)"):
            meterd.stats.duplicates += 1
        return await meterd.twilio(step.route, step.payload)
    return await meterd.agents(step.route, step.payload)


async def _voice_request(
    meterd: Meterd,
    call: PlannedCall,
    path: str,
    params: dict[str, str],
    duplicates: bool,
    rng: random.Random,
) -> str | None:
    """A TwiML webhook; with duplicates, sometimes sent twice at once (both must agree)."""
    twice = duplicates and rng.random() < 0.2
    if twice:
        meterd.stats.duplicates += 1
    answers = await asyncio.gather(*(meterd.twilio(path, params) for _ in range(1 + twice)))
    for status, text in answers:
        if status != 200:
            call.problems.append(f"{path}: {status} {squash(text)}")
            return None
    if twice and squash(answers[0][1]) != squash(answers[1][1]):
        call.problems.append(f"{path} delivered twice gave two answers: {answers!r}"[:300])
    return answers[0][1]


def _element(twiml: str, tag: str) -> ElementTree.Element | None:
    try:
        root = ElementTree.fromstring(twiml)  # noqa: S314 - TwiML of the meterd under test
    except ElementTree.ParseError:
        return None
    return next(root.iter(tag), None)


def _local_path(meterd: Meterd, url: str) -> str:
    """Twilio requests the URL in the TwiML; here it reaches meterd at `base_url`."""
    if url.startswith(meterd.public_base_url):
        return url[len(meterd.public_base_url) :]
    return url


def _epoch(text: str) -> int:
    return int(dt.datetime.fromisoformat(text).timestamp())


def iso(epoch_seconds: int) -> str:
    return dt.datetime.fromtimestamp(epoch_seconds, dt.UTC).isoformat()
