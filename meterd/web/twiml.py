"""TwiML for each answer meterd gives a caller. Words are calm and short; nothing here decides."""

from __future__ import annotations

from twilio.twiml.voice_response import Gather, VoiceResponse

from meterd.services.answering import Action, Answer

CONFERENCE_EVENTS = "start end join leave hold modify"
PIN_DIGITS_MAX = 8
PIN_TIMEOUT_SECONDS = 10


CARD_RETRY_MESSAGES = {
    "declined": "Sorry, that card was declined.",
    "unavailable": "Sorry, we could not reach our payment service.",
    "star": "The card entry was cancelled.",
    "invalid_card": "Sorry, we could not read that card.",
    "error": "Sorry, that payment did not go through.",
}


UNKNOWN_CALLER_GOODBYE = (
    "We could not find your account, so we cannot connect this call. "
    "Please contact us by email and we will help you. Goodbye."
)
PAYMENT_FAILED_GOODBYE = (
    "We could not take a payment, so we cannot connect this call. You can buy "
    "support minutes on our website. Goodbye."
)
NO_FUNDS_GOODBYE = (
    "Your account has no support minutes left. To buy minutes, please visit "
    "our website or contact our sales team, then call again. Goodbye."
)


def render(answer: Answer, public_base_url: str, pay_connector: str = "Default") -> str:
    """The TwiML of `answer`: connect, ask for the PIN, take a card, or say goodbye."""
    response = VoiceResponse()
    if answer.action is Action.CONNECT:
        _connect(response, answer, public_base_url)
    elif answer.action is Action.ASK_PIN:
        _ask_pin(response, answer, public_base_url)
    elif answer.action is Action.UNKNOWN_CALLER:
        _goodbye(response, UNKNOWN_CALLER_GOODBYE)
    elif answer.action is Action.COLLECT_CARD:
        _collect_card(response, answer, public_base_url, pay_connector)
    elif answer.action is Action.PAY_GOODBYE:
        _goodbye(response, PAYMENT_FAILED_GOODBYE)
    elif answer.action is Action.NO_FUNDS:
        _goodbye(response, NO_FUNDS_GOODBYE)
    else:
        response.hangup()
    return str(response)


def _connect(response: VoiceResponse, answer: Answer, public_base_url: str) -> None:
    """Into the call's own conference, labelled the customer; it ends when the customer leaves."""
    dial = response.dial()
    dial.conference(
        answer.call_sid,
        participant_label="customer",
        start_conference_on_enter=True,
        end_conference_on_exit=True,
        status_callback=f"{public_base_url}/twilio/conference",
        status_callback_method="POST",
        status_callback_event=CONFERENCE_EVENTS,
    )


def _ask_pin(response: VoiceResponse, answer: Answer, public_base_url: str) -> None:
    pin_url = f"{public_base_url}/twilio/pin?attempt={answer.attempt}"
    if answer.retry:
        response.say("Sorry, that PIN was not recognised.")
    gather = Gather(
        input="dtmf",
        action=pin_url,
        method="POST",
        finish_on_key="#",
        num_digits=PIN_DIGITS_MAX,
        timeout=PIN_TIMEOUT_SECONDS,
    )
    gather.say("Please enter your account PIN, then press the pound key.")
    response.append(gather)
    response.redirect(pin_url, method="POST")  # no input: counts as a try


def _collect_card(
    response: VoiceResponse, answer: Answer, public_base_url: str, pay_connector: str
) -> None:
    """Twilio <Pay> for a block of minutes, after saying why (or why the last try failed)."""
    if answer.retry:
        response.say(
            CARD_RETRY_MESSAGES.get(answer.reason, CARD_RETRY_MESSAGES["error"])
            + " Let us try again."
        )
    else:
        response.say(
            "Your account has no support minutes left. To connect you, we will "
            "take a card for a block of support minutes."
        )
    response.pay(
        input="dtmf",
        payment_connector=pay_connector,
        token_type="payment-method",  # noqa: S106 - a token kind, not a secret
        action=f"{public_base_url}/twilio/pay?attempt={answer.attempt}",
        status_callback=f"{public_base_url}/twilio/pay-status",
        max_attempts=1,
        security_code=True,
        postal_code=False,
        timeout=10,
    )


def _goodbye(response: VoiceResponse, words: str) -> None:
    response.say(words)
    response.hangup()


def apology() -> str:
    response = VoiceResponse()
    response.say(
        "We are sorry, we cannot take your call right now. Please try again in a few "
        "minutes. Goodbye."
    )
    response.hangup()
    return str(response)


ANNOUNCEMENTS = {
    "warn": "Please note: your account has only a few support minutes left.",
    "exhausted": "Your account has no support minutes left. This call will end shortly. "
    "To buy more minutes, please visit our website.",
}


def announcement(message: str) -> str:
    response = VoiceResponse()
    response.say(ANNOUNCEMENTS[message])
    return str(response)
