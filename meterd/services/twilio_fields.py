"""What each field Twilio sends may look like, checked before anything is read into the database.

Every field meterd reads from a Twilio webhook has a rule here (docs/twilio-setup.md): sids are
two capital letters and 32 hex digits, the whole value and nothing else (a trailing newline is not
a sid); `From`/`To` are E.164 numbers, a `client:`/`sip:` address, a withheld form or empty;
`Timestamp` is RFC 2822 with a four-digit year in a sane range; `SequenceNumber` a bounded decimal
integer; `StatusCallbackEvent`, `CallStatus` and `<Pay>`'s `Result` one of Twilio's documented
values; `Hold`, `Muted` and the other flags `true` or `false`. A value that breaks its rule, a
field meterd reads given twice, or a field a route needs that is missing is an `InvalidRequest`
naming the field (400).

Fields meterd does not read are not judged: Twilio adds parameters without notice
(docs/twilio-setup.md); they are kept in the raw record (JSON-encoded) and in the signature check
only.
An empty value counts as absent (Twilio sends empty geo fields, an empty `CallSidEndingConference`
when a conference is ended through the API, and so on).

Pure: no I/O, no logging. Values of secret fields (`Digits`, card data) are never echoed in an
error message.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from meterd.services.errors import InvalidRequest

__all__ = [
    "CALL_STATUSES",
    "CONFERENCE_EVENTS",
    "PAY_RESULTS",
    "REQUIRED_FIELDS",
    "SEQUENCE_NUMBER_MAX",
    "TIMESTAMP_YEAR_MAX",
    "TIMESTAMP_YEAR_MIN",
    "check_webhook",
    "is_phone_field_value",
    "is_sid",
    "parse_flag",
    "parse_sequence_number",
    "parse_timestamp",
    "require_sid",
]

SID_HEX_DIGITS = 32
_SID = re.compile(r"[A-Z]{2}[0-9a-fA-F]{32}")

SEQUENCE_NUMBER_MAX = 10**12 - 1
_SEQUENCE_NUMBER = re.compile(r"0|[1-9][0-9]{0,11}")  # decimal, no sign, no leading zero

# A Timestamp outside these years is refused whatever the call (the call's own window is checked
# by the ingest service, which knows when the call began).
TIMESTAMP_YEAR_MIN = 2000
TIMESTAMP_YEAR_MAX = 2999
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_WEEKDAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_TIMESTAMP = re.compile(
    rf"(?:(?P<weekday>{'|'.join(_WEEKDAYS)}), )?"
    rf"(?P<day>[0-9]{{1,2}}) (?P<month>{'|'.join(_MONTHS)}) (?P<year>[0-9]{{4}}) "
    r"(?P<hour>[0-9]{2}):(?P<minute>[0-9]{2}):(?P<second>[0-9]{2}) "
    r"(?P<zone>[+-][0-9]{4}|GMT|UT)"
)
TIMESTAMP_CHARS_MAX = 40

# docs/twilio-setup.md: every StatusCallbackEvent a conference sends.
CONFERENCE_EVENTS = frozenset(
    {
        "conference-start",
        "conference-end",
        "participant-join",
        "participant-leave",
        "participant-mute",
        "participant-unmute",
        "participant-hold",
        "participant-unhold",
        "participant-modify",
        "participant-speech-start",
        "participant-speech-stop",
        "announcement-end",
        "announcement-fail",
    }
)
# docs/twilio-setup.md: CallStatus values (`initiated` on status callbacks only).
CALL_STATUSES = frozenset(
    {
        "queued",
        "initiated",
        "ringing",
        "in-progress",
        "completed",
        "busy",
        "failed",
        "no-answer",
        "canceled",
    }
)
# docs/twilio-setup.md: <Pay>'s Result values.
PAY_RESULTS = frozenset(
    {
        "success",
        "too-many-failed-attempts",
        "payment-connector-error",
        "caller-interrupted-with-star",
        "caller-hung-up",
        "validation-error",
        "internal-error",
    }
)

_E164 = re.compile(r"\+[1-9][0-9]{1,14}")
# What Twilio puts in From for a caller whose number is withheld, besides the numbers that spell
# the words on a keypad (+266696687 ANONYMOUS, +7378742833 RESTRICTED, ...), which are E.164.
_WITHHELD = frozenset({"anonymous", "restricted", "unknown", "private", "unavailable", "blocked"})
_ADDRESS = re.compile(r"(?:client|sips?):[!-~]{1,250}")  # printable ASCII, no spaces
_TOKEN = re.compile(r"[a-z][a-z0-9_-]{0,63}")
_DIGITS = re.compile(r"[0-9*#]{0,32}")
_SMALL_NUMBER = re.compile(r"[0-9]{1,6}")
_PRINTABLE_ASCII = re.compile(r"[!-~]{1,255}")
_URL = re.compile(r"https?://[!-~]{1,2040}")
# An agent id in a `agent:<id>` label: the same ids /agents/research accepts.
_AGENT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@:-]{0,121}")
PARTICIPANT_LABEL_CHARS_MAX = 128  # docs/twilio-setup.md


def is_sid(value: str, prefix: str | None = None) -> bool:
    """`value` is a Twilio sid: two capital letters (`prefix` if given) and 32 hex digits,
    nothing before or after."""
    if _SID.fullmatch(value) is None:
        return False
    return prefix is None or value[:2] == prefix


def is_phone_field_value(value: str) -> bool:
    """A `From`/`To`/`Caller`/`Called` value: E.164, a withheld form, `client:`/`sip:`, or empty."""
    return (
        value == ""
        or _E164.fullmatch(value) is not None
        or value.lower() in _WITHHELD
        or _ADDRESS.fullmatch(value) is not None
    )


def require_sid(value: str | None, field: str, prefix: str) -> str:
    """`value` if it is a `prefix` sid, else `InvalidRequest` naming `field`."""
    if not value:
        raise InvalidRequest(f"{field} is missing")
    if not is_sid(value, prefix):
        raise InvalidRequest(_bad(field, value, f"a Twilio sid ({prefix} + 32 hex digits)"))
    return value


def parse_timestamp(value: str | None, field: str = "Timestamp") -> dt.datetime:
    """Twilio's RFC 2822 time (`Mon, 21 Dec 2020 15:19:52 +0000`; 1- or 2-digit day), in UTC.

    Stricter than `email.utils.parsedate_to_datetime`, which takes two-digit years, a missing
    time zone, trailing text and years too large to convert: four-digit years from
    TIMESTAMP_YEAR_MIN to TIMESTAMP_YEAR_MAX, seconds, a UTC offset or GMT/UT, the weekday (if
    given) matching the date, and nothing else around it.
    """
    if not value:
        raise InvalidRequest(f"{field} is missing")
    expected = "an RFC 2822 time such as 'Mon, 21 Dec 2020 15:19:52 +0000'"
    match = _TIMESTAMP.fullmatch(value) if len(value) <= TIMESTAMP_CHARS_MAX else None
    if match is None:
        raise InvalidRequest(_bad(field, value, expected))
    year = int(match["year"])
    if not TIMESTAMP_YEAR_MIN <= year <= TIMESTAMP_YEAR_MAX:
        raise InvalidRequest(
            _bad(field, value, f"a time in the years {TIMESTAMP_YEAR_MIN}-{TIMESTAMP_YEAR_MAX}")
        )
    zone = match["zone"]
    offset_minutes = 0
    if zone[0] in "+-":
        hours, minutes = int(zone[1:3]), int(zone[3:5])
        if hours > 23 or minutes > 59:
            raise InvalidRequest(_bad(field, value, expected))
        offset_minutes = (hours * 60 + minutes) * (-1 if zone[0] == "-" else 1)
    try:
        local = dt.datetime(
            year,
            _MONTHS.index(match["month"]) + 1,
            int(match["day"]),
            int(match["hour"]),
            int(match["minute"]),
            int(match["second"]),
            tzinfo=dt.timezone(dt.timedelta(minutes=offset_minutes)),
        )
    except ValueError:  # 31 Feb, hour 24, second 60, ...
        raise InvalidRequest(_bad(field, value, expected)) from None
    if match["weekday"] is not None and _WEEKDAYS[local.weekday()] != match["weekday"]:
        raise InvalidRequest(_bad(field, value, "a time whose weekday matches its date"))
    return local.astimezone(dt.UTC)


def parse_sequence_number(value: str | None, field: str = "SequenceNumber") -> int:
    if not value:
        raise InvalidRequest(f"{field} is missing")
    if _SEQUENCE_NUMBER.fullmatch(value) is None:
        raise InvalidRequest(
            _bad(field, value, f"a whole number from 0 to {SEQUENCE_NUMBER_MAX}, in decimal")
        )
    return int(value)


def parse_flag(value: str | None, field: str) -> bool | None:
    """Twilio's `true`/`false` strings; absent or empty is None."""
    if not value:
        return None
    if value not in ("true", "false"):
        raise InvalidRequest(_bad(field, value, "true or false"))
    return value == "true"


# --- the rules, by field ----------------------------------------------------------------------


@dataclass(frozen=True)
class _Rule:
    check: Callable[[str], bool]
    expected: str  # what the value should be, for the error message
    echo: bool = True  # may the bad value appear in the error message?


def _sid_rule(prefix: str | None) -> _Rule:
    if prefix is None:
        return _Rule(is_sid, "a Twilio sid (2 capital letters + 32 hex digits)")
    return _Rule(lambda v: is_sid(v, prefix), f"a Twilio sid ({prefix} + 32 hex digits)")


def _pattern(pattern: re.Pattern[str], expected: str, *, echo: bool = True) -> _Rule:
    return _Rule(lambda value: pattern.fullmatch(value) is not None, expected, echo)


def _one_of(values: frozenset[str]) -> _Rule:
    return _Rule(values.__contains__, "one of " + ", ".join(sorted(values)))


def _parses(parse: Callable[[str], object]) -> Callable[[str], bool]:
    def check(value: str) -> bool:
        try:
            parse(value)
        except InvalidRequest:
            return False
        return True

    return check


def _is_label(value: str) -> bool:
    if len(value) > PARTICIPANT_LABEL_CHARS_MAX or not value.isprintable():
        return False
    if value.startswith("agent:"):
        return _AGENT_ID.fullmatch(value[len("agent:") :]) is not None
    return value == value.strip()


_PHONE = _Rule(
    is_phone_field_value,
    "an E.164 number (+ and up to 15 digits), client:/sip: address, anonymous or empty",
    echo=False,
)
_CALL_SID = _sid_rule("CA")

RULES: dict[str, _Rule] = {
    # sids (docs/twilio-setup.md; ParticipantSid: whatever two letters Twilio gives it)
    "AccountSid": _sid_rule("AC"),
    "CallSid": _CALL_SID,
    "ParentCallSid": _CALL_SID,
    "DialCallSid": _CALL_SID,
    "DequeingCallSid": _CALL_SID,
    "CallSidEndingConference": _CALL_SID,
    "CallSidToCoach": _CALL_SID,
    "ConferenceSid": _sid_rule("CF"),
    "QueueSid": _sid_rule("QU"),
    "RecordingSid": _sid_rule("RE"),
    "ParticipantSid": _sid_rule(None),
    # meterd names each conference after the customer's CallSid
    "FriendlyName": _Rule(_CALL_SID.check, "the CallSid meterd named the conference after"),
    # numbers
    "From": _PHONE,
    "To": _PHONE,
    "Caller": _PHONE,
    "Called": _PHONE,
    # the event
    "Timestamp": _Rule(_parses(parse_timestamp), "an RFC 2822 time, e.g. Mon, 21 Dec 2020 ..."),
    "SequenceNumber": _Rule(
        _parses(parse_sequence_number), f"a whole number from 0 to {SEQUENCE_NUMBER_MAX}"
    ),
    "StatusCallbackEvent": _one_of(CONFERENCE_EVENTS),
    "CallStatus": _one_of(CALL_STATUSES),
    "CallbackSource": _pattern(_TOKEN, "a word such as call-progress-events"),
    "ParticipantLabel": _Rule(
        _is_label,
        f"printable, at most {PARTICIPANT_LABEL_CHARS_MAX} characters; agent:<id> with an id "
        "of letters, digits and _.@:-",
    ),
    **{
        flag: _one_of(frozenset({"true", "false"}))
        for flag in ("Hold", "Muted", "Coaching", "EndConferenceOnExit", "StartConferenceOnEnter")
    },
    # the PIN and <Pay>
    "Digits": _pattern(_DIGITS, "keypad digits", echo=False),
    "Result": _one_of(PAY_RESULTS),
    "PaymentToken": _pattern(_PRINTABLE_ASCII, "a gateway token", echo=False),
    "For": _pattern(_TOKEN, "a word such as payment-card-number"),
    "ErrorType": _pattern(_TOKEN, "a word such as input-timeout"),
    "Attempt": _pattern(_SMALL_NUMBER, "a small whole number"),
    # the fallback
    "ErrorCode": _pattern(_SMALL_NUMBER, "a Twilio error code"),
    "ErrorUrl": _pattern(_URL, "an http(s) URL"),
}

# What each route cannot do without (non-empty). The conference route also needs the
# participant's CallSid on participant-* events.
REQUIRED_FIELDS: dict[str, tuple[str, ...]] = {
    "voice": ("CallSid",),
    "callback": ("CallSid",),  # a callback answered: the voice webhook of an outbound call
    "pin": ("CallSid",),
    "pay": ("CallSid",),
    "pay-status": ("CallSid",),
    "fallback": ("CallSid",),
    "call-status": ("CallSid", "CallStatus"),
    "conference": (
        "ConferenceSid",
        "FriendlyName",
        "StatusCallbackEvent",
        "SequenceNumber",
        "Timestamp",
    ),
    "announcement": (),
}


def check_webhook(route: str, params: Iterable[tuple[str, str]]) -> None:
    """Refuse (`InvalidRequest`, naming the field) a webhook form whose fields meterd reads are
    malformed, repeated or, for `route` (a key of REQUIRED_FIELDS), missing."""
    seen: dict[str, str] = {}
    for name, value in params:
        rule = RULES.get(name)
        if rule is None:
            continue  # not read by meterd: kept raw, never interpreted
        if name in seen:
            raise InvalidRequest(f"{name} is given more than once")
        seen[name] = value
        if value and not rule.check(value):
            raise InvalidRequest(_bad(name, value if rule.echo else None, rule.expected))
    required = REQUIRED_FIELDS[route]
    if route == "conference" and seen.get("StatusCallbackEvent", "").startswith("participant-"):
        required = (*required, "CallSid")
    for name in required:
        if not seen.get(name):
            raise InvalidRequest(f"{name} is missing")


def _bad(field: str, value: str | None, expected: str) -> str:
    if value is None:
        return f"{field} is not {expected}"
    shown = value if len(value) <= 64 else value[:64] + "..."
    return f"{field} is not {expected}: {shown!r}"
