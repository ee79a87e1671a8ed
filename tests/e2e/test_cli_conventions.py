"""The `meterd` command's conventions (issue 13): --version, --config before or after the
command, a description on every command and help on every option, the exit statuses in
`meterd --help`, and a bad setting stopping `meterd run` with exit status 2, naming the
setting, before anything is written."""

from __future__ import annotations

import argparse
import re
from importlib.metadata import version

import pytest

from meterd import daemon
from meterd.cli import EXIT_BAD_SETTINGS, _parser

from .daemon import free_port, run_cli


def _commands(parser: argparse.ArgumentParser, path: str = "meterd"):
    """Every command and sub-command parser, with its full name."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield f"{path} {name}", sub
                yield from _commands(sub, f"{path} {name}")


def test_version_is_the_package_version(tmp_path):
    result = run_cli(["--version"], {}, tmp_path)
    assert result.returncode == 0
    assert result.stdout.strip() == f"meterd {version('meterd')}"


def test_help_lists_the_exit_statuses(tmp_path):
    result = run_cli(["--help"], {}, tmp_path)
    assert result.returncode == 0
    epilog = result.stdout.split("exit status:", 1)[1]
    statuses = {int(n) for n in re.findall(r"^\s+(\d+)\s", epilog, re.MULTILINE)}
    assert statuses == {
        daemon.EXIT_OK,
        daemon.EXIT_STARTUP_FAILED,
        EXIT_BAD_SETTINGS,
        daemon.EXIT_INVARIANT_BROKEN,
        130,
    }
    assert re.search(r"^\s+2\s+bad settings", epilog, re.MULTILINE)
    assert re.search(r"^\s+3\s+`run` stopped because a money invariant broke", epilog, re.M)


def test_every_command_has_a_description_and_every_option_help():
    commands = list(_commands(_parser()))
    assert {"meterd run", "meterd demo", "meterd simulate", "meterd account add"} <= {
        name for name, _ in commands
    }
    for name, parser in [("meterd", _parser()), *commands]:
        assert parser.description, f"{name} has no description"
        for action in parser._actions:
            if not isinstance(action, argparse._SubParsersAction):
                assert action.help, f"{name} {'/'.join(action.option_strings) or action.dest}"
        assert any("--config" in a.option_strings for a in parser._actions), name


def test_config_is_read_before_or_after_the_command(tmp_path):
    config = tmp_path / "meterd.toml"
    config.write_text(f'[storage]\nstate_dir = "{tmp_path / "state"}"\n')
    after = run_cli(["ledger", "check", "--config", str(config)], {}, tmp_path)
    assert after.returncode == 0, after.stderr
    assert "ledger OK" in after.stdout
    assert (tmp_path / "state" / "meterd.sqlite3").exists()
    before = run_cli(["--config", str(config), "account", "list"], {}, tmp_path)
    assert before.returncode == 0, before.stderr
    # given twice, the one after the command stands
    missing = tmp_path / "missing.toml"
    both = run_cli(
        ["--config", str(config), "account", "list", "--config", str(missing)], {}, tmp_path
    )
    assert both.returncode == EXIT_BAD_SETTINGS
    assert "missing.toml does not exist" in both.stderr
    assert not (tmp_path / "var").exists()


BAD_SETTINGS = [
    ("usage_cron", "schedule", "99 * * * *"),
    ("usage_cron", "schedule", "0 0 31 2 *"),  # never fires
    ("currency", "billing", "usd"),
    ("currency", "billing", "XYZ1"),
    ("business_timezone", "schedule", "Mars/Olympus"),
]


@pytest.mark.parametrize("where", ["environment", "file after the command"])
@pytest.mark.parametrize(("name", "section", "value"), BAD_SETTINGS)
def test_a_bad_setting_stops_the_start_with_2_before_anything_is_written(
    tmp_path, where, name, section, value
):
    state = tmp_path / "state"
    env = {"METERD_STATE_DIR": str(state), "METERD_LISTEN": f"127.0.0.1:{free_port()}"}
    args = ["run"]
    if where == "environment":
        env[f"METERD_{name.upper()}"] = value
    else:
        config = tmp_path / "meterd.toml"
        config.write_text(f'[{section}]\n{name} = "{value}"\n')
        args += ["--config", str(config)]
    result = run_cli(args, env, tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == EXIT_BAD_SETTINGS, output
    assert f"bad setting {name}" in output
    assert "Traceback" not in output
    assert not state.exists(), sorted(state.rglob("*"))
    assert sorted(p.name for p in tmp_path.iterdir()) in ([], ["meterd.toml"])


def test_a_bad_secret_stops_the_start_before_any_token_is_generated(tmp_path):
    state = tmp_path / "state"
    env = {
        "METERD_STATE_DIR": str(state),
        "METERD_LISTEN": f"127.0.0.1:{free_port()}",
        "METERD_TWILIO_AUTH_TOKEN": "too short",
    }
    result = run_cli(["run"], env, tmp_path)
    assert result.returncode == EXIT_BAD_SETTINGS
    assert "bad setting twilio_auth_token (METERD_TWILIO_AUTH_TOKEN)" in result.stderr
    assert not state.exists(), sorted(state.rglob("*"))
