"""`meterd account show` and `GET /admin/accounts/{id}` agree on the plan in force near midnight
in the business time zone (issue 11: the CLI used to take the day in UTC).

A service agreement is valid until the end of `valid_until` in `business_timezone`. At 00:30 UTC
on 22 November it is still 21 November in New York (19:30 EST), so an agreement valid until
21 November is still in force there; in Tokyo it is already 22 November 09:30 at 00:30 UTC, and
15:30 UTC on the 21st is 00:30 on the 22nd, so one valid until the 21st has ended. The CLI runs as
its own process, from the environment like the daemon, with only its clock fixed.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from meterd.config import load_settings
from meterd.web.app import create_app

ROOT = Path(__file__).resolve().parents[2]
ADMIN = "admin-token-0123456789abcdef"

CASES = [
    # zone, instant (UTC), valid_until, the plan in force in that zone's day
    ("America/New_York", dt.datetime(2026, 11, 22, 0, 30, tzinfo=dt.UTC), "2026-11-21", "sa"),
    ("America/New_York", dt.datetime(2026, 11, 22, 4, 59, tzinfo=dt.UTC), "2026-11-21", "sa"),
    ("America/New_York", dt.datetime(2026, 11, 22, 5, 0, tzinfo=dt.UTC), "2026-11-21", "fb"),
    ("Asia/Tokyo", dt.datetime(2026, 11, 21, 15, 30, tzinfo=dt.UTC), "2026-11-21", "fb"),
]
PLAN = {"sa": "service_agreement", "fb": "per_incident"}


def _cli_at(instant: dt.datetime, args: list[str], env: dict[str, str]) -> dict:
    """`meterd ARGS` in a process of its own, its clock fixed at `instant`."""
    program = (
        "import datetime as dt, sys\n"
        "import meterd.cli\n"
        f"meterd.cli.system_clock = lambda: dt.datetime.fromisoformat({instant.isoformat()!r})\n"
        "sys.exit(meterd.cli.main(sys.argv[1:]))\n"
    )
    clean = {k: v for k, v in os.environ.items() if not k.startswith("METERD_")}
    result = subprocess.run(
        [sys.executable, "-c", program, *args],
        cwd=ROOT,
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout)


@pytest.mark.parametrize(("zone", "instant", "valid_until", "expected"), CASES)
async def test_cli_and_admin_api_agree_on_the_plan_in_force_near_midnight(
    aiohttp_client, database, database_url, tmp_path, zone, instant, valid_until, expected
):
    env = {
        "METERD_DATABASE_URL": database_url,
        "METERD_STATE_DIR": str(tmp_path),
        "METERD_BUSINESS_TIMEZONE": zone,
        "METERD_ADMIN_TOKEN": ADMIN,
        "METERD_AGENTS_TOKEN": "agents-token-0123456789abcdef",
        "METERD_FINANCE_TOKEN": "finance-token-0123456789abcdef",
        "METERD_PIN_SECRET": "pin-secret-0123456789abcdef",
    }
    client = await aiohttp_client(
        create_app(load_settings(None, env), database, clock=lambda: instant)
    )
    headers = {"Authorization": f"Bearer {ADMIN}"}
    body = {
        "account_id": "A1",
        "name": "Acme",
        "plan": "service_agreement",
        "fallback_plan": "per_incident",
        "valid_until": valid_until,
        "products": [{"product": "desktop", "kind": "license", "ump_until": valid_until}],
    }
    response = await client.post("/admin/accounts", json=body, headers=headers)
    assert response.status == 201, await response.text()
    api = await (await client.get("/admin/accounts/A1", headers=headers)).json()

    cli = _cli_at(instant, ["account", "show", "A1"], env)

    assert api["entitlements"]["phone"]["plan_in_force"] == PLAN[expected]
    assert cli == api  # the plan in force, the email/ticket entitlement, everything
