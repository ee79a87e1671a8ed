"""Two OS processes against one database: each key posts exactly once, and concurrent
withdrawals never take a balance below zero. On PostgreSQL and on one SQLite file."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from sqlalchemy import func, select

from meterd.core import ledger
from meterd.services.ledger_check import check_ledger
from meterd.store import ledger_store
from meterd.store.schema import ledger_transactions

from .helpers import account_service, make_account

ROOT = Path(__file__).resolve().parents[2]


def _run_workers(url: str, account_id: str, modes: list[str], tmp_path: Path) -> list[dict]:
    go_file = tmp_path / "go"
    workers = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.integration.ledger_worker",
                url,
                account_id,
                mode,
                str(go_file),
            ],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for mode in modes
    ]
    go_file.touch()
    results = []
    for worker in workers:
        out, err = worker.communicate(timeout=240)
        assert worker.returncode == 0, err
        results.append(json.loads(out))
    return results


async def test_two_processes_posting_the_same_500_keys_post_each_once(
    database, database_url, tmp_path
):
    await make_account(database, "A1")
    await account_service(database).grant_minutes("A1", {"minutes": 1000, "reference": "stock"})

    first, second = _run_workers(database_url, "A1", ["same-keys", "same-keys"], tmp_path)

    assert first["posted"] + second["posted"] == 500
    assert first["replayed"] + second["replayed"] == 500
    async with database.read() as connection:
        assert await ledger_store.balance(connection, ledger.bank_book("A1")) == 45 + 1000 - 500
        minutes_posted = await connection.scalar(
            select(func.count())
            .select_from(ledger_transactions)
            .where(ledger_transactions.c.idempotency_key.like("call:CAshared:%"))
        )
    assert minutes_posted == 500
    assert (await check_ledger(database)).ok


async def test_concurrent_withdrawals_never_take_the_bank_below_zero(
    database, database_url, tmp_path
):
    await make_account(database, "A1")
    await account_service(database).grant_minutes("A1", {"minutes": 255, "reference": "stock"})

    first, second = _run_workers(database_url, "A1", ["withdraw-one", "withdraw-two"], tmp_path)

    assert first["posted"] + second["posted"] == 300  # 45 included + 255 granted
    assert first["insufficient"] + second["insufficient"] == 1000 - 300
    async with database.read() as connection:
        assert await ledger_store.balance(connection, ledger.bank_book("A1")) == 0
    assert (await check_ledger(database)).ok
