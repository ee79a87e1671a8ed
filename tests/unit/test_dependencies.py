"""What pyproject.toml promises about dependencies (issue 13): PostgreSQL's driver is an extra,
SQLite-only installs work without it and a PostgreSQL URL then names the extra; every
third-party package meterd imports is declared; the lowest-versions constraints match the lower
bounds (CI installs them and runs the unit tests)."""

from __future__ import annotations

import ast
import importlib.util
import re
import sys
import tomllib
from pathlib import Path

import pytest

from meterd.config import ConfigError, load_settings

ROOT = Path(__file__).resolve().parents[2]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
OPTIONAL = {"rich"}  # the simulator's progress bar and table when installed; never required
IMPORT_NAME_OF = {"prometheus-client": "prometheus_client", "sqlalchemy": "sqlalchemy"}


def _name(requirement: str) -> str:
    return re.split(r"[<>=\[;, ]", requirement, maxsplit=1)[0].lower()


def test_asyncpg_is_in_the_postgresql_extra_only():
    assert "asyncpg" not in {_name(r) for r in PROJECT["dependencies"]}
    assert {_name(r) for r in PROJECT["optional-dependencies"]["postgresql"]} == {"asyncpg"}


def test_a_postgresql_url_without_the_driver_names_the_extra(tmp_path, monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *args: None if name == "asyncpg" else find_spec(name, *args),
    )
    with pytest.raises(ConfigError, match=r"database_url.*meterd\[postgresql\]"):
        load_settings(
            None,
            {
                "METERD_STATE_DIR": str(tmp_path),
                "METERD_DATABASE_URL": "postgresql+asyncpg://meterd@db/meterd",
            },
        )


def test_every_third_party_package_meterd_imports_is_declared():
    declared = {
        IMPORT_NAME_OF.get(_name(r), _name(r))
        for r in PROJECT["dependencies"] + PROJECT["optional-dependencies"]["postgresql"]
    }
    imported = set()
    for path in (ROOT / "meterd").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                imported.add(node.module.split(".")[0])
    third_party = {
        name
        for name in imported
        if name not in sys.stdlib_module_names and name not in ("meterd", "__future__", *OPTIONAL)
    }
    assert third_party <= declared, third_party - declared


def test_the_lowest_versions_file_pins_every_lower_bound():
    pins = {}
    for line in (ROOT / ".ci" / "constraints-lowest.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            pins[name.lower()] = version
    for requirement in PROJECT["dependencies"] + PROJECT["optional-dependencies"]["postgresql"]:
        lower = re.search(r">=([0-9.]+)", requirement)
        assert lower, f"{requirement} has no lower bound"
        name = _name(requirement)
        assert pins.get(name, "").startswith(lower.group(1)), (name, pins.get(name))
