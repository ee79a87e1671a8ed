"""Accounts: create, change, read; money into the deposit and minutes into the bank.

Every change to an account happens in one database transaction together with its ledger
postings (a new account's books, the included minutes of its first main product), so a crash
leaves either all of it or none of it.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, TypeVar
from zoneinfo import ZoneInfo

from meterd.clock import Clock
from meterd.config import Settings
from meterd.core import ledger
from meterd.core.entitlements import email_ticket_eligibility
from meterd.core.ledger import MINUTES, MINUTES_MAX, BookKind
from meterd.core.money import MONEY_MINOR_MAX, MoneyError, check_currency
from meterd.core.plans import (
    PRODUCT_NAME,
    Plan,
    Product,
    ProductKind,
    brings_included_minutes,
    effective_plan,
)
from meterd.services import validation as v
from meterd.services.errors import Conflict, InvalidRequest, NotFound
from meterd.store import accounts_store, ledger_store
from meterd.store.accounts_store import AccountConflict, Clash
from meterd.store.database import Database
from meterd.store.transaction import Transaction

ACCOUNT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
E164 = re.compile(r"^\+[1-9][0-9]{1,14}$")
PIN = re.compile(r"^[0-9]{4,8}$")
CURRENCY = re.compile(r"^[A-Z]{3}$")
CALLER_IDS_MAX = 50
PRODUCTS_MAX = 50

CREATE_FIELDS = {
    "account_id",
    "name",
    "plan",
    "fallback_plan",
    "caller_ids",
    "pin",
    "currency",
    "products",
    "valid_until",
}
ALERT_FIELDS = {
    "alert_bank_minutes_below": 1_000_000,
    "alert_deposit_minor_below": 10**12,
    "auto_top_up_below_minutes": 1_000_000,
}
PATCH_FIELDS = {"name", "plan", "fallback_plan", "caller_ids", "pin", "products", "valid_until"}
PATCH_FIELDS |= set(ALERT_FIELDS)


@dataclass(frozen=True)
class AccountSettings:
    default_currency: str
    included_minutes: int
    pin_secret: str
    business_timezone: str = "UTC"  # whose calendar day `valid_until` and `*_until` end on

    @classmethod
    def of(cls, settings: Settings) -> AccountSettings:
        """From the daemon's settings: the API and the CLI both build theirs here, so they
        agree on the business day (and so on the plan in force near midnight)."""
        return cls(
            default_currency=settings.currency,
            included_minutes=settings.included_minutes,
            pin_secret=settings.secret("pin_secret"),
            business_timezone=settings.business_timezone,
        )


@dataclass(frozen=True)
class NewAccount:
    """An account to create, as checked from the request."""

    account_id: str
    name: str
    plan: Plan
    fallback_plan: Plan
    currency: str
    caller_ids: list[str]
    pin: str | None
    products: tuple[Product, ...]
    valid_until: dt.date | None


@dataclass(frozen=True)
class MoneyIn:
    account_id: str
    transaction_id: int
    replayed: bool
    amount: int
    unit: str
    balance: int


def pin_hash(pin_secret: str, pin: str) -> str:
    """PINs are stored as a keyed hash: findable by the PIN alone, never readable back."""
    return hmac.new(pin_secret.encode(), pin.encode(), hashlib.sha256).hexdigest()


_Choice = TypeVar("_Choice", bound=StrEnum)


def _member(choices: type[_Choice], value: object) -> _Choice:
    """The member of `choices` whose value is `value`; ValueError for anything else (a missing
    field's None, a number, ...), as the enum itself raises."""
    if not isinstance(value, str):
        raise ValueError(f"{value!r} is not a valid {choices.__name__}")
    return choices(value)


def _plan(body: Mapping[str, Any], field: str, default: Plan | None = None) -> Plan:
    value = body.get(field)
    if value is None and default is not None:
        return default
    try:
        return _member(Plan, value)
    except ValueError:
        raise InvalidRequest(f"{field} must be one of {', '.join(p.value for p in Plan)}") from None


def _caller_ids(body: Mapping[str, Any]) -> list[str]:
    value = body.get("caller_ids", [])
    if not isinstance(value, list) or len(value) > CALLER_IDS_MAX:
        raise InvalidRequest(f"caller_ids must be a list of at most {CALLER_IDS_MAX} numbers")
    for number in value:
        if not isinstance(number, str) or not E164.fullmatch(number):
            raise InvalidRequest(
                f"caller_ids: {number!r} is not an E.164 number like +14155550100"[:200]
            )
    return sorted(set(value))


def _products(body: Mapping[str, Any]) -> tuple[Product, ...]:
    value = body.get("products", [])
    if not isinstance(value, list) or len(value) > PRODUCTS_MAX:
        raise InvalidRequest(f"products must be a list of at most {PRODUCTS_MAX} products")
    products = []
    for item in value:
        item = v.require_object(item)
        v.only_fields(item, {"product", "kind", "active_until", "ump_until"})
        name = v.required_text(item, "product", pattern=PRODUCT_NAME, max_chars=40)
        try:
            kind = _member(ProductKind, item.get("kind"))
        except ValueError:
            raise InvalidRequest("products: kind must be license or subscription") from None
        products.append(
            Product(name, kind, v.iso_date(item, "active_until"), v.iso_date(item, "ump_until"))
        )
    return tuple(products)


def _products_json(products: tuple[Product, ...]) -> str:
    return json.dumps(
        [
            {
                "product": p.product,
                "kind": p.kind.value,
                "active_until": p.active_until and p.active_until.isoformat(),
                "ump_until": p.ump_until and p.ump_until.isoformat(),
            }
            for p in products
        ],
        sort_keys=True,
    )


def products_from_json(raw: str) -> tuple[Product, ...]:
    return tuple(
        Product(
            item["product"],
            ProductKind(item["kind"]),
            item["active_until"] and dt.date.fromisoformat(item["active_until"]),
            item["ump_until"] and dt.date.fromisoformat(item["ump_until"]),
        )
        for item in json.loads(raw)
    )


def _alert_thresholds(body: Mapping[str, Any]) -> dict[str, int | None]:
    """The account's own low-balance alert thresholds and auto top-up threshold given (null:
    the settings' default; for auto top-up, off)."""
    values: dict[str, int | None] = {}
    for field, maximum in ALERT_FIELDS.items():
        if field in body:
            value = body[field]
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= maximum
            ):
                raise InvalidRequest(f"{field} must be null or a whole number from 0 to {maximum}")
            values[field] = value
    return values


def _pin(body: Mapping[str, Any]) -> str | None:
    value = body.get("pin")
    if value is None:
        return None
    if not isinstance(value, str) or not PIN.fullmatch(value):
        raise InvalidRequest("pin must be 4 to 8 digits, as text")
    return value


class AccountService:
    def __init__(self, database: Database, settings: AccountSettings, clock: Clock) -> None:
        self._database = database
        self._settings = settings
        self._clock = clock

    async def create(self, body: Any) -> dict[str, Any]:
        account = _new_account(body, self._settings.default_currency)
        now = self._clock()
        try:
            async with self._database.write() as connection:
                if await accounts_store.account_exists(connection, account.account_id):
                    raise Conflict(
                        f"account {account.account_id} already exists; change it with PATCH"
                    )
                await self._insert_account(connection, account, now)
                await _open_books(connection, account.account_id, account.currency)
                await self._grant_included_minutes(
                    connection, account.account_id, account.products, now
                )
        except AccountConflict as error:
            raise _conflict(error) from None
        return await self.view(account.account_id)

    async def change(self, account_id: str, body: Any) -> dict[str, Any]:
        body = v.require_object(body)
        if "currency" in body or "account_id" in body:
            raise InvalidRequest("account_id and currency cannot be changed")
        v.only_fields(body, PATCH_FIELDS)
        if not body:
            raise InvalidRequest("nothing to change")
        values: dict[str, Any] = {}
        if "name" in body:
            values["name"] = v.required_text(body, "name", max_chars=200)
        if "plan" in body:
            values["plan"] = _plan(body, "plan").value
        if "fallback_plan" in body:
            fallback = _plan(body, "fallback_plan")
            if fallback is Plan.SERVICE_AGREEMENT:
                raise InvalidRequest("fallback_plan cannot be service_agreement")
            values["fallback_plan"] = fallback.value
        if "valid_until" in body:
            values["valid_until"] = v.iso_date(body, "valid_until")
        if "pin" in body:
            pin = _pin(body)
            values["pin_hash"] = pin and pin_hash(self._settings.pin_secret, pin)
        products = _products(body) if "products" in body else None
        if products is not None:
            values["products_json"] = _products_json(products)
        thresholds = _alert_thresholds(body)
        numbers = _caller_ids(body) if "caller_ids" in body else None
        now = self._clock()
        values["updated_at"] = now
        try:
            async with self._database.write() as connection:
                if not await accounts_store.update_account(connection, account_id, **values):
                    raise NotFound(f"no account {account_id}")
                if numbers is not None:
                    await accounts_store.replace_caller_ids(connection, account_id, numbers)
                if thresholds:
                    await accounts_store.set_thresholds(connection, account_id, thresholds)
                if products is not None:
                    await self._grant_included_minutes(connection, account_id, products, now)
        except AccountConflict as error:
            raise _conflict(error) from None
        return await self.view(account_id)

    async def view(self, account_id: str) -> dict[str, Any]:
        today = self._clock().astimezone(ZoneInfo(self._settings.business_timezone)).date()
        async with self._database.read() as connection:
            row = await accounts_store.get_account(connection, account_id)
            if row is None:
                raise NotFound(f"no account {account_id}")
            numbers = await accounts_store.account_caller_ids(connection, account_id)
            thresholds = await accounts_store.thresholds(connection, account_id)
            held = await ledger_store.balances(
                connection, [ledger.bank_book(account_id), ledger.deposit_book(account_id)]
            )
        plan, fallback = Plan(row.plan), Plan(row.fallback_plan)
        products = products_from_json(row.products_json)
        eligibility = email_ticket_eligibility(products, plan, row.valid_until, today)
        governing = effective_plan(plan, row.valid_until, fallback, today)
        return {
            "account_id": row.account_id,
            "name": row.name,
            "plan": plan.value,
            "fallback_plan": fallback.value,
            "valid_until": row.valid_until and row.valid_until.isoformat(),
            "caller_ids": numbers,
            "pin_set": row.pin_hash is not None,
            "currency": row.currency,
            "bank_minutes": held[ledger.bank_book(account_id)],
            "deposit_minor": held[ledger.deposit_book(account_id)],
            "card_on_file": row.card_on_file is not None,
            "debt_flagged": bool(row.debt_flagged),
            **thresholds,
            "products": json.loads(row.products_json),
            "entitlements": {
                "phone": {
                    "eligible": True,
                    "plan_in_force": governing.value,
                    "reason": _phone_reason(plan, governing),
                },
                "email_ticket": {
                    "eligible": eligibility.eligible,
                    "covers": list(eligibility.covers),
                    "reason": eligibility.reason,
                },
            },
            "created_at": row.created_at.isoformat(),
            "updated_at": row.updated_at.isoformat(),
        }

    async def list_ids(self) -> list[str]:
        async with self._database.read() as connection:
            return await accounts_store.account_ids(connection)

    async def deposit(self, account_id: str, body: Any) -> MoneyIn:
        body = v.require_object(body)
        v.only_fields(body, {"amount_minor", "reference"})
        amount_minor = v.positive_int(body, "amount_minor", maximum=MONEY_MINOR_MAX)
        reference = v.reference(body)
        currency = await self._currency(account_id)
        return await self._money_in(
            account_id,
            ledger.deposit(account_id, currency, amount_minor, reference),
            ledger.deposit_book(account_id),
            amount_minor,
            currency,
        )

    async def grant_minutes(self, account_id: str, body: Any) -> MoneyIn:
        body = v.require_object(body)
        v.only_fields(body, {"minutes", "reference"})
        minutes = v.positive_int(body, "minutes", maximum=MINUTES_MAX)
        reference = v.reference(body)
        await self._currency(account_id)
        return await self._money_in(
            account_id,
            ledger.grant_minutes(account_id, minutes, reference),
            ledger.bank_book(account_id),
            minutes,
            MINUTES,
        )

    async def _money_in(
        self, account_id: str, transaction: ledger.Transaction, book: str, amount: int, unit: str
    ) -> MoneyIn:
        try:
            async with self._database.write() as connection:
                result = await ledger_store.post(connection, transaction, self._clock())
                held = await ledger_store.balance(connection, book)
        except ledger_store.IdempotencyConflict:
            raise Conflict(
                f"reference {transaction.memo!r} was already used with a different "
                f"amount; use a new reference"
            ) from None
        return MoneyIn(account_id, result.transaction_id, result.replayed, amount, unit, held)

    async def _currency(self, account_id: str) -> str:
        async with self._database.read() as connection:
            currency = await accounts_store.account_currency(connection, account_id)
        if currency is None:
            raise NotFound(f"no account {account_id}")
        return currency

    async def _insert_account(
        self, connection: Transaction, account: NewAccount, now: dt.datetime
    ) -> None:
        await accounts_store.insert_account(
            connection,
            account_id=account.account_id,
            name=account.name,
            plan=account.plan.value,
            fallback_plan=account.fallback_plan.value,
            valid_until=account.valid_until,
            currency=account.currency,
            pin_hash=account.pin and pin_hash(self._settings.pin_secret, account.pin),
            products_json=_products_json(account.products),
            now=now,
        )
        await accounts_store.add_caller_ids(connection, account.account_id, account.caller_ids)

    async def _grant_included_minutes(
        self,
        connection: Transaction,
        account_id: str,
        products: tuple[Product, ...],
        now: dt.datetime,
    ) -> None:
        """Once per account, ever: if the included minutes were granted before (perhaps when
        `included_minutes` was configured differently), nothing more is granted."""
        if not brings_included_minutes(products) or self._settings.included_minutes <= 0:
            return
        grant = ledger.included_minutes(account_id, self._settings.included_minutes)
        if await ledger_store.load_transaction(connection, grant.key) is None:
            await ledger_store.post(connection, grant, now)


def _new_account(body: Any, default_currency: str) -> NewAccount:
    """The account a create request asks for, every field checked (in the order the errors
    are reported)."""
    body = v.require_object(body)
    v.only_fields(body, CREATE_FIELDS)
    account_id = v.required_text(body, "account_id", pattern=ACCOUNT_ID, max_chars=64)
    name = v.required_text(body, "name", max_chars=200)
    plan = _plan(body, "plan")
    fallback_plan = _plan(body, "fallback_plan", default=Plan.PER_MINUTE)
    if fallback_plan is Plan.SERVICE_AGREEMENT:
        raise InvalidRequest("fallback_plan cannot be service_agreement")
    return NewAccount(
        account_id=account_id,
        name=name,
        plan=plan,
        fallback_plan=fallback_plan,
        currency=_checked_currency(body, default_currency),
        caller_ids=_caller_ids(body),
        pin=_pin(body),
        products=_products(body),
        valid_until=v.iso_date(body, "valid_until"),
    )


def _checked_currency(body: Mapping[str, Any], default: str) -> str:
    currency = v.text(
        body, "currency", pattern=CURRENCY, max_chars=3, required=False, default=default
    )
    if currency is None:
        raise InvalidRequest("currency is required")
    try:
        check_currency(currency)
    except MoneyError:
        raise InvalidRequest(
            f"currency {currency!r} is not an ISO 4217 currency with minor units, e.g. USD"
        ) from None
    return currency


async def _open_books(connection: Transaction, account_id: str, currency: str) -> None:
    """The account's bank and deposit, and its currency's system books (so that no call's
    first posting has to insert, and wait on, a system book)."""
    await ledger_store.create_book(
        connection,
        ledger.bank_book(account_id),
        unit=MINUTES,
        kind=BookKind.BANK,
        account_id=account_id,
        allow_negative=False,
    )
    await ledger_store.create_book(
        connection,
        ledger.deposit_book(account_id),
        unit=currency,
        kind=BookKind.DEPOSIT,
        account_id=account_id,
        allow_negative=False,
    )
    await ledger_store.open_system_books(connection, ledger_store.system_books(currency))


def _conflict(error: AccountConflict) -> Conflict:
    if error.clash is Clash.ACCOUNT_ID:
        return Conflict("that account already exists; change it with PATCH")
    if error.clash is Clash.PIN:
        return Conflict("that PIN is already used by another account; choose another")
    return Conflict(f"the change conflicts with existing data: {error.detail}"[:300])


def _phone_reason(plan: Plan, governing: Plan) -> str:
    if plan is not governing:
        return f"service agreement ended; calls are billed as {governing.value}"
    return {
        Plan.SERVICE_AGREEMENT: "service agreement in force; calls metered at zero price",
        Plan.PER_INCIDENT: "per incident; charged at completion",
        Plan.PER_MINUTE: "per minute; needs banked minutes, a deposit or a card before connecting",
    }[governing]
