"""The simulator as a command: `python -m meterd.simulate` and `meterd simulate` (which gives
the daemon's settings as the defaults)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
from pathlib import Path
from typing import Any

from meterd.simulate.arguments import add_arguments
from meterd.simulate.run import simulate

EXIT_INTERRUPTED = 130


def run_parsed(args: argparse.Namespace, settings: Any = None) -> int:
    """Run with parsed options; `settings` (meterd.config.Settings, from `meterd simulate`)
    gives the defaults: address, public URL, tokens, settle delay, increment."""
    env = os.environ

    def setting(name: str, fallback: Any) -> Any:
        if settings is not None:
            with contextlib.suppress(AttributeError):
                return getattr(settings, name)
        return fallback

    def token(name: str, given: str | None) -> str:
        """Given (option or environment), else the file in --state-dir, else the settings'
        (credentials, generated file), else a file in the settings' state directory."""
        return (
            given
            or _token_file(args.state_dir, name)
            or (settings.secret(name) if settings is not None else None)
            or _token_file(settings.state_dir if settings is not None else None, name)
            or ""
        )

    url = _address(args, settings)
    settle_delay = args.settle_delay
    if settle_delay is None:
        settle_delay = int(
            setting("settle_delay_seconds", env.get("METERD_SETTLE_DELAY_SECONDS", 300))
        )
    increment = args.increment_seconds
    if increment is None:
        increment = int(setting("increment_seconds", env.get("METERD_INCREMENT_SECONDS", 60)))
    reasons = setting("waiver_reasons", None)
    return asyncio.run(
        simulate(
            url,
            calls=args.calls,
            cps=args.cps,
            agents_max=args.agents_max,
            duplicates=args.duplicates,
            reorder=args.reorder,
            time_scale=args.time_scale,
            twilio_auth_token=token("twilio_auth_token", args.twilio_auth_token),
            public_base_url=(
                args.public_base_url or (settings.public_base_url if settings else "") or url
            ),
            admin_token=token("admin_token", args.admin_token),
            agents_token=token("agents_token", args.agents_token),
            seed=args.seed if args.seed is not None else random.SystemRandom().randrange(10**9),
            progress=not args.no_progress,
            settle_delay=settle_delay,
            increment_seconds=increment,
            max_call_seconds=args.max_call_seconds,
            settle_timeout=args.settle_timeout,
            concurrency=args.concurrency,
            waiver_reason=args.waiver_reason or (reasons[0] if reasons else "software_defect"),
        )
    )


def _address(args: argparse.Namespace, settings: Any) -> str:
    """--url, else where the settings say the daemon listens (loopback for a wildcard)."""
    if args.url:
        return str(args.url)
    if settings is None:
        return "http://127.0.0.1:8080"
    host = (
        settings.listen_host
        if settings.listen_host not in ("0.0.0.0", "::", "")  # noqa: S104 - a comparison
        else "127.0.0.1"
    )
    return f"http://{host}:{settings.listen_port}"


def _token_file(state_dir: Path | None, name: str) -> str | None:
    if state_dir is None:
        return None
    path = state_dir / "secrets" / name
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m meterd.simulate",
        description="Drive a running meterd with signed simulated Twilio traffic and check "
        "every call's charges against the rules.",
    )
    add_arguments(parser)
    try:
        return run_parsed(parser.parse_args(argv))
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
