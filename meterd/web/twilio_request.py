"""Reading and authenticating one Twilio webhook request.

`read_signed_form` takes an aiohttp request and either returns the form Twilio posted (every
parameter, repeated keys and order kept) or raises `TwilioRequestRejected` carrying the HTTP status,
a short machine code and a human sentence, which the route turns into a `json_error`.

Pure request handling: no logging, no database, no global state.

Decisions (see also the docstrings below):

* Status codes. 400 for a body that is not a well-formed UTF-8 urlencoded form
  (`wrong_content_type`, `not_utf8`, `malformed_form`); 413 for a body past the byte cap
  (`body_too_large`) or with more than `FORM_FIELDS_MAX` fields (`too_many_fields`, the same status
  aiohttp's own `client_max_fields` gives); 403 for anything about the signature
  (`missing_signature`, `bad_signature`, `auth_token_not_set`).
* Order of checks: auth token configured, content type, body size, UTF-8, form syntax, field count,
  then the signature. The form is parsed before the signature is checked so that a rejected request
  still names its CallSid in the caller's log line; parsing is bounded by the byte and field caps.
* With no auth token configured every request is refused with 403, whatever its body.
* The signed URL is the configured public base URL followed by the request target exactly as it
  arrived (see `twilio_url`); twilio's validator tries it with and without the default port.
"""

from __future__ import annotations

import re
from urllib.parse import parse_qsl

from aiohttp import web
from multidict import MultiDict
from twilio import request_validator
from twilio.request_validator import RequestValidator

__all__ = [
    "CALL_SID_CHARS_MAX",
    "FORM_CONTENT_TYPE",
    "FORM_FIELDS_MAX",
    "SIGNATURE_HEADER",
    "TwilioRequestRejected",
    "read_signed_form",
    "twilio_url",
]

FORM_FIELDS_MAX = 1000
"""More fields than this in one form is refused with 413 `too_many_fields`."""

CALL_SID_CHARS_MAX = 64
"""A CallSid reported on a rejected request is cut to this length (it is untrusted input)."""

FORM_CONTENT_TYPE = "application/x-www-form-urlencoded"
SIGNATURE_HEADER = "X-Twilio-Signature"
SIGNATURE_SETTINGS_HEADER = "X-Twilio-Webhooks-Signature-Settings"
# The newer scheme (a webhook SharedKey, HMAC-SHA256, announced by SIGNATURE_SETTINGS_HEADER) is
# checked by the twilio library itself when the installed release knows it.
_signature_algorithm = getattr(request_validator, "get_signature_algorithm", None)

# A '%' not followed by two hex digits: urllib keeps it literally, we call the form malformed.
_BAD_PERCENT_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")


class TwilioRequestRejected(Exception):
    """A webhook request meterd refuses. `status` is 400, 403 or 413; `code` is a short machine
    code; `detail` a human sentence; `call_sid` the form's CallSid if it could be read, else ""."""

    status: int
    code: str
    detail: str
    call_sid: str

    def __init__(self, status: int, code: str, detail: str, call_sid: str = "") -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail
        self.call_sid = call_sid

    def __repr__(self) -> str:
        return (
            f"TwilioRequestRejected(status={self.status}, code={self.code!r}, "
            f"detail={self.detail!r}, call_sid={self.call_sid!r})"
        )


def twilio_url(public_base_url: str, request: web.Request) -> str:
    """The URL Twilio signed for this request.

    It is `public_base_url` (scheme, host, optional port, optional path prefix; one trailing "/"
    is ignored) followed by the request target exactly as it reached meterd: the raw path and, if
    the request line had one, "?" and the raw query string, never decoded or re-encoded (Twilio
    signs the URL as configured, so `'` must stay `'` and `%20` must stay `%20`).

    Path-prefix rule: the reverse proxy strips the prefix before forwarding, so the request meterd
    sees has the path *without* it. With `public_base_url = "https://calls.example.com/meterd"`,
    Twilio requests `https://calls.example.com/meterd/twilio/voice`, the proxy forwards
    `/twilio/voice`, and the signed URL is rebuilt as the base URL + `/twilio/voice`. A proxy that
    forwards the prefix unchanged needs a base URL without the prefix.

    The port is taken from `public_base_url` as written; `read_signed_form` accepts a signature
    made over the URL with or without the scheme's default port (:443 for https, :80 for http).
    Twilio's connection-override fragment (`#rc=...`) is never sent on the wire, so it is not part
    of this URL; a fragment in the request target (only a non-browser client would send one) is
    dropped.
    """
    target = request.raw_path  # the request target exactly as in the request line
    if not target.startswith("/"):
        # absolute-form ("POST https://host/x?y HTTP/1.1"): keep only the path and query
        rel = request.rel_url
        target = rel.raw_path + ("?" + rel.raw_query_string if rel.raw_query_string else "")
    target = target.partition("#")[0]
    base = public_base_url[:-1] if public_base_url.endswith("/") else public_base_url
    return base + target


async def read_signed_form(
    request: web.Request,
    *,
    public_base_url: str,
    auth_token: str,
    body_bytes_max: int,
    webhook_key: str = "",
) -> MultiDict[str]:
    """Read, parse and authenticate a Twilio form webhook.

    Returns every form parameter in the order received, repeated keys kept. Unknown parameters are
    kept too (Twilio adds new ones without notice, and they are part of the signature). Raises
    `TwilioRequestRejected` for anything wrong; never lets a malformed body become a 500.
    """
    if not auth_token:
        try:
            form = await _read_form(request, body_bytes_max)
        except TwilioRequestRejected:
            form = MultiDict()
        raise TwilioRequestRejected(
            403,
            "auth_token_not_set",
            "METERD_TWILIO_AUTH_TOKEN is not set, so no Twilio request can be authenticated",
            _call_sid(form),
        )

    form = await _read_form(request, body_bytes_max)
    call_sid = _call_sid(form)

    signature = request.headers.get(SIGNATURE_HEADER)
    if not signature:
        raise TwilioRequestRejected(
            403, "missing_signature", f"the request has no {SIGNATURE_HEADER} header", call_sid
        )

    url = twilio_url(public_base_url, request)
    key, scheme = _signing_key(request, auth_token, webhook_key, call_sid)
    try:
        # validate() tries the URL both with and without the default port, and reads repeated
        # keys through MultiDict.getall().
        validator = RequestValidator(key)
        valid: bool = (
            validator.validate(url, form, signature)
            if scheme is None
            else validator.validate(url, form, signature, algorithm=scheme)
        )
    except ValueError:  # urlparse: an invalid port or host in public_base_url
        raise TwilioRequestRejected(
            403,
            "bad_signature",
            "the signed URL could not be rebuilt; check public_base_url",
            call_sid,
        ) from None
    if not valid:
        raise TwilioRequestRejected(
            403,
            "bad_signature",
            f"the {SIGNATURE_HEADER} header does not match this form posted to {url}",
            call_sid,
        )
    return form


def _signing_key(
    request: web.Request, auth_token: str, webhook_key: str, call_sid: str
) -> tuple[str, str | None]:
    """The secret and algorithm the request was signed with: the auth token and HMAC-SHA1, or,
    when Twilio announces the newer scheme, the webhook SharedKey secret and its algorithm."""
    settings = request.headers.get(SIGNATURE_SETTINGS_HEADER)
    if not settings:
        return auth_token, None
    if _signature_algorithm is None:
        raise TwilioRequestRejected(
            403,
            "signature_scheme_unsupported",
            f"the installed twilio library cannot check {SIGNATURE_SETTINGS_HEADER} "
            "signatures; upgrade it",
            call_sid,
        )
    if not webhook_key:
        raise TwilioRequestRejected(
            403,
            "webhook_key_not_set",
            f"the request is signed with a webhook SharedKey ({SIGNATURE_SETTINGS_HEADER}) "
            "and METERD_TWILIO_WEBHOOK_KEY is not set",
            call_sid,
        )
    return webhook_key, str(_signature_algorithm(settings))


async def _read_form(request: web.Request, body_bytes_max: int) -> MultiDict[str]:
    """The request's urlencoded form, strictly parsed; raises `TwilioRequestRejected`."""
    if request.content_type != FORM_CONTENT_TYPE:
        # aiohttp lower-cases the media type and drops parameters (charset is allowed; the body
        # is decoded as UTF-8 whatever charset says). A missing header reads as
        # application/octet-stream.
        raise TwilioRequestRejected(
            400,
            "wrong_content_type",
            f"send the body as {FORM_CONTENT_TYPE}, not {request.content_type}",
        )

    too_large = TwilioRequestRejected(
        413, "body_too_large", f"the request body is larger than {body_bytes_max} bytes"
    )
    declared = request.content_length
    if declared is not None and declared > body_bytes_max:
        raise too_large
    try:
        raw = await request.read()  # also capped by the application's client_max_size
    except web.HTTPRequestEntityTooLarge:
        raise too_large from None
    if len(raw) > body_bytes_max:
        raise too_large

    try:
        text = raw.decode("utf-8", errors="strict")
    except UnicodeDecodeError:
        raise TwilioRequestRejected(400, "not_utf8", "the body is not valid UTF-8") from None

    if not text:
        return MultiDict()
    fields = text.count("&") + 1
    if fields > FORM_FIELDS_MAX:
        raise TwilioRequestRejected(
            413,
            "too_many_fields",
            f"the form has {fields} fields; at most {FORM_FIELDS_MAX} are accepted",
        )
    bad_escape = _BAD_PERCENT_ESCAPE.search(text)
    if bad_escape:
        raise TwilioRequestRejected(
            400,
            "malformed_form",
            f"the form has an invalid percent-escape at offset {bad_escape.start()}",
        )
    try:
        pairs = parse_qsl(
            text,
            keep_blank_values=True,
            strict_parsing=True,
            max_num_fields=FORM_FIELDS_MAX,
            errors="strict",
        )
    except UnicodeDecodeError:
        raise TwilioRequestRejected(
            400, "not_utf8", "a percent-escape in the form decodes to invalid UTF-8"
        ) from None
    except ValueError:
        raise TwilioRequestRejected(
            400, "malformed_form", "the body is not a well-formed urlencoded form"
        ) from None
    return MultiDict(pairs)


def _call_sid(form: MultiDict[str]) -> str:
    return form.get("CallSid", "")[:CALL_SID_CHARS_MAX]
