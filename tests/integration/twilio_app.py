"""An in-process meterd app with Twilio configured, a controllable clock, and signed posting."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from yarl import URL

from meterd.adapters.twilio_rest import TwilioRest, TwilioRestSettings
from meterd.clock import ManualClock
from meterd.config import load_settings
from meterd.web.app import create_app
from tests.twilio_payloads import ACCOUNT_SID, encode_form, sign

TWILIO_TOKEN = "twilio-auth-token-0123456789abcdef"
PUBLIC_BASE_URL = "https://calls.example.com/meterd"
ADMIN = "admin-token-0123456789abcdef"
AGENTS = "agents-token-0123456789abcdef"
FORM = "application/x-www-form-urlencoded"


def build_app(
    database: Any,
    tmp_path: Any,
    clock: ManualClock,
    *,
    twilio_rest: Any = None,
    gateway: Any = None,
    **env: str,
) -> Any:
    settings = load_settings(
        None,
        {
            "METERD_STATE_DIR": str(tmp_path),
            "METERD_ADMIN_TOKEN": ADMIN,
            "METERD_AGENTS_TOKEN": AGENTS,
            "METERD_FINANCE_TOKEN": "finance-token-0123456789abcdef",
            "METERD_PIN_SECRET": "pin-secret-0123456789abcdef",
            "METERD_TWILIO_AUTH_TOKEN": TWILIO_TOKEN,
            "METERD_PUBLIC_BASE_URL": PUBLIC_BASE_URL,
            # In-process apps have no metering job to apply the webhook journal: a callback
            # journaled because a loaded machine kept the database busy past the 2 s default
            # would not reach the database. Tests of the journal pass their own value.
            "METERD_WEBHOOK_JOURNAL_WAIT_MS": "10000",
            **env,
        },
    )
    return create_app(settings, database, clock=clock, twilio_rest=twilio_rest, gateway=gateway)


async def post_twilio(
    client: Any,
    path: str,
    params: Mapping[str, str],
    *,
    token: str = TWILIO_TOKEN,
    signature: str | None = None,
) -> Any:
    """POST a form exactly as Twilio would, signed over the public URL."""
    if signature is None:
        signature = sign(PUBLIC_BASE_URL + path, params, token)
    return await client.post(
        URL(path, encoded=True),
        data=encode_form(params),
        headers={"Content-Type": FORM, "X-Twilio-Signature": signature},
    )


async def admin(client: Any, method: str, path: str, body: Any = None) -> Any:
    return await client.request(
        method, path, json=body, headers={"Authorization": f"Bearer {ADMIN}"}
    )


async def agents(client: Any, path: str, body: Any) -> Any:
    return await client.post(path, json=body, headers={"Authorization": f"Bearer {AGENTS}"})


def recorded_rest(server: Any) -> TwilioRest:
    """meterd's Twilio REST adapter pointed at a RecordingTwilio (tests/recording_server.py),
    with the app's auth token and quick retries."""
    return TwilioRest(
        TwilioRestSettings(
            account_sid=ACCOUNT_SID,
            auth_token=TWILIO_TOKEN,
            api_base_url=server.base_url,
            retry_backoff_seconds=0.01,
        )
    )
