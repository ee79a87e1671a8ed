"""Twilio's side of the wire: webhook payloads as Twilio sends them, and its request signature.

The one implementation the simulator, the tests (tests/twilio_payloads.py re-exports it) and the
benchmarks (bench/) build their Twilio requests with.

Field names and value formats follow Twilio's docs (see docs/twilio-setup.md): SIDs are a
two-letter prefix and 32 lower-case hex digits, timestamps are RFC 2822 in UTC (`Mon, 21 Dec 2020
15:19:52 +0000`), booleans are the strings "true"/"false", sequence numbers and durations are
decimal text. Every builder returns a fresh `dict[str, str]`; `**extra` adds fields or overrides
defaults (values must already be strings, as on the wire).

`sign` implements Twilio's documented algorithm itself, without the twilio library, so what
signs the requests is not the code meterd checks them with (the twilio library's validator).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from email.utils import format_datetime
from urllib.parse import urlencode

from meterd.core.call_legs import TERMINAL_CALL_STATUSES

__all__ = [
    "ACCOUNT_SID",
    "API_VERSION",
    "FORM_CONTENT_TYPE",
    "SUPPORT_NUMBER",
    "call_status_params",
    "conference_params",
    "encode_form",
    "gather_params",
    "rfc2822",
    "sid",
    "sign",
    "signed_form",
    "voice_params",
]

API_VERSION = "2010-04-01"
SUPPORT_NUMBER = "+18005550100"
FORM_CONTENT_TYPE = "application/x-www-form-urlencoded"

Params = Mapping[str, str] | Iterable[tuple[str, str]]


def sid(prefix: str, n: int) -> str:
    """A deterministic Twilio SID: `sid("CA", 1)` is "CA" followed by 31 zeros and a 1."""
    if len(prefix) != 2 or not prefix.isalpha() or not prefix.isupper():
        raise ValueError(f"a SID prefix is two upper-case letters, not {prefix!r}")
    if not 0 <= n < 16**32:
        raise ValueError(f"n must fit in 32 hex digits, not {n}")
    return f"{prefix}{n:032x}"


ACCOUNT_SID = sid("AC", 0xACC)


def rfc2822(at: datetime | float) -> str:
    """`at` (an aware datetime, or epoch seconds) as Twilio writes a `Timestamp`: RFC 2822 in
    UTC with a `+0000` offset."""
    if not isinstance(at, datetime):
        at = datetime.fromtimestamp(at, UTC)
    elif at.tzinfo is None or at.utcoffset() is None:
        raise ValueError("give an aware datetime; Twilio timestamps are UTC")
    return format_datetime(at.astimezone(UTC), usegmt=False)


# Geo fields Twilio fills from the number (empty strings when it does not know).
_GEO_BY_PREFIX: tuple[tuple[str, tuple[str, str, str, str]], ...] = (
    ("+1415", ("SAN FRANCISCO", "CA", "94107", "US")),
    ("+1212", ("NEW YORK", "NY", "10001", "US")),
    ("+1", ("", "", "", "US")),
    ("+44", ("", "", "", "GB")),
)


def _geo(number: str) -> tuple[str, str, str, str]:
    for prefix, geo in _GEO_BY_PREFIX:
        if number.startswith(prefix):
            return geo
    return ("", "", "", "")


def _with_extra(params: dict[str, str], extra: Mapping[str, str]) -> dict[str, str]:
    for name, value in extra.items():
        if not isinstance(value, str):
            raise TypeError(f"{name}={value!r}: webhook values are strings, as on the wire")
        params[name] = value
    return params


def _call_fields(
    call_sid: str, from_number: str, to_number: str, call_status: str
) -> dict[str, str]:
    """The base set Twilio sends on the voice webhook and every call status callback."""
    params = {
        "AccountSid": ACCOUNT_SID,
        "ApiVersion": API_VERSION,
        "CallSid": call_sid,
        "CallStatus": call_status,
        "Direction": "inbound",
        "From": from_number,
        "Caller": from_number,
        "To": to_number,
        "Called": to_number,
    }
    for who, number in (
        ("From", from_number),
        ("Caller", from_number),
        ("To", to_number),
        ("Called", to_number),
    ):
        city, state, zip_code, country = _geo(number)
        params |= {
            f"{who}City": city,
            f"{who}State": state,
            f"{who}Zip": zip_code,
            f"{who}Country": country,
        }
    return params


def voice_params(
    call_sid: str, from_number: str, to_number: str = SUPPORT_NUMBER, **extra: str
) -> dict[str, str]:
    """The form Twilio posts to the number's Voice URL (`POST /twilio/voice`) for a new call."""
    return _with_extra(_call_fields(call_sid, from_number, to_number, "ringing"), extra)


def gather_params(
    call_sid: str, digits: str, from_number: str = "+14155550199", **extra: str
) -> dict[str, str]:
    """The form Twilio posts to a `<Gather action>` (`POST /twilio/pin`) after the caller keyed
    `digits` and pressed `#` (pass `FinishedOnKey=""` for a gather that ended on timeout)."""
    params = _call_fields(call_sid, from_number, SUPPORT_NUMBER, "in-progress")
    params |= {"Digits": digits, "FinishedOnKey": "#"}
    return _with_extra(params, extra)


def _true_false(value: bool) -> str:
    return "true" if value else "false"


def conference_params(
    conference_sid: str,
    friendly_name: str,
    event: str,
    sequence_number: int,
    at: datetime | float,
    *,
    call_sid: str = "",
    label: str = "",
    hold: bool | None = None,
    muted: bool = False,
    **extra: str,
) -> dict[str, str]:
    """A conference status callback for `event` (e.g. "participant-join", "conference-end").

    Participant events carry the participant's CallSid, Muted, Hold (default: "true" on
    participant-hold, else "false"), Coaching, EndConferenceOnExit ("true" for the participant
    labelled "customer", as docs/twilio-setup.md's TwiML joins the caller), StartConferenceOnEnter
    and, when `label` is given, ParticipantLabel; participant-leave adds ParticipantCallStatus and
    ReasonParticipantLeft. conference-end carries CallSidEndingConference (`call_sid`),
    ParticipantLabelEndingConference (`label`), ReasonConferenceEnded and Reason.
    Announcement events carry AnnounceUrl (and ReasonAnnouncementFailed on a failure).
    No CallbackSource: Twilio lists none for conference callbacks.
    """
    params = {
        "AccountSid": ACCOUNT_SID,
        "ConferenceSid": conference_sid,
        "FriendlyName": friendly_name,
        "StatusCallbackEvent": event,
        "SequenceNumber": str(sequence_number),
        "Timestamp": rfc2822(at),
    }
    if event.startswith("participant-"):
        if not call_sid:
            raise ValueError(f"a {event} event names its participant: give call_sid")
        params |= {
            "CallSid": call_sid,
            "Muted": _true_false(muted),
            "Hold": _true_false(event == "participant-hold" if hold is None else hold),
            "Coaching": "false",
            "EndConferenceOnExit": _true_false(label == "customer"),
            "StartConferenceOnEnter": "true",
        }
        if label:
            params["ParticipantLabel"] = label
        if event == "participant-leave":
            params |= {
                "ParticipantCallStatus": "completed",
                "ReasonParticipantLeft": "participant_hung_up",
            }
    elif event == "conference-end":
        params |= {
            "CallSidEndingConference": call_sid,
            "ParticipantLabelEndingConference": label,
            "ReasonConferenceEnded": "last-participant-left",
            "Reason": f"Participant {call_sid} with label {label} left the conference",
        }
    elif event.startswith("announcement-"):
        params["AnnounceUrl"] = "https://calls.example.com/twilio/announcement"
        if call_sid:
            params["CallSid"] = call_sid
        if event == "announcement-fail":
            params["ReasonAnnouncementFailed"] = "Announcement fetch failed"
    return _with_extra(params, extra)


def call_status_params(
    call_sid: str,
    status: str,
    sequence_number: int,
    at: datetime | float,
    *,
    from_number: str = "+14155550199",
    duration_seconds: int | None = None,
    **extra: str,
) -> dict[str, str]:
    """A call status callback (`CallbackSource=call-progress-events`) with `CallStatus=status`.

    Terminal statuses carry `CallDuration` in seconds (`duration_seconds`, default 0), and
    `completed` also carries `Duration` in billed minutes (seconds rounded up to the minute).
    """
    params = _call_fields(call_sid, from_number, SUPPORT_NUMBER, status)
    params |= {
        "CallbackSource": "call-progress-events",
        "SequenceNumber": str(sequence_number),
        "Timestamp": rfc2822(at),
    }
    if duration_seconds is not None or status in TERMINAL_CALL_STATUSES:
        seconds = duration_seconds or 0
        if seconds < 0:
            raise ValueError("a duration is never negative")
        params["CallDuration"] = str(seconds)
        if status == "completed":
            params["Duration"] = str(-(-seconds // 60))  # ceil to whole billed minutes
    return _with_extra(params, extra)


def _pairs(params: Params) -> list[tuple[str, str]]:
    # Mapping.items() of a MultiDict yields every pair, repeated keys included.
    items = params.items() if isinstance(params, Mapping) else params
    return [(name, value) for name, value in items]


def sign(url: str, params: Params, auth_token: str) -> str:
    """The X-Twilio-Signature Twilio would send for a form POST to `url` with `params`.

    Documented algorithm (docs/twilio-setup.md): the full URL, then for each parameter name in
    byte order, the name followed by its value, no delimiters; HMAC-SHA1 keyed with the auth
    token; base64.
    A name that appears more than once contributes each distinct value, in sorted order (what both
    official libraries, twilio-python and twilio-node, do with repeated keys).
    """
    values_by_name: dict[str, set[str]] = {}
    for name, value in _pairs(params):
        values_by_name.setdefault(name, set()).add(value)
    message = url
    for name in sorted(values_by_name, key=lambda n: n.encode("utf-8")):
        for value in sorted(values_by_name[name], key=lambda v: v.encode("utf-8")):
            message += name + value
    digest = hmac.new(auth_token.encode("utf-8"), message.encode("utf-8"), hashlib.sha1).digest()
    return base64.b64encode(digest).decode("ascii")


def encode_form(params: Params) -> bytes:
    """`params` as an application/x-www-form-urlencoded body (repeated keys and order kept)."""
    return urlencode(_pairs(params)).encode("ascii")


def signed_form(url: str, params: Params, auth_token: str) -> tuple[bytes, dict[str, str]]:
    """The body and headers of Twilio's form POST of `params` to `url`: the URL as Twilio was
    given it (the one the daemon checks the signature against, `public_base_url` + path)."""
    pairs = _pairs(params)
    signature = sign(url, pairs, auth_token)
    return encode_form(pairs), {"Content-Type": FORM_CONTENT_TYPE, "X-Twilio-Signature": signature}
