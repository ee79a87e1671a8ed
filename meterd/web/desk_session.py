"""The desk page's sign-in session and its CSRF tokens.

A desk lead or agent signs in with the admin or the agents token once; meterd answers with a
session cookie instead of keeping the token in the browser. The cookie is
`<payload>.<signature>`: the payload (base64url JSON: role, expiry, a random id) signed with
HMAC-SHA256 under a key derived from the server's `pin_secret` and the admin and agents tokens,
so every meterd sharing the configuration accepts it, nobody without the secrets can make or
change one, and rotating a token ends every session. No session is stored: a session ends when
its cookie expires (`SESSION_HOURS`) or a token is rotated; signing out deletes the cookie from
that browser, but a copy of it stays good until it expires.

Every form carries a CSRF token: HMAC of the session's id under the same key (before sign-in,
of a random id kept in a short-lived cookie of its own), checked on every POST. The cookies are
HttpOnly and SameSite=Strict, and Secure when meterd's public URL is https.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass

SESSION_COOKIE = "meterd_desk"
SIGN_IN_COOKIE = "meterd_desk_sign_in"
SESSION_HOURS = 12  # a working day and then some: sign in again each morning
SIGN_IN_MINUTES = 30
ROLES = ("admin", "agents")  # admins see accounts too


@dataclass(frozen=True)
class Session:
    role: str  # "admin" or "agents"
    session_id: str
    expires_at: int  # epoch seconds

    @property
    def admin(self) -> bool:
        return self.role == "admin"


def desk_key(pin_secret: str, *tokens: str) -> bytes:
    """The key sessions and CSRF tokens are signed with: derived from the server secret and
    the tokens one signs in with, so rotating a token ends every session."""
    context = "\x00".join(("meterd desk session v1", *tokens)).encode()
    return hmac.new(pin_secret.encode(), context, hashlib.sha256).digest()


def _sign(key: bytes, text: str) -> str:
    digest = hmac.new(key, text.encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")


def new_session(key: bytes, role: str, now: float | None = None) -> tuple[Session, str]:
    """A new session for `role` and its cookie value."""
    if role not in ROLES:
        raise ValueError(f"no desk role {role!r}")
    issued = int(time.time() if now is None else now)
    session = Session(role, secrets.token_urlsafe(16), issued + SESSION_HOURS * 3600)
    payload = json.dumps(
        {"role": session.role, "id": session.session_id, "exp": session.expires_at},
        separators=(",", ":"),
    )
    encoded = base64.urlsafe_b64encode(payload.encode()).decode().rstrip("=")
    return session, f"{encoded}.{_sign(key, encoded)}"


def read_session(key: bytes, cookie: str | None, now: float | None = None) -> Session | None:
    """The session a cookie carries, or None if it is missing, forged, altered or expired."""
    if not cookie or cookie.count(".") != 1:
        return None
    encoded, signature = cookie.split(".")
    if not hmac.compare_digest(signature.encode(), _sign(key, encoded).encode()):
        return None
    try:
        payload = json.loads(base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)))
        session = Session(str(payload["role"]), str(payload["id"]), int(payload["exp"]))
    except (ValueError, KeyError, TypeError):
        return None
    expired = session.expires_at <= (time.time() if now is None else now)
    return None if expired or session.role not in ROLES else session


def csrf_token(key: bytes, session_id: str) -> str:
    """The token the forms of a session (or of a sign-in page) carry."""
    return _sign(key, f"csrf:{session_id}")


def csrf_ok(key: bytes, session_id: str, presented: object) -> bool:
    return isinstance(presented, str) and hmac.compare_digest(
        presented.encode(), csrf_token(key, session_id).encode()
    )
