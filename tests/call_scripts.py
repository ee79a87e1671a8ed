"""Scripts of realistic calls: the conference callbacks Twilio would send, in Twilio's order.

    script = CallScript(1, base_time)
    script.join("customer", 0).join("agent:alice", 30).leave("agent:alice", 330)
    script.end(340)

Offsets are seconds from `base`. Participants are named by label ("customer", "agent:<id>", or
"" for an unlabelled one, which then needs `name`); each gets its own CallSid.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

from tests.twilio_payloads import call_status_params, conference_params, sid, voice_params

CUSTOMER_NUMBER = "+14155550142"


@dataclass
class CallScript:
    n: int
    base: dt.datetime
    from_number: str = CUSTOMER_NUMBER
    events: list[dict[str, str]] = field(default_factory=list)
    status_events: list[dict[str, str]] = field(default_factory=list)
    _legs: dict[str, str] = field(default_factory=dict)
    given_call_sid: str = ""  # a callback's: the sid Twilio gave the call meterd placed

    @property
    def call_sid(self) -> str:
        return self.given_call_sid or sid("CA", self.n)

    @property
    def conference_sid(self) -> str:
        return sid("CF", self.n)

    def voice(self) -> dict[str, str]:
        return voice_params(self.call_sid, self.from_number)

    def leg(self, who: str) -> str:
        if who == "customer":
            return self.call_sid
        if who not in self._legs:
            self._legs[who] = sid("CA", self.n * 1000 + len(self._legs) + 1)
        return self._legs[who]

    def at(self, offset_seconds: int) -> dt.datetime:
        return self.base + dt.timedelta(seconds=offset_seconds)

    def _event(self, event: str, offset: int, who: str = "", **extra: object) -> CallScript:
        label = "" if who.startswith("unlabelled") else who
        self.events.append(
            conference_params(
                self.conference_sid,
                self.call_sid,
                event,
                len(self.events),
                self.at(offset),
                call_sid=self.leg(who) if who else "",
                label=label,
                **extra,
            )
        )
        return self

    def join(self, who: str, offset: int) -> CallScript:
        if not self.events:
            self._event("conference-start", offset)
        return self._event("participant-join", offset, who)

    def hold(self, who: str, offset: int) -> CallScript:
        return self._event("participant-hold", offset, who, hold=True)

    def unhold(self, who: str, offset: int) -> CallScript:
        return self._event("participant-unhold", offset, who, hold=False)

    def leave(self, who: str, offset: int) -> CallScript:
        return self._event("participant-leave", offset, who)

    def end(self, offset: int) -> CallScript:
        """The customer hangs up: their leg leaves, the conference ends (the customer has
        endConferenceOnExit), and their call's status callback says completed."""
        self.leave("customer", offset)
        self._event(
            "conference-end",
            offset,
            "",
        )
        self.status_events.append(
            call_status_params(
                self.call_sid,
                "completed",
                len(self.status_events),
                self.at(offset),
                from_number=self.from_number,
                duration_seconds=offset,
            )
        )
        return self
