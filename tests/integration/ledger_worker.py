"""A separate OS process that posts ledger transactions, for the concurrency tests.

    python -m tests.integration.ledger_worker URL ACCOUNT_ID MODE GO_FILE

MODE `same-keys`: post minutes 1..500 of one call (keys shared with the other worker).
MODE `withdraw-<name>`: post 500 one-minute withdrawals under keys of its own.
Waits for GO_FILE to exist, so both workers start together; prints a JSON summary.
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
from pathlib import Path

from meterd.logs import configure_logging
from meterd.store import ledger_store
from meterd.store.database import open_database

from .helpers import NOW, use_minutes

KEYS = 500
TASKS = 8


async def main(url: str, account_id: str, mode: str, go_file: Path) -> None:
    database = await open_database(url, busy_timeout_ms=30_000, upgrade=False)
    if mode == "same-keys":
        keys = [f"call:CAshared:agent:a:minute:{n}" for n in range(1, KEYS + 1)]
    else:
        keys = [f"call:CA{mode}:agent:a:minute:{n}" for n in range(1, KEYS + 1)]
    random.shuffle(keys)
    queue: asyncio.Queue[str] = asyncio.Queue()
    for key in keys:
        queue.put_nowait(key)
    counts = {"posted": 0, "replayed": 0, "insufficient": 0}

    async def worker() -> None:
        while not queue.empty():
            key = queue.get_nowait()
            try:
                async with database.write() as connection:
                    result = await ledger_store.post(
                        connection, use_minutes(account_id, 1, key), NOW
                    )
                counts["replayed" if result.replayed else "posted"] += 1
            except ledger_store.InsufficientBalance:
                counts["insufficient"] += 1

    while not go_file.exists():  # noqa: ASYNC110, ASYNC240 - a file from another process
        await asyncio.sleep(0.005)
    await asyncio.gather(*(worker() for _ in range(TASKS)))
    await database.close()
    print(json.dumps(counts))


if __name__ == "__main__":
    configure_logging("warning", stream=sys.stderr)  # stdout carries the result (JSON)
    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], Path(sys.argv[4])))
