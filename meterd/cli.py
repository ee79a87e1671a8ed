"""The `meterd` command. Exit status: 0 ok, 1 failure (e.g. a ledger breach), 2 bad settings or
arguments."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from meterd.clock import system_clock
from meterd.config import ConfigError, Settings, load_settings
from meterd.logs import configure_logging

EXIT_FAILED = 1
EXIT_BAD_SETTINGS = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="meterd", description="Telephony call-metering daemon.")
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        help="TOML settings file (default: $METERD_CONFIG, else built-in defaults)",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    commands.add_parser("run", help="run the daemon")

    db = commands.add_parser("db", help="database maintenance").add_subparsers(
        dest="db_command", required=True
    )
    db.add_parser("upgrade", help="apply every pending migration")

    ledger = commands.add_parser("ledger", help="ledger tools").add_subparsers(
        dest="ledger_command", required=True
    )
    ledger.add_parser(
        "check", help="re-sum every balance and check every invariant; exit 1 on any breach"
    )

    account = commands.add_parser("account", help="manage accounts").add_subparsers(
        dest="account_command", required=True
    )
    add = account.add_parser("add", help="create an account")
    add.add_argument("account_id")
    add.add_argument("--name", required=True)
    add.add_argument(
        "--plan", required=True, choices=["service_agreement", "per_incident", "per_minute"]
    )
    add.add_argument("--fallback-plan", choices=["per_incident", "per_minute"])
    add.add_argument("--caller-id", action="append", default=[], help="E.164 number; repeatable")
    add.add_argument("--pin")
    add.add_argument("--currency")
    add.add_argument("--valid-until", help="service agreement end date, YYYY-MM-DD")
    add.add_argument(
        "--product",
        action="append",
        default=[],
        help="PRODUCT:KIND[:UNTIL], e.g. desktop:license:2027-06-30 (UMP end) or "
        "web:subscription; repeatable",
    )
    show = account.add_parser("show", help="show an account as JSON")
    show.add_argument("account_id")
    account.add_parser("list", help="list account ids")
    deposit = account.add_parser("deposit", help="money into the prepaid deposit")
    deposit.add_argument("account_id")
    deposit.add_argument("--amount-minor", type=int, required=True)
    deposit.add_argument(
        "--reference", required=True, help="names the payment; the same reference never posts twice"
    )
    grant = account.add_parser("grant-minutes", help="minutes into the bank")
    grant.add_argument("account_id")
    grant.add_argument("--minutes", type=int, required=True)
    grant.add_argument("--reference", required=True)
    return parser


def _product(text: str) -> dict[str, Any]:
    parts = text.split(":")
    if len(parts) not in (2, 3):
        raise argparse.ArgumentTypeError(f"--product {text!r}: expected PRODUCT:KIND[:UNTIL]")
    product: dict[str, Any] = {"product": parts[0], "kind": parts[1]}
    if len(parts) == 3:
        product["ump_until" if parts[1] == "license" else "active_until"] = parts[2]
    return product


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    config_path = args.config or (
        Path(os.environ["METERD_CONFIG"]) if os.environ.get("METERD_CONFIG") else None
    )
    try:
        settings = load_settings(config_path)
    except ConfigError as error:
        print(f"meterd: {error}", file=sys.stderr)
        return EXIT_BAD_SETTINGS
    configure_logging(settings.log_level)
    try:
        return asyncio.run(_dispatch(args, settings))
    except KeyboardInterrupt:
        return 130


async def _dispatch(args: argparse.Namespace, settings: Settings) -> int:
    if args.command == "run":
        from meterd.daemon import serve

        return await serve(settings)
    return await _with_database(settings, lambda database: _offline(args, settings, database))


async def _with_database(settings: Settings, work: Callable[[Any], Awaitable[int]]) -> int:
    from meterd.store.database import open_database

    database = await open_database(
        settings.database_url, busy_timeout_ms=settings.sqlite_busy_timeout_ms
    )
    try:
        return await work(database)
    finally:
        await database.close()


async def _offline(args: argparse.Namespace, settings: Settings, database: Any) -> int:
    from meterd.services.accounts import AccountService, AccountSettings
    from meterd.services.errors import ServiceError
    from meterd.services.ledger_check import check_ledger

    if args.command == "db":
        print("database is at the newest migration")
        return 0
    if args.command == "ledger":
        report = await check_ledger(database)
        print(
            f"checked {report.transactions} transactions, {report.postings} postings, "
            f"{report.books} books"
        )
        for breach in report.breaches:
            print(f"BREACH [{breach.invariant}] {breach.detail}")
        print("ledger OK" if report.ok else f"ledger BROKEN: {len(report.breaches)} breach(es)")
        return 0 if report.ok else EXIT_FAILED

    accounts = AccountService(
        database,
        AccountSettings(
            default_currency=settings.currency,
            included_minutes=settings.included_minutes,
            pin_secret=settings.secret("pin_secret"),
        ),
        system_clock,
    )
    try:
        result: Any
        if args.account_command == "add":
            body: dict[str, Any] = {
                "account_id": args.account_id,
                "name": args.name,
                "plan": args.plan,
                "caller_ids": args.caller_id,
                "products": [_product(p) for p in args.product],
            }
            for field in ("fallback_plan", "pin", "currency", "valid_until"):
                if getattr(args, field) is not None:
                    body[field] = getattr(args, field)
            result = await accounts.create(body)
        elif args.account_command == "show":
            result = await accounts.view(args.account_id)
        elif args.account_command == "list":
            result = await accounts.list_ids()
        elif args.account_command == "deposit":
            result = (
                await accounts.deposit(
                    args.account_id,
                    {"amount_minor": args.amount_minor, "reference": args.reference},
                )
            ).__dict__
        else:
            result = (
                await accounts.grant_minutes(
                    args.account_id, {"minutes": args.minutes, "reference": args.reference}
                )
            ).__dict__
    except (ServiceError, argparse.ArgumentTypeError) as error:
        print(f"meterd: {getattr(error, 'detail', error)}", file=sys.stderr)
        return EXIT_FAILED
    print(json.dumps(result, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
