"""The format of every Twilio field meterd reads (issue 12, findings 2 and 3, strict parsing).

Each rule is checked against a definition written without regular expressions, so a `$` that
lets a trailing newline through, or a parser that accepts a 20-digit year, shows up here.
"""

from __future__ import annotations

import datetime as dt
import email.utils
import string

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from meterd.services import validation
from meterd.services.errors import InvalidRequest
from meterd.services.twilio_fields import (
    CALL_STATUSES,
    CONFERENCE_EVENTS,
    SEQUENCE_NUMBER_MAX,
    TIMESTAMP_YEAR_MAX,
    TIMESTAMP_YEAR_MIN,
    check_webhook,
    is_phone_field_value,
    is_sid,
    parse_flag,
    parse_sequence_number,
    parse_timestamp,
    require_sid,
)
from tests.twilio_payloads import (
    call_status_params,
    conference_params,
    gather_params,
    sid,
    voice_params,
)

AT = dt.datetime(2026, 11, 20, 15, 0, tzinfo=dt.UTC)
CALL_SID = sid("CA", 1)
HEX = string.hexdigits  # 0-9, a-f, A-F


def _is_sid_by_definition(value: str) -> bool:
    """Twilio's format, spelled out: 2 capital ASCII letters, then exactly 32 hex digits."""
    return (
        len(value) == 34
        and all(c in string.ascii_uppercase for c in value[:2])
        and all(c in HEX for c in value[2:])
    )


valid_sids = st.builds(
    lambda prefix, digits: prefix + digits,
    st.text(string.ascii_uppercase, min_size=2, max_size=2),
    st.text(HEX, min_size=32, max_size=32),
)


# --- sids -------------------------------------------------------------------------------------


@given(valid_sids)
def test_any_valid_sid_is_accepted(value):
    assert is_sid(value)
    assert is_sid(value, value[:2])
    assert require_sid(value, "CallSid", value[:2]) == value


@given(
    st.one_of(
        st.text(),
        st.text(string.ascii_uppercase + HEX + "\n \t\r\x00", max_size=40),
        # a valid sid with anything before or after it
        st.builds(lambda s, extra: s + extra, valid_sids, st.text(min_size=1, max_size=3)),
        st.builds(lambda s, extra: extra + s, valid_sids, st.text(min_size=1, max_size=3)),
        # a valid sid with one character changed
        st.builds(
            lambda s, i, c: s[:i] + c + s[i + 1 :],
            valid_sids,
            st.integers(0, 33),
            st.characters(),
        ),
    )
)
@example("CA" + "0" * 32 + "\n")  # finding 3
@example("CA" + "0" * 31 + "\n")
@example("ca" + "0" * 32)
@example("CA" + "0" * 31 + "g")
@example("CA" + "\u0660" * 32)  # Arabic-Indic zeros: digits to \d, not hex to Twilio
def test_any_string_that_is_not_a_sid_is_refused(value):
    assert is_sid(value) == _is_sid_by_definition(value)
    if not _is_sid_by_definition(value):
        with pytest.raises(InvalidRequest, match=r"^CallSid "):
            require_sid(value, "CallSid", "CA")


def test_a_sid_of_another_kind_is_refused_where_a_call_sid_is_expected():
    assert not is_sid(sid("CF", 1), "CA")
    with pytest.raises(InvalidRequest, match="CallSid is not a Twilio sid \\(CA"):
        require_sid(sid("CF", 1), "CallSid", "CA")


# --- timestamps -------------------------------------------------------------------------------

in_range = st.datetimes(
    min_value=dt.datetime(TIMESTAMP_YEAR_MIN, 1, 2),
    max_value=dt.datetime(TIMESTAMP_YEAR_MAX, 12, 30),
    timezones=st.just(dt.UTC),
).map(lambda t: t.replace(microsecond=0))


@given(in_range, st.integers(-23 * 60 - 59, 23 * 60 + 59), st.booleans())
def test_any_rfc_2822_time_twilio_could_send_parses_to_the_same_instant(at, offset_min, one_digit):
    local = at.astimezone(dt.timezone(dt.timedelta(minutes=offset_min)))
    text = email.utils.format_datetime(local)
    if one_digit:  # docs/twilio-setup.md: 'Thu, 1 Jun 2017 20:48:32 +0000'
        text = text.replace(f", {local.day:02d} ", f", {local.day} ")
    parsed = parse_timestamp(text)
    assert parsed == at and parsed.tzinfo == dt.UTC


def test_twilio_s_documented_examples_parse():
    assert parse_timestamp("Mon, 21 Dec 2020 15:19:52 +0000") == dt.datetime(
        2020, 12, 21, 15, 19, 52, tzinfo=dt.UTC
    )
    assert parse_timestamp("Thu, 1 Jun 2017 20:48:32 +0000") == dt.datetime(
        2017, 6, 1, 20, 48, 32, tzinfo=dt.UTC
    )


@pytest.mark.parametrize(
    "value",
    [
        "Mon, 02 Dec 99999999999999999999 10:00:00 +0000",  # finding 2: was a 500
        "Fri, 31 Dec 9999 23:59:59 -1400",
        "Fri, 01 Jan 1971 00:00:00 +0000",  # finding 0's timestamp: out of range already
        "Mon, 02 Dec 20 10:00:00 +0000",  # two-digit year
        "Mon, 21 Dec 2020 15:19:52 +0000\n",
        " Mon, 21 Dec 2020 15:19:52 +0000",
        "Mon, 21 Dec 2020 15:19:52",  # no zone
        "Mon, 21 Dec 2020 15:19 +0000",  # no seconds
        "Mon, 21 Dec 2020 15:19:60 +0000",
        "Mon, 21 Dec 2020 24:00:00 +0000",
        "Mon, 31 Feb 2020 10:00:00 +0000",
        "Mon, 21 Dec 2020 15:19:52 +2400",
        "Mon, 21 Dec 2020 15:19:52 +0060",
        "Tue, 21 Dec 2020 15:19:52 +0000",  # 21 Dec 2020 was a Monday
        "2020-12-21T15:19:52Z",
        "yesterday",
        "Mon, 21 Dec 2020 15:19:52 +0000 (UTC)",
        "Mon, 21 Dec 2020 15:19:52 EST",
        "Mon, 21 Dec \uff12\uff10\uff12\uff10 15:19:52 +0000",  # full-width digits
    ],
)
def test_a_malformed_or_absurd_timestamp_is_refused_naming_the_field(value):
    with pytest.raises(InvalidRequest, match=r"^Timestamp "):
        parse_timestamp(value)


@given(st.text(max_size=60))
@example("Mon, 02 Dec 99999999999999999999 10:00:00 +0000")
def test_no_text_makes_the_timestamp_parser_fail_any_other_way(value):
    try:
        parsed = parse_timestamp(value)
    except InvalidRequest:
        return
    assert parsed.tzinfo == dt.UTC
    assert TIMESTAMP_YEAR_MIN - 1 <= parsed.year <= TIMESTAMP_YEAR_MAX + 1


# --- sequence numbers, flags, numbers ---------------------------------------------------------


@given(st.integers(0, SEQUENCE_NUMBER_MAX))
def test_any_sequence_number_in_range_parses(n):
    assert parse_sequence_number(str(n)) == n


@given(st.text(max_size=16))
@example("12\n")
@example("²")
@example("007")
@example(str(SEQUENCE_NUMBER_MAX + 1))
@example("-1")
@example("+1")
def test_a_sequence_number_is_canonical_decimal_or_refused(value):
    canonical = (
        value.isascii()
        and value.isdigit()
        and str(int(value)) == value
        and int(value) <= SEQUENCE_NUMBER_MAX
    )
    if canonical:
        assert parse_sequence_number(value) == int(value)
    else:
        with pytest.raises(InvalidRequest, match=r"^SequenceNumber "):
            parse_sequence_number(value)


@pytest.mark.parametrize(("value", "parsed"), [("true", True), ("false", False), ("", None)])
def test_flags_are_true_or_false(value, parsed):
    assert parse_flag(value, "Hold") is parsed


@pytest.mark.parametrize("value", ["True", "1", "yes", "true\n", "maybe"])
def test_other_flag_values_are_refused(value):
    with pytest.raises(InvalidRequest, match=r"^Hold "):
        parse_flag(value, "Hold")


@pytest.mark.parametrize(
    "value",
    [
        "+14155550142",
        "+266696687",  # ANONYMOUS on a keypad
        "anonymous",
        "Anonymous",
        "restricted",
        "unknown",
        "",
        "client:alice",
        "sip:alice@example.sip.twilio.com",
    ],
)
def test_numbers_twilio_sends_are_accepted(value):
    assert is_phone_field_value(value)


@pytest.mark.parametrize(
    "value",
    [
        "+14155550142\n",
        "14155550142",
        "+0155550142",
        "+1415555014212345",  # 16 digits
        "+1 415 555 0142",
        "+1\u0664\u0661\u0665",  # Arabic-Indic digits
        "client:",
        "client:al ice",
        "anonymous\n",
        "\x00",
    ],
)
def test_anything_else_in_from_or_to_is_refused(value):
    assert not is_phone_field_value(value)


@given(st.integers(10, 10**15 - 1))
def test_any_e164_number_is_accepted(number):
    assert is_phone_field_value(f"+{number}")


# --- whole forms, by route --------------------------------------------------------------------


def _conference(event="participant-join", **extra):
    return conference_params(
        sid("CF", 1), CALL_SID, event, 3, AT, call_sid=sid("CA", 2), label="agent:alice", **extra
    )


@pytest.mark.parametrize(
    ("route", "params"),
    [
        ("voice", voice_params(CALL_SID, "+14155550142")),
        ("voice", voice_params(CALL_SID, "anonymous")),
        ("pin", gather_params(CALL_SID, "246810")),
        ("pay", voice_params(CALL_SID, "+14155550142", Result="success", PaymentToken="pm_x")),
        ("pay-status", voice_params(CALL_SID, "+1415", For="payment-card-number", Attempt="1")),
        ("fallback", voice_params(CALL_SID, "+1415", ErrorCode="11200", ErrorUrl="https://x/y")),
        ("call-status", call_status_params(CALL_SID, "completed", 4, AT)),
        ("call-status", call_status_params(CALL_SID, "in-progress", 1, AT)),
        ("conference", _conference()),
        ("conference", _conference("participant-hold")),
        ("conference", conference_params(sid("CF", 1), CALL_SID, "conference-start", 0, AT)),
        ("conference", conference_params(sid("CF", 1), CALL_SID, "conference-end", 9, AT)),
        ("announcement", {}),
    ],
)
def test_what_twilio_sends_passes_every_check(route, params):
    check_webhook(route, params.items())


@pytest.mark.parametrize(
    ("route", "params", "field"),
    [
        ("voice", voice_params(CALL_SID + "\n", "+14155550142"), "CallSid"),
        ("voice", voice_params(sid("CF", 1), "+14155550142"), "CallSid"),
        ("voice", voice_params(CALL_SID, "+14155550142\n"), "From"),
        ("voice", voice_params(CALL_SID, "+14155550142", To="support"), "To"),
        ("voice", {**voice_params(CALL_SID, "+1415"), "AccountSid": "AC123"}, "AccountSid"),
        ("voice", {**voice_params(CALL_SID, "+1415"), "CallStatus": "ringing\n"}, "CallStatus"),
        ("voice", {**voice_params(CALL_SID, "+1415"), "ParentCallSid": "CA1"}, "ParentCallSid"),
        (
            "voice",
            {k: v for k, v in voice_params(CALL_SID, "+1415").items() if k != "CallSid"},
            "CallSid",
        ),
        ("pin", gather_params(CALL_SID, "1234\n"), "Digits"),
        ("pay", voice_params(CALL_SID, "+1415", Result="great"), "Result"),
        (
            "pay",
            voice_params(CALL_SID, "+1415", Result="success", PaymentToken="a b"),
            "PaymentToken",
        ),
        ("pay-status", voice_params(CALL_SID, "+1415", Attempt="1\n"), "Attempt"),
        ("fallback", voice_params(CALL_SID, "+1415", ErrorCode="x"), "ErrorCode"),
        (
            "call-status",
            call_status_params(CALL_SID, "completed", 4, AT, CallStatus="done"),
            "CallStatus",
        ),
        (
            "call-status",
            call_status_params(CALL_SID, "completed", 4, AT, SequenceNumber="4\n"),
            "SequenceNumber",
        ),
        (
            "call-status",
            call_status_params(CALL_SID, "completed", 4, AT, CallbackSource="x y"),
            "CallbackSource",
        ),
        (
            "call-status",
            call_status_params(
                CALL_SID,
                "completed",
                4,
                AT,
                Timestamp="Mon, 02 Dec 99999999999999999999 10:00:00 +0000",
            ),
            "Timestamp",
        ),
        ("conference", _conference(ConferenceSid=sid("CF", 1) + "\n"), "ConferenceSid"),
        ("conference", _conference(FriendlyName="support-room"), "FriendlyName"),
        ("conference", _conference(CallSid=sid("CA", 2) + "\n"), "CallSid"),
        ("conference", _conference(CallSid=""), "CallSid"),  # a participant event names its leg
        ("conference", _conference(CallSidToCoach="CA"), "CallSidToCoach"),
        ("conference", _conference(StatusCallbackEvent="participant-dance"), "StatusCallbackEvent"),
        ("conference", _conference(SequenceNumber="-1"), "SequenceNumber"),
        ("conference", _conference(Hold="yes"), "Hold"),
        ("conference", _conference(Muted="TRUE"), "Muted"),
        ("conference", _conference(ParticipantLabel="agent:al\nice"), "ParticipantLabel"),
        ("conference", _conference(ParticipantLabel="agent:"), "ParticipantLabel"),
        ("conference", _conference(ParticipantLabel="x" * 129), "ParticipantLabel"),
        ("conference", _conference(Timestamp=""), "Timestamp"),
    ],
)
def test_a_malformed_or_missing_field_is_refused_naming_it(route, params, field):
    with pytest.raises(InvalidRequest) as refused:
        check_webhook(route, params.items())
    assert refused.value.detail.startswith(f"{field} ")


def test_a_field_meterd_reads_may_not_come_twice():
    params = [*voice_params(CALL_SID, "+14155550142").items(), ("CallSid", sid("CA", 2))]
    with pytest.raises(InvalidRequest, match=r"^CallSid is given more than once"):
        check_webhook("voice", params)


def test_fields_meterd_does_not_read_are_not_judged():
    """docs/twilio-setup.md pitfall 11: Twilio adds parameters without notice."""
    params = voice_params(CALL_SID, "+14155550142", StirVerstat="TN-Validation-Passed-A\n")
    check_webhook("voice", [*params.items(), ("NewThing", "\x00"), ("NewThing", "again")])


def test_secret_values_are_never_echoed():
    with pytest.raises(InvalidRequest) as refused:
        check_webhook("pin", gather_params(CALL_SID, "2468\n").items())
    assert "2468" not in refused.value.detail
    with pytest.raises(InvalidRequest) as refused:
        params = voice_params(CALL_SID, "+1415", Result="success", PaymentToken="tok secret")
        check_webhook("pay", params.items())
    assert "secret" not in refused.value.detail


def test_every_documented_event_and_status_is_known():
    assert {"participant-join", "participant-leave", "conference-end"} <= CONFERENCE_EVENTS
    assert {"completed", "busy", "failed", "no-answer", "canceled"} <= CALL_STATUSES


# --- the JSON validation helpers: no trailing newline through a "$" ----------------------------


@pytest.mark.parametrize("value", ["ref-1\n", "ref-1\n\n", "\nref-1"])
def test_a_json_text_field_with_a_newline_is_refused(value):
    with pytest.raises(InvalidRequest, match=r"^reference "):
        validation.reference({"reference": value})
    assert validation.reference({"reference": "ref-1"}) == "ref-1"
