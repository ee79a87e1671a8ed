"""The simulator's command-line options, shared by `python -m meterd.simulate` and `meterd
simulate` (light: building meterd's parser imports only this module of the simulator)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The simulator's options (also used by `meterd simulate`)."""
    parser.add_argument(
        "--url",
        default=None,
        help="meterd's address (default: from settings, else http://127.0.0.1:8080)",
    )
    _add_scenario_arguments(parser)
    _add_daemon_arguments(parser)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_scenario_arguments(parser: argparse.ArgumentParser) -> None:
    """The calls: how many, how fast, how messy, which seed."""
    parser.add_argument("--calls", type=int, default=200, help="how many calls (default 200)")
    parser.add_argument("--cps", type=float, default=20.0, help="new calls per second (default 20)")
    parser.add_argument("--agents-max", type=int, default=3, help="agents per call, 1 to N (3)")
    parser.add_argument("--duplicates", action="store_true", help="deliver some requests twice")
    parser.add_argument("--reorder", action="store_true", help="shuffle each call's callbacks")
    parser.add_argument(
        "--time-scale",
        type=float,
        default=0.0,
        help="wall seconds per call second: 0 = synthetic timestamps in the recent past, no "
        "waiting (default); 1 = real time",
    )
    parser.add_argument("--seed", type=int, default=None, help="scenario seed (default: random)")
    parser.add_argument("--max-call-seconds", type=int, default=900, help="longest call (900)")


def _add_daemon_arguments(parser: argparse.ArgumentParser) -> None:
    """The daemon under test: its settings the expectation depends on, its tokens, its URL."""
    env = os.environ
    parser.add_argument(
        "--settle-delay",
        type=int,
        default=None,
        help="meterd's settle_delay_seconds (default: settings, else "
        "$METERD_SETTLE_DELAY_SECONDS, else 300); calls are placed this far in the past",
    )
    parser.add_argument(
        "--increment-seconds",
        type=int,
        default=None,
        help="meterd's "
        "increment_seconds (default: settings, else $METERD_INCREMENT_SECONDS, else 60)",
    )
    parser.add_argument(
        "--settle-timeout",
        type=float,
        default=None,
        help="seconds to wait for "
        "settlement after the last call was placed (default: settle delay + 120)",
    )
    parser.add_argument("--concurrency", type=int, default=64, help="requests in flight (64)")
    parser.add_argument(
        "--waiver-reason",
        default=None,
        help="a reason meterd accepts (default: the first of waiver_reasons, else software_defect)",
    )
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help="the daemon's state directory: tokens not given are read from DIR/secrets/<name> "
        "(default: the state_dir setting under `meterd simulate`)",
    )
    for name, use in (
        ("twilio_auth_token", "signs the webhooks, as the daemon's"),
        ("admin_token", "for /admin/*"),
        ("agents_token", "for /agents/*"),
    ):
        variable = f"METERD_{name.upper()}"
        parser.add_argument(
            "--" + name.replace("_", "-"),
            default=env.get(variable),
            metavar="TOKEN",
            help=f"{use} (default: ${variable}, else DIR/secrets/{name})",
        )
    parser.add_argument(
        "--public-base-url",
        default=env.get("METERD_PUBLIC_BASE_URL"),
        metavar="URL",
        help="the URL the daemon checks signatures against (default: "
        "$METERD_PUBLIC_BASE_URL, else the public_base_url setting, else --url)",
    )
