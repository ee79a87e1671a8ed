"""Twilio's own call records against meterd's, for one business day. Pure, no I/O.

A webhook Twilio sent that meterd never recorded (a firewall, a deploy, a DNS change) is money
nobody sees; a call meterd has that Twilio does not, or one whose length differs, is a bill
nobody can prove. What is compared:

- Twilio's side: the calls that came in to the desk (`direction` inbound, no parent call: the
  legs Twilio dials to agents are children of the conference, not calls of their own) that
  started within the day; an inbound call that meterd knows only as a participant of a
  conference (an agent who dialled in, not a call meterd answered) is an agent, not a caller.
  A call placed through the REST API (`outbound-api`) is compared only if meterd has it (a
  callback meterd placed): the desk's own routing places agents' legs that way too.
- meterd's side: the calls it recorded (the voice webhook) that started within the day.
- Both: a call on one side only is reported; a call on both whose lengths (Twilio's `duration`;
  meterd's end minus start, a callback's start being its answer) differ by more than the
  tolerance is reported with both. A callback never answered has no length to compare.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

# Twilio's statuses of a call that was never answered: a callback that rang out.
NEVER_ANSWERED = frozenset({"busy", "no-answer", "failed", "canceled"})


@dataclass(frozen=True)
class TwilioCall:
    sid: str
    start_time: dt.datetime | None
    duration_seconds: int | None
    direction: str
    status: str
    parent_call_sid: str | None = None


@dataclass(frozen=True)
class MeterdCall:
    sid: str
    started_at: dt.datetime
    ended_at: dt.datetime | None
    status: str

    @property
    def duration_seconds(self) -> int | None:
        if self.ended_at is None:
            return None
        return int((self.ended_at - self.started_at).total_seconds())


@dataclass(frozen=True)
class DurationDiffers:
    sid: str
    twilio_seconds: int
    meterd_seconds: int


@dataclass
class Reconciliation:
    missing_in_meterd: list[TwilioCall] = field(default_factory=list)
    missing_at_twilio: list[MeterdCall] = field(default_factory=list)
    duration_differs: list[DurationDiffers] = field(default_factory=list)
    matched: int = 0

    @property
    def clean(self) -> bool:
        return not (self.missing_in_meterd or self.missing_at_twilio or self.duration_differs)


def _within(moment: dt.datetime | None, start: dt.datetime, end: dt.datetime) -> bool:
    return moment is not None and start <= moment < end


def reconcile(
    twilio_calls: Iterable[TwilioCall],
    meterd_calls: Iterable[MeterdCall],
    *,
    participant_sids: set[str],
    start: dt.datetime,
    end: dt.datetime,
    tolerance_seconds: int,
) -> Reconciliation:
    """Compare the day [start, end) (see the module's docstring). Both sides may hold calls from
    around the day (a margin): a call is the day's by meterd's start if meterd has it, else by
    Twilio's; it is one-sided only if the other side has it nowhere in its margin, so a call
    at midnight with the two clocks a few seconds apart is matched, on meterd's day. Each call
    is reported once, in sid order; a call Twilio lists twice (pages that moved under it)
    counts once."""
    ours_anywhere = {call.sid: call for call in meterd_calls}
    callers_anywhere: Mapping[str, TwilioCall] = {
        call.sid: call
        for call in twilio_calls
        if not call.parent_call_sid
        and (
            (
                call.direction == "inbound"
                and (call.sid in ours_anywhere or call.sid not in participant_sids)
            )  # a caller joins too
            or (call.direction == "outbound-api" and call.sid in ours_anywhere)  # a callback
        )
    }
    days = {sid for sid, call in ours_anywhere.items() if _within(call.started_at, start, end)}
    days |= {
        sid
        for sid, call in callers_anywhere.items()
        if sid not in ours_anywhere and _within(call.start_time, start, end)
    }
    result = Reconciliation()
    for sid in sorted(days):
        theirs, mine = callers_anywhere.get(sid), ours_anywhere.get(sid)
        if mine is None:
            assert theirs is not None
            result.missing_in_meterd.append(theirs)
        elif theirs is None:
            result.missing_at_twilio.append(mine)
        else:
            result.matched += 1
            twilio_seconds, meterd_seconds = theirs.duration_seconds, mine.duration_seconds
            if (
                theirs.status not in NEVER_ANSWERED  # a callback that rang out has no length
                and twilio_seconds is not None
                and meterd_seconds is not None
                and abs(twilio_seconds - meterd_seconds) > tolerance_seconds
            ):
                result.duration_differs.append(DurationDiffers(sid, twilio_seconds, meterd_seconds))
    return result
