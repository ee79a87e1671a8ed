"""Both of Twilio's webhook signature schemes (issue 13), each request signed by the twilio
library's own validator: the auth token with HMAC-SHA1 (X-Twilio-Signature alone), and a webhook
SharedKey with HMAC-SHA256 announced by X-Twilio-Webhooks-Signature-Settings."""

from __future__ import annotations

import datetime as dt

import pytest
from twilio.request_validator import RequestValidator

from tests.call_scripts import CUSTOMER_NUMBER, CallScript
from tests.twilio_payloads import encode_form

from .twilio_app import PUBLIC_BASE_URL, TWILIO_TOKEN, ManualClock, admin, build_app

START = dt.datetime(2026, 11, 20, 15, 0, tzinfo=dt.UTC)
WEBHOOK_KEY = "webhook-shared-key-0123456789abcdef"
SETTINGS = "key=webhooks_sharedkey_0123,algorithm=HMAC_SHA256"

pytestmark = pytest.mark.skipif(
    not hasattr(
        __import__("twilio.request_validator").request_validator, "get_signature_algorithm"
    ),
    reason="the installed twilio library does not know the newer scheme",
)


async def _client(aiohttp_client, database, tmp_path, **env):
    client = await aiohttp_client(build_app(database, tmp_path, ManualClock(START), **env))
    body = {
        "account_id": "acme",
        "name": "Acme",
        "plan": "service_agreement",
        "caller_ids": [CUSTOMER_NUMBER],
    }
    assert (await admin(client, "POST", "/admin/accounts", body)).status == 201
    return client


async def _voice(client, headers):
    params = CallScript(1, START).voice()
    return await client.post(
        "/twilio/voice",
        data=encode_form(params),
        headers={"Content-Type": "application/x-www-form-urlencoded", **headers},
    )


def _signed(secret: str, algorithm: str | None) -> str:
    params = CallScript(1, START).voice()
    url = PUBLIC_BASE_URL + "/twilio/voice"
    return RequestValidator(secret).compute_signature(url, params, algorithm)


async def test_the_auth_token_scheme_signed_by_the_library_is_accepted(
    aiohttp_client, database, tmp_path
):
    client = await _client(aiohttp_client, database, tmp_path)
    response = await _voice(client, {"X-Twilio-Signature": _signed(TWILIO_TOKEN, None)})
    assert response.status == 200 and "<Conference" in await response.text()


async def test_the_shared_key_hmac_sha256_scheme_is_accepted(aiohttp_client, database, tmp_path):
    client = await _client(
        aiohttp_client, database, tmp_path, METERD_TWILIO_WEBHOOK_KEY=WEBHOOK_KEY
    )
    response = await _voice(
        client,
        {
            "X-Twilio-Signature": _signed(WEBHOOK_KEY, "HMAC_SHA256"),
            "X-Twilio-Webhooks-Signature-Settings": SETTINGS,
        },
    )
    assert response.status == 200 and "<Conference" in await response.text()


@pytest.mark.parametrize(
    ("secret", "algorithm", "code"),
    [
        (TWILIO_TOKEN, "HMAC_SHA256", "bad_signature"),  # the wrong secret for the scheme
        (WEBHOOK_KEY, None, "bad_signature"),  # SHA1 where the header says SHA256
        ("another-key-0123456789abcdef", "HMAC_SHA256", "bad_signature"),
    ],
)
async def test_a_shared_key_signature_that_does_not_match_is_403(
    aiohttp_client, database, tmp_path, secret, algorithm, code
):
    client = await _client(
        aiohttp_client, database, tmp_path, METERD_TWILIO_WEBHOOK_KEY=WEBHOOK_KEY
    )
    response = await _voice(
        client,
        {
            "X-Twilio-Signature": _signed(secret, algorithm),
            "X-Twilio-Webhooks-Signature-Settings": SETTINGS,
        },
    )
    assert response.status == 403 and (await response.json())["error"] == code


async def test_the_newer_scheme_without_a_configured_key_is_403_naming_the_setting(
    aiohttp_client, database, tmp_path
):
    client = await _client(aiohttp_client, database, tmp_path)
    response = await _voice(
        client,
        {
            "X-Twilio-Signature": _signed(WEBHOOK_KEY, "HMAC_SHA256"),
            "X-Twilio-Webhooks-Signature-Settings": SETTINGS,
        },
    )
    body = await response.json()
    assert response.status == 403 and body["error"] == "webhook_key_not_set"
    assert "METERD_TWILIO_WEBHOOK_KEY" in body["detail"]
