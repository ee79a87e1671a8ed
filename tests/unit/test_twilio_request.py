"""Reading and authenticating Twilio webhooks: the signed URL, the signature, and strict parsing.

Signatures in these tests come from `tests.twilio_payloads.sign`, an implementation of Twilio's
documented algorithm that does not use the twilio library meterd validates with.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, make_mocked_request
from hypothesis import given
from hypothesis import strategies as st
from multidict import MultiDict
from twilio.request_validator import RequestValidator
from yarl import URL

from meterd.web.app import json_error
from meterd.web.twilio_request import (
    FORM_FIELDS_MAX,
    TwilioRequestRejected,
    read_signed_form,
    twilio_url,
)
from tests.twilio_payloads import (
    ACCOUNT_SID,
    call_status_params,
    conference_params,
    encode_form,
    gather_params,
    sid,
    sign,
    voice_params,
)

TOKEN = "0123456789abcdef0123456789abcdef"
OTHER_TOKEN = "fedcba9876543210fedcba9876543210"
BASE = "https://calls.example.com"
BODY_BYTES_MAX = 64 * 1024
FORM = "application/x-www-form-urlencoded"
AT = datetime(2020, 12, 21, 15, 19, 52, tzinfo=UTC)
CALL_SID = sid("CA", 1)

Params = dict[str, str] | list[tuple[str, str]]


@dataclass
class Seen:
    forms: list[MultiDict[str]] = field(default_factory=list)
    rejections: list[TwilioRequestRejected] = field(default_factory=list)
    urls: list[str] = field(default_factory=list)


SEEN = web.AppKey("seen", Seen)


def webhook_app(
    public_base_url: str = BASE,
    auth_token: str = TOKEN,
    body_bytes_max: int = BODY_BYTES_MAX,
    client_max_size: int = 1024**2,
) -> web.Application:
    async def handler(request: web.Request) -> web.Response:
        seen = request.app[SEEN]
        seen.urls.append(twilio_url(public_base_url, request))
        try:
            form = await read_signed_form(
                request,
                public_base_url=public_base_url,
                auth_token=auth_token,
                body_bytes_max=body_bytes_max,
            )
        except TwilioRequestRejected as rejected:
            seen.rejections.append(rejected)
            return json_error(rejected.status, rejected.code, rejected.detail)
        seen.forms.append(form)
        return web.Response(status=204)

    app = web.Application(client_max_size=client_max_size)
    app[SEEN] = Seen()
    app.router.add_post("/{tail:.*}", handler)
    return app


Client = TestClient[web.Request, web.Application]
MakeClient = Callable[..., Awaitable[Client]]


@pytest.fixture
async def client(aiohttp_client: MakeClient) -> AsyncIterator[Client]:
    yield await aiohttp_client(webhook_app())


async def post_signed(
    client: Client,
    path: str,
    params: Params,
    *,
    url: str | None = None,
    token: str = TOKEN,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str]]:
    """POST `params` to `path`, signed as Twilio would for `url` (default: BASE + path)."""
    signature = sign(url if url is not None else BASE + path, params, token)
    all_headers = {"Content-Type": FORM, "X-Twilio-Signature": signature, **(headers or {})}
    # encoded=True: send the target byte for byte (the test client would otherwise normalise it)
    target = URL(path, encoded=True)
    response = await client.post(target, data=encode_form(params), headers=all_headers)
    body = {} if response.status == 204 else await response.json()
    return response.status, body


def seen(client: Client) -> Seen:
    assert client.app is not None
    return client.app[SEEN]


# --- sign(): the independent implementation of the documented algorithm ---------------------


def test_sign_reproduces_the_documented_test_vector():
    params = {
        "CallSid": "CA1234567890ABCDE",
        "Caller": "+14158675310",
        "Digits": "1234",
        "From": "+14158675310",
        "To": "+18005551212",
    }
    url = "https://example.com/myapp.php?foo=1&bar=2"
    assert sign(url, params, "12345") == "L/OH5YylLD5NRKLltdqwSvS0BnU="
    assert sign(url, list(reversed(params.items())), "12345") == "L/OH5YylLD5NRKLltdqwSvS0BnU="


_names = st.text(min_size=1, max_size=12)
_values = st.text(max_size=20)


@given(
    url=st.sampled_from([BASE + "/twilio/voice", BASE + "/meterd/x?a=1&b=%27", "http://h:80/"]),
    pairs=st.lists(st.tuples(_names, _values), max_size=12),
    repeated=st.lists(_values, max_size=4),
    token=st.text(min_size=1, max_size=40),
)
def test_sign_agrees_with_twilios_compute_signature(url, pairs, repeated, token):
    pairs = pairs + [("Repeated", value) for value in repeated]
    expected = RequestValidator(token).compute_signature(url, MultiDict(pairs))
    assert sign(url, pairs, token) == expected


# --- accepted requests -----------------------------------------------------------------------


async def test_a_correctly_signed_voice_webhook_is_accepted_with_every_field(client):
    params = voice_params(CALL_SID, "+14155550199")
    assert await post_signed(client, "/twilio/voice", params) == (204, {})
    [form] = seen(client).forms
    assert list(form.items()) == list(params.items())


async def test_repeated_keys_are_kept_in_order_and_signed(client):
    params = [
        *voice_params(CALL_SID, "+14155550199").items(),
        ("StatusCallbackEvent", "ringing"),
        ("StatusCallbackEvent", "answered"),
        ("StatusCallbackEvent", "ringing"),
    ]
    assert (await post_signed(client, "/twilio/voice", params))[0] == 204
    [form] = seen(client).forms
    assert form.getall("StatusCallbackEvent") == ["ringing", "answered", "ringing"]
    assert list(form.items()) == params


async def test_unknown_extra_parameters_are_accepted_and_part_of_the_signature(client):
    params = voice_params(CALL_SID, "+14155550199", StirVerstat="TN-Validation-Passed-A")
    params["SomethingTwilioAddsNextYear"] = "ünïcödé & = + %"
    assert (await post_signed(client, "/twilio/voice", params))[0] == 204
    assert seen(client).forms[0]["SomethingTwilioAddsNextYear"] == "ünïcödé & = + %"


async def test_the_query_string_is_signed_exactly_as_received(client):
    path = "/twilio/voice?t=7&note=it's%20here&plus=a+b&q=%3F"
    params = voice_params(CALL_SID, "+14155550199")
    assert (await post_signed(client, path, params))[0] == 204
    assert seen(client).urls == [BASE + path]


async def test_an_empty_signed_form_is_an_empty_form(client):
    assert (await post_signed(client, "/twilio/ping", {}))[0] == 204
    assert seen(client).forms == [MultiDict()]


async def test_a_charset_parameter_on_the_content_type_is_accepted(client):
    params = gather_params(CALL_SID, "4821")
    headers = {"Content-Type": "application/x-www-form-urlencoded; charset=UTF-8"}
    assert (await post_signed(client, "/twilio/pin", params, headers=headers))[0] == 204
    assert seen(client).forms[0]["Digits"] == "4821"


async def test_conference_and_call_status_callbacks_are_accepted(client):
    conference = conference_params(
        sid("CF", 1), CALL_SID, "participant-hold", 4, AT, call_sid=sid("CA", 2), label="agent:7"
    )
    status = call_status_params(CALL_SID, "completed", 3, AT, duration_seconds=61)
    assert (await post_signed(client, "/twilio/conference", conference))[0] == 204
    assert (await post_signed(client, "/twilio/status", status))[0] == 204
    held, completed = seen(client).forms
    assert (held["StatusCallbackEvent"], held["Hold"]) == ("participant-hold", "true")
    assert (completed["CallDuration"], completed["Duration"]) == ("61", "2")


# --- the signed URL: path prefix, ports ------------------------------------------------------


async def test_a_public_base_url_with_a_path_prefix_validates(aiohttp_client):
    client = await aiohttp_client(webhook_app("https://calls.example.com/meterd"))
    params = voice_params(CALL_SID, "+14155550199")
    url = "https://calls.example.com/meterd/twilio/voice"
    assert (await post_signed(client, "/twilio/voice", params, url=url))[0] == 204
    # The proxy strips the prefix: a signature over the URL without it does not match.
    status, body = await post_signed(client, "/twilio/voice", params, url=BASE + "/twilio/voice")
    assert (status, body["error"]) == (403, "bad_signature")


async def test_a_trailing_slash_on_the_public_base_url_is_ignored(aiohttp_client):
    client = await aiohttp_client(webhook_app("https://calls.example.com/meterd/"))
    params = voice_params(CALL_SID, "+14155550199")
    url = "https://calls.example.com/meterd/twilio/voice"
    assert (await post_signed(client, "/twilio/voice", params, url=url))[0] == 204


async def test_a_public_base_url_with_an_explicit_port_validates(aiohttp_client):
    client = await aiohttp_client(webhook_app("https://calls.example.com:8443"))
    params = voice_params(CALL_SID, "+14155550199")
    url = "https://calls.example.com:8443/twilio/voice"
    assert (await post_signed(client, "/twilio/voice", params, url=url))[0] == 204
    wrong_port = "https://calls.example.com:9443/twilio/voice"
    assert (await post_signed(client, "/twilio/voice", params, url=wrong_port))[0] == 403


@pytest.mark.parametrize("signed_host", ["calls.example.com", "calls.example.com:443"])
@pytest.mark.parametrize("base", ["https://calls.example.com", "https://calls.example.com:443"])
async def test_https_signed_with_or_without_the_default_port_validates(
    aiohttp_client, base, signed_host
):
    client = await aiohttp_client(webhook_app(base))
    params = call_status_params(CALL_SID, "ringing", 0, AT)
    url = f"https://{signed_host}/twilio/status?x=1"
    assert (await post_signed(client, "/twilio/status?x=1", params, url=url))[0] == 204


async def test_the_internal_http_url_is_not_what_twilio_signed(client):
    params = voice_params(CALL_SID, "+14155550199")
    internal = str(client.make_url("/twilio/voice"))  # http://127.0.0.1:<port>/twilio/voice
    assert (await post_signed(client, "/twilio/voice", params, url=internal))[0] == 403


def test_twilio_url_keeps_the_raw_target_and_drops_only_a_fragment():
    request = make_mocked_request("POST", "/twilio/voice?x=it's%20a+b&y=%27&z")
    assert twilio_url(BASE, request) == BASE + "/twilio/voice?x=it's%20a+b&y=%27&z"
    assert twilio_url(BASE + "/", make_mocked_request("POST", "/a")) == BASE + "/a"
    assert twilio_url(BASE, make_mocked_request("POST", "/a?")) == BASE + "/a?"
    assert twilio_url(BASE, make_mocked_request("POST", "/a?b=1#rc=2")) == BASE + "/a?b=1"
    absolute = make_mocked_request("POST", "http://10.0.0.1:8080/a?b=1")
    assert twilio_url(BASE + "/p", absolute) == BASE + "/p/a?b=1"


# --- refused signatures ----------------------------------------------------------------------


async def test_a_forged_signature_is_refused_and_names_the_call(client):
    params = voice_params(CALL_SID, "+14155550199")
    response = await client.post(
        "/twilio/voice",
        data=encode_form(params),
        headers={"Content-Type": FORM, "X-Twilio-Signature": "L/OH5YylLD5NRKLltdqwSvS0BnU="},
    )
    assert response.status == 403
    assert (await response.json())["error"] == "bad_signature"
    [rejected] = seen(client).rejections
    assert (rejected.status, rejected.code, rejected.call_sid) == (403, "bad_signature", CALL_SID)


async def test_a_missing_signature_is_refused(client):
    params = voice_params(CALL_SID, "+14155550199")
    response = await client.post(
        "/twilio/voice", data=encode_form(params), headers={"Content-Type": FORM}
    )
    assert response.status == 403
    assert json.loads(await response.text()) == {
        "error": "missing_signature",
        "detail": "the request has no X-Twilio-Signature header",
    }
    assert seen(client).rejections[0].call_sid == CALL_SID


async def test_a_signature_made_with_another_token_is_refused(client):
    params = voice_params(CALL_SID, "+14155550199")
    status, body = await post_signed(client, "/twilio/voice", params, token=OTHER_TOKEN)
    assert (status, body["error"]) == (403, "bad_signature")


@pytest.mark.parametrize(
    "tamper",
    [
        pytest.param(lambda p: p | {"From": "+14155550100"}, id="changed"),
        pytest.param(lambda p: p | {"Digits": "1"}, id="added"),
        pytest.param(lambda p: {k: v for k, v in p.items() if k != "CallStatus"}, id="removed"),
    ],
)
async def test_a_signature_over_other_params_is_refused(client, tamper):
    signed = voice_params(CALL_SID, "+14155550199")
    sent = tamper(signed)
    response = await client.post(
        "/twilio/voice",
        data=encode_form(sent),
        headers={
            "Content-Type": FORM,
            "X-Twilio-Signature": sign(BASE + "/twilio/voice", signed, TOKEN),
        },
    )
    assert response.status == 403
    assert (await response.json())["error"] == "bad_signature"


async def test_a_signature_over_another_path_or_query_is_refused(client):
    params = voice_params(CALL_SID, "+14155550199")
    url = BASE + "/twilio/voice?t=1"
    assert (await post_signed(client, "/twilio/voice?t=2", params, url=url))[0] == 403
    assert (await post_signed(client, "/twilio/pin?t=1", params, url=url))[0] == 403


@pytest.mark.parametrize("signed_with", ["", TOKEN])
async def test_with_no_auth_token_configured_every_request_is_refused(aiohttp_client, signed_with):
    client = await aiohttp_client(webhook_app(auth_token=""))
    params = voice_params(CALL_SID, "+14155550199")
    status, body = await post_signed(client, "/twilio/voice", params, token=signed_with)
    assert (status, body["error"]) == (403, "auth_token_not_set")
    assert "METERD_TWILIO_AUTH_TOKEN is not set" in body["detail"]
    assert seen(client).rejections[0].call_sid == CALL_SID


async def test_with_no_auth_token_even_a_malformed_body_is_refused_with_403(aiohttp_client):
    client = await aiohttp_client(webhook_app(auth_token=""))
    response = await client.post("/twilio/voice", data=b"\xff", headers={"Content-Type": FORM})
    assert response.status == 403
    assert seen(client).rejections[0].call_sid == ""


# --- malformed bodies: always the chosen 4xx, never a 5xx -------------------------------------


@pytest.mark.parametrize(
    ("body", "content_type", "status", "code"),
    [
        pytest.param(b"CallSid=CA1&From=\xff\xfe", FORM, 400, "not_utf8", id="raw-non-utf8"),
        pytest.param(b"CallSid=CA1&From=%FF", FORM, 400, "not_utf8", id="percent-FF"),
        pytest.param(b"CallSid=%C3%28", FORM, 400, "not_utf8", id="percent-bad-sequence"),
        pytest.param(b"CallSid=%ED%A0%80", FORM, 400, "not_utf8", id="percent-surrogate"),
        pytest.param(b"CallSid=CA1&From=%ZZ", FORM, 400, "malformed_form", id="percent-ZZ"),
        pytest.param(b"CallSid=CA1&From=%", FORM, 400, "malformed_form", id="dangling-percent"),
        pytest.param(b"CallSid=CA1&Digits", FORM, 400, "malformed_form", id="no-equals"),
        pytest.param(b"CallSid=CA1&", FORM, 400, "malformed_form", id="trailing-ampersand"),
        pytest.param(b"&&", FORM, 400, "malformed_form", id="only-ampersands"),
        pytest.param(
            b'{"CallSid": "CA1"}', "application/json", 400, "wrong_content_type", id="json"
        ),
        pytest.param(b"CallSid=CA1", None, 400, "wrong_content_type", id="no-content-type"),
        pytest.param(b"CallSid=CA1", "text/plain", 400, "wrong_content_type", id="text-plain"),
        pytest.param(
            b"--x\r\nContent-Disposition: form-data; name=a\r\n\r\n1\r\n--x--\r\n",
            "multipart/form-data; boundary=x",
            400,
            "wrong_content_type",
            id="multipart",
        ),
        pytest.param(
            b"&".join(b"f%d=1" % i for i in range(FORM_FIELDS_MAX + 1)),
            FORM,
            413,
            "too_many_fields",
            id="1001-fields",
        ),
        pytest.param(
            b"CallSid=" + b"a" * BODY_BYTES_MAX, FORM, 413, "body_too_large", id="over-cap"
        ),
    ],
)
async def test_a_malformed_body_is_refused_with_a_4xx(client, body, content_type, status, code):
    headers = {"X-Twilio-Signature": sign(BASE + "/twilio/voice", {}, TOKEN)}
    if content_type is not None:
        headers["Content-Type"] = content_type
    response = await client.post("/twilio/voice", data=body, headers=headers)
    assert response.status == status
    assert (await response.json())["error"] == code
    [rejected] = seen(client).rejections
    assert (rejected.status, rejected.code) == (status, code)


async def test_exactly_form_fields_max_fields_are_accepted(client):
    params = [(f"f{i}", "1") for i in range(FORM_FIELDS_MAX)]
    assert (await post_signed(client, "/twilio/voice", params))[0] == 204
    assert len(seen(client).forms[0]) == FORM_FIELDS_MAX


async def test_a_chunked_body_over_the_cap_is_refused_with_413(client):
    async def chunks() -> AsyncIterator[bytes]:
        yield b"CallSid=CA1&Pad="
        for _ in range(BODY_BYTES_MAX // 4096 + 1):
            yield b"a" * 4096

    response = await client.post(
        "/twilio/voice",
        data=chunks(),
        headers={"Content-Type": FORM, "X-Twilio-Signature": "x"},
    )
    assert response.status == 413
    assert (await response.json())["error"] == "body_too_large"


async def test_aiohttps_own_size_limit_becomes_our_413(aiohttp_client):
    client = await aiohttp_client(webhook_app(client_max_size=1024))

    async def chunks() -> AsyncIterator[bytes]:
        yield b"CallSid=" + b"a" * 2048

    response = await client.post(
        "/twilio/voice", data=chunks(), headers={"Content-Type": FORM, "X-Twilio-Signature": "x"}
    )
    assert response.status == 413
    assert (await response.json())["error"] == "body_too_large"


# --- the payload builders --------------------------------------------------------------------


def test_builders_use_twilios_formats():
    assert sid("CA", 1) == "CA" + "0" * 31 + "1"
    assert ACCOUNT_SID.startswith("AC") and len(ACCOUNT_SID) == 34
    status = call_status_params(CALL_SID, "in-progress", 1, AT)
    assert status["Timestamp"] == "Mon, 21 Dec 2020 15:19:52 +0000"
    assert (status["CallbackSource"], status["SequenceNumber"]) == ("call-progress-events", "1")
    assert "CallDuration" not in status and "Duration" not in status
    join = conference_params(sid("CF", 1), CALL_SID, "participant-join", 0, AT, call_sid=CALL_SID)
    assert (join["Hold"], join["Muted"], join["StartConferenceOnEnter"]) == (
        "false",
        "false",
        "true",
    )
    start = conference_params(sid("CF", 1), CALL_SID, "conference-start", 0, AT)
    assert not {"CallSid", "Hold", "Muted", "CallbackSource"} & set(start)
    leave = conference_params(sid("CF", 1), CALL_SID, "participant-leave", 9, AT, call_sid="CA")
    assert leave["ReasonParticipantLeft"] == "participant_hung_up"
    end = conference_params(sid("CF", 1), CALL_SID, "conference-end", 10, AT, call_sid=CALL_SID)
    assert end["ReasonConferenceEnded"] == "last-participant-left" and "CallSid" not in end
