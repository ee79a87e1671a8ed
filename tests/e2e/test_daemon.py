"""The real `meterd run` process: starts on defaults, keeps data, refuses bad settings."""

from __future__ import annotations

import asyncio
import random
import signal

import aiohttp
import pytest

from .daemon import ADMIN_TOKEN, Daemon, run_cli

LICENCE = [{"product": "desktop", "kind": "license"}]


def test_starts_with_no_config_file_and_answers_healthz(tmp_path):
    daemon = Daemon(tmp_path)
    del daemon.env["METERD_ADMIN_TOKEN"]  # nothing set but the port: pure defaults
    daemon.start()
    try:
        assert daemon.request("GET", "/healthz") == (200, {"status": "ok"})
        assert (tmp_path / "var" / "meterd.sqlite3").exists()
        generated = tmp_path / "var" / "secrets" / "admin_token"
        assert generated.exists() and str(generated) in daemon.log()
        assert generated.read_text().strip() not in daemon.log()
    finally:
        assert daemon.stop() == 0


def test_accounts_and_money_survive_a_restart(tmp_path):
    daemon = Daemon(tmp_path).start()
    status, _ = daemon.admin(
        "POST",
        "/admin/accounts",
        {"account_id": "A1", "name": "Acme", "plan": "per_minute", "products": LICENCE},
    )
    assert status == 201
    assert (
        daemon.admin(
            "POST", "/admin/accounts/A1/deposits", {"amount_minor": 1234, "reference": "wire-1"}
        )[0]
        == 201
    )
    assert daemon.stop() == 0

    daemon = Daemon(tmp_path).start()
    try:
        status, view = daemon.admin("GET", "/admin/accounts/A1")
        assert status == 200
        assert (view["bank_minutes"], view["deposit_minor"]) == (45, 1234)
        assert (
            daemon.admin(
                "POST", "/admin/accounts/A1/deposits", {"amount_minor": 1234, "reference": "wire-1"}
            )[0]
            == 200
        )
    finally:
        assert daemon.stop(signal.SIGINT) == 0


@pytest.mark.parametrize(
    ("env", "config", "says"),
    [
        ({"METERD_LISTEN": "not-an-address"}, None, "listen (METERD_LISTEN)"),
        ({"METERD_RATE_PER_AGENT_MINUTE_MINOR": "1.00"}, None, "rate_per_agent_minute_minor"),
        ({}, "[billing]\nincrement_seconds = -5\n", "increment_seconds"),
        ({}, "[server]\nadmin_token = 'in-a-file-0123456789'\n", "admin_token is a secret"),
        ({"METERD_CONFIG": "/nonexistent/meterd.toml"}, None, "does not exist"),
    ],
)
def test_a_bad_setting_stops_start_up_with_status_2_naming_it(tmp_path, env, config, says):
    args = []
    if config is not None:
        (tmp_path / "meterd.toml").write_text(config)
        args = ["--config", str(tmp_path / "meterd.toml")]
    result = run_cli([*args, "run"], env, tmp_path)
    assert result.returncode == 2
    assert says in result.stderr
    assert not (tmp_path / "var" / "meterd.sqlite3").exists()


async def _deposit(session: aiohttp.ClientSession, base_url: str, reference: str) -> int | None:
    try:
        async with session.post(
            f"{base_url}/admin/accounts/A1/deposits",
            json={"amount_minor": 100, "reference": reference},
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
        ) as response:
            await response.read()
            return response.status
    except (aiohttp.ClientError, OSError):
        return None  # the daemon died under this request


async def _deposits_then_kill(
    daemon: Daemon, references: list[str], delay: float
) -> list[int | None]:
    async with aiohttp.ClientSession() as session:
        tasks = [asyncio.create_task(_deposit(session, daemon.base_url, r)) for r in references]
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        await asyncio.sleep(delay)
        daemon.kill()
        return await asyncio.gather(*tasks)


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
async def test_kill_9_during_deposits_leaves_nothing_half_written(tmp_path, backend, request):
    env = {}
    if backend == "postgresql":
        env["METERD_DATABASE_URL"] = request.getfixturevalue("fresh_postgres_url")
    daemon = Daemon(tmp_path, env=env).start()
    assert (
        daemon.admin(
            "POST", "/admin/accounts", {"account_id": "A1", "name": "Acme", "plan": "per_minute"}
        )[0]
        == 201
    )
    rng = random.Random(7)
    before_kill: dict[str, int | None] = {}
    for round_number in range(4):
        batch = [f"r{round_number}-{i}" for i in range(60)]
        statuses = await _deposits_then_kill(daemon, batch, rng.uniform(0.0, 0.03))
        before_kill.update(zip(batch, statuses, strict=True))
        check = run_cli(["ledger", "check"], daemon.env, tmp_path)
        assert check.returncode == 0, check.stdout + check.stderr
        daemon = Daemon(tmp_path, env=env).start()

    outcomes = set(before_kill.values())
    assert 201 in outcomes and None in outcomes  # the kills did land mid-stream

    # A client retries every deposit: each posts exactly once, and every deposit confirmed
    # before a kill is still there (the retry is answered as a replay, 200).
    references = list(before_kill)
    async with aiohttp.ClientSession() as session:
        statuses = await asyncio.gather(
            *(_deposit(session, daemon.base_url, r) for r in references)
        )
    after = dict(zip(references, statuses, strict=True))
    assert set(statuses) <= {200, 201}
    assert all(after[r] == 200 for r, status in before_kill.items() if status == 201)
    _, view = daemon.admin("GET", "/admin/accounts/A1")
    assert view["deposit_minor"] == 100 * len(references)
    assert daemon.stop() == 0
    check = run_cli(["ledger", "check"], daemon.env, tmp_path)
    assert check.returncode == 0 and "ledger OK" in check.stdout
