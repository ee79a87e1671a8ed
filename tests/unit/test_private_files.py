"""File modes (issue 12, finding 7): the SQLite file and the -wal and -shm files SQLite makes
beside it are 0600 whatever the umask; older files open to others are made 0600 with a warning;
a secrets directory open to others is made 0700 and its tokens 0600, and `Settings` says so (the
start logs it: tests/e2e/test_private_files.py), or the start is refused if it cannot be."""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import text
from structlog.testing import capture_logs

from meterd.config import ConfigError, load_settings
from meterd.store.database import Database

TOKEN = "a-token-written-by-hand-0123456789"


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@contextlib.contextmanager
def umask(value: int) -> Iterator[None]:
    previous = os.umask(value)
    try:
        yield
    finally:
        os.umask(previous)


async def test_the_sqlite_file_and_its_wal_and_shm_are_0600_under_a_loose_umask(tmp_path):
    path = tmp_path / "state" / "meterd.sqlite3"
    with umask(0o022):
        database = Database(f"sqlite+aiosqlite:///{path}")
        try:
            async with database.write() as connection:
                await connection.execute(text("CREATE TABLE t (x INTEGER)"))
                await connection.execute(text("INSERT INTO t VALUES (1)"))
            async with database.read() as connection:
                await connection.execute(text("SELECT * FROM t"))
            files = {p.name: mode(p) for p in path.parent.iterdir()}
        finally:
            await database.close()
    assert files == {
        "meterd.sqlite3": 0o600,
        "meterd.sqlite3-wal": 0o600,
        "meterd.sqlite3-shm": 0o600,
    }
    assert mode(path.parent) == 0o700  # made by meterd: private too


async def test_database_files_left_open_to_others_are_made_private_with_a_warning(tmp_path):
    path = tmp_path / "meterd.sqlite3"
    for name in ("meterd.sqlite3", "meterd.sqlite3-wal"):
        (tmp_path / name).touch()
        (tmp_path / name).chmod(0o644)
    with capture_logs() as logs:
        database = Database(f"sqlite+aiosqlite:///{path}")
        await database.close()
    assert mode(path) == 0o600 and mode(tmp_path / "meterd.sqlite3-wal") == 0o600
    assert [(entry["event"], entry["path"], entry["mode_was"]) for entry in logs] == [
        ("the database file was readable by others: made it private", str(path), "0644"),
        (
            "the database file was readable by others: made it private",
            str(tmp_path / "meterd.sqlite3-wal"),
            "0644",
        ),
    ]
    assert all(entry["log_level"] == "warning" for entry in logs)


def _loose_secrets(state: Path) -> Path:
    secrets = state / "secrets"
    secrets.mkdir(parents=True)
    secrets.chmod(0o755)
    token = secrets / "admin_token"
    token.write_text(TOKEN + "\n")
    token.chmod(0o644)
    return secrets


def test_a_secrets_directory_open_to_others_is_made_private_and_reported(tmp_path):
    secrets = _loose_secrets(tmp_path / "state")
    settings = load_settings(None, {"METERD_STATE_DIR": str(tmp_path / "state")})
    assert settings.secret("admin_token") == TOKEN  # the same token, kept
    assert mode(secrets) == 0o700
    assert {p.name: mode(p) for p in secrets.iterdir()} == {
        "admin_token": 0o600,
        "agents_token": 0o600,  # generated now
        "finance_token": 0o600,
        "pin_secret": 0o600,
    }
    assert settings.secret_modes_fixed == (
        (secrets, 0o755, 0o700),
        (secrets / "admin_token", 0o644, 0o600),
    )
    again = load_settings(None, {"METERD_STATE_DIR": str(tmp_path / "state")})
    assert again.secret_modes_fixed == ()  # private now: nothing more to say


def test_secrets_that_cannot_be_made_private_stop_the_start(tmp_path, monkeypatch):
    secrets = _loose_secrets(tmp_path / "state")

    def refuse(self: Path, mode: int) -> None:
        raise PermissionError(1, "Operation not permitted", str(self))

    monkeypatch.setattr(Path, "chmod", refuse)
    with pytest.raises(ConfigError, match=r"secrets is mode 0755, open to others, and cannot"):
        load_settings(None, {"METERD_STATE_DIR": str(tmp_path / "state")})
    assert mode(secrets) == 0o755


def test_secrets_from_the_environment_leave_the_state_directory_alone(tmp_path):
    secrets = _loose_secrets(tmp_path / "state")
    settings = load_settings(
        None,
        {
            "METERD_STATE_DIR": str(tmp_path / "state"),
            "METERD_ADMIN_TOKEN": TOKEN,
            "METERD_AGENTS_TOKEN": TOKEN,
            "METERD_FINANCE_TOKEN": TOKEN,
            "METERD_PIN_SECRET": TOKEN,
        },
    )
    assert settings.secret_modes_fixed == () and mode(secrets) == 0o755  # not read: not touched
