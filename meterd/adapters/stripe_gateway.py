"""The card gateway: a small interface, and its one implementation on the `stripe` SDK.

Every operation carries meterd's own deterministic key (e.g. `call:<sid>:block:1`), passed to
Stripe as its idempotency key and stored in the PaymentIntent's metadata, so an operation left in
flight by a crash can be found again with `find()`. Stripe honours idempotency keys; localstripe
(the tests' Stripe) ignores them, so meterd's own record of each operation is what guarantees
"exactly once" (see services/payments.py).

Errors: `CardDeclined` (the card was refused: tell the caller), `GatewayUnavailable` (down, too
slow, 5xx: the outcome may be unknown; the operation stays pending and is resolved later).
Never logged here: card numbers, tokens, keys.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, Protocol

import stripe

PAGE_LIMIT = 100


class GatewayError(Exception):
    """A gateway operation did not succeed."""


class CardDeclined(GatewayError):
    """The card was refused (declined, expired, ...): a definite no."""


class GatewayUnavailable(GatewayError):
    """The gateway could not be reached or did not answer in time: outcome unknown."""


@dataclass(frozen=True)
class CardOnFile:
    customer: str
    payment_method: str
    brand: str
    last4: str


@dataclass(frozen=True)
class GatewayResult:
    reference: str  # the PaymentIntent (or Refund) id
    status: str  # succeeded, requires_capture, canceled, ...
    amount_minor: int


class PaymentGateway(Protocol):
    async def save_card(self, token: str) -> CardOnFile: ...

    async def charge(
        self, key: str, card: CardOnFile, amount_minor: int, currency: str
    ) -> GatewayResult: ...

    async def authorize(
        self, key: str, card: CardOnFile, amount_minor: int, currency: str
    ) -> GatewayResult: ...

    async def capture(self, key: str, reference: str, amount_minor: int) -> GatewayResult: ...

    async def release(self, key: str, reference: str) -> GatewayResult: ...

    async def refund(self, key: str, reference: str, amount_minor: int) -> GatewayResult: ...

    async def find(self, key: str) -> GatewayResult | None: ...

    async def close(self) -> None: ...


@dataclass(frozen=True)
class StripeSettings:
    secret_key: str
    api_base_url: str = "https://api.stripe.com"
    timeout_seconds: float = 8.0  # Twilio waits 15 s for the webhook that waits for this


class StripeGateway:
    def __init__(self, settings: StripeSettings) -> None:
        self._settings = settings
        self._http = stripe.AIOHTTPClient(timeout=settings.timeout_seconds)
        self._client = stripe.StripeClient(
            settings.secret_key,
            base_addresses={"api": settings.api_base_url},
            http_client=self._http,
            max_network_retries=0,
        )

    async def _call(self, operation: Any) -> Any:
        try:
            return await asyncio.wait_for(operation, self._settings.timeout_seconds)
        except stripe.CardError as error:
            raise CardDeclined(getattr(error, "code", None) or "card_declined") from None
        except (TimeoutError, stripe.APIConnectionError, stripe.RateLimitError) as error:
            raise GatewayUnavailable(type(error).__name__) from None
        except stripe.APIError as error:
            raise GatewayUnavailable(f"gateway error {getattr(error, 'http_status', '')}") from None
        except stripe.InvalidRequestError as error:
            code = getattr(error, "code", None)
            if code in (
                "card_declined",
                "expired_card",
                "incorrect_cvc",
                "processing_error",
                "incorrect_number",
                "resource_missing",
            ):
                raise CardDeclined(code) from None
            raise GatewayError(
                f"gateway refused the request: {code or 'invalid request'}"
            ) from None
        except stripe.StripeError as error:
            raise GatewayError(type(error).__name__) from None

    async def save_card(self, token: str) -> CardOnFile:
        customer = await self._call(self._client.v1.customers.create_async())
        method = await self._call(
            self._client.v1.payment_methods.attach_async(token, {"customer": customer.id})
        )
        card = getattr(method, "card", None)
        return CardOnFile(
            customer=customer.id,
            payment_method=method.id,
            brand=str(getattr(card, "brand", "") or "")[:32],
            last4=str(getattr(card, "last4", "") or "")[-4:],
        )

    async def _intent(
        self, key: str, card: CardOnFile, amount_minor: int, currency: str, capture: bool
    ) -> GatewayResult:
        params: dict[str, Any] = {
            "amount": amount_minor,
            "currency": currency.lower(),
            "customer": card.customer,
            "payment_method": card.payment_method,
            "confirm": True,
            "off_session": True,
            "metadata": {"operation_key": key},
        }
        if not capture:
            params["capture_method"] = "manual"
        intent = await self._call(
            self._client.v1.payment_intents.create_async(
                # stripe types the params as a TypedDict with no name common to the versions
                # meterd allows (PaymentIntentService.CreateParams in 12, PaymentIntentCreateParams
                # from 13), so a dict built up by condition cannot be declared as it
                params,  # type: ignore[arg-type]
                {"idempotency_key": key},
            )
        )
        result = GatewayResult(intent.id, intent.status, amount_minor)
        wanted = "succeeded" if capture else "requires_capture"
        if intent.status != wanted:
            raise CardDeclined(f"payment ended as {intent.status}")
        return result

    async def charge(
        self, key: str, card: CardOnFile, amount_minor: int, currency: str
    ) -> GatewayResult:
        return await self._intent(key, card, amount_minor, currency, capture=True)

    async def authorize(
        self, key: str, card: CardOnFile, amount_minor: int, currency: str
    ) -> GatewayResult:
        return await self._intent(key, card, amount_minor, currency, capture=False)

    async def capture(self, key: str, reference: str, amount_minor: int) -> GatewayResult:
        intent = await self._call(
            self._client.v1.payment_intents.capture_async(
                reference, {"amount_to_capture": amount_minor}, {"idempotency_key": key}
            )
        )
        return GatewayResult(intent.id, intent.status, amount_minor)

    async def release(self, key: str, reference: str) -> GatewayResult:
        intent = await self._call(
            self._client.v1.payment_intents.cancel_async(
                reference, options={"idempotency_key": key}
            )
        )
        return GatewayResult(intent.id, intent.status, 0)

    async def refund(self, key: str, reference: str, amount_minor: int) -> GatewayResult:
        refund = await self._call(
            self._client.v1.refunds.create_async(
                {
                    "payment_intent": reference,
                    "amount": amount_minor,
                    "metadata": {"operation_key": key},
                },
                {"idempotency_key": key},
            )
        )
        return GatewayResult(refund.id, refund.status, amount_minor)

    async def find(self, key: str) -> GatewayResult | None:
        """The PaymentIntent an operation created, found by the key in its metadata."""
        page = await self._call(self._client.v1.payment_intents.list_async({"limit": PAGE_LIMIT}))
        while True:
            for intent in page.data:
                metadata = intent.metadata.to_dict() if intent.metadata else {}
                if metadata.get("operation_key") == key:
                    return GatewayResult(intent.id, intent.status, int(intent.amount))
            if not page.has_more or not page.data:
                return None
            page = await self._call(
                self._client.v1.payment_intents.list_async(
                    {"limit": PAGE_LIMIT, "starting_after": page.data[-1].id}
                )
            )

    async def close(self) -> None:
        # stripe leaves close_async unannotated
        await self._http.close_async()  # type: ignore[no-untyped-call]
