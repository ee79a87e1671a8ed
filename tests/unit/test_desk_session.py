"""The desk's session cookie and CSRF tokens (`meterd/web/desk_session.py`), pure."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from meterd.web.desk_session import (
    SESSION_HOURS,
    csrf_ok,
    csrf_token,
    desk_key,
    new_session,
    read_session,
)

KEY = desk_key("pin-secret-0123456789", "admin-token", "agents-token")


def test_a_session_reads_back_until_it_expires():
    session, cookie = new_session(KEY, "agents", now=1_000)
    assert read_session(KEY, cookie, now=1_000) == session
    assert read_session(KEY, cookie, now=1_000 + SESSION_HOURS * 3600) is None


def test_rotating_a_token_ends_every_session():
    _, cookie = new_session(KEY, "admin", now=1_000)
    rotated = desk_key("pin-secret-0123456789", "new-admin-token", "agents-token")
    assert read_session(rotated, cookie, now=1_000) is None


@given(st.text(max_size=200))
def test_no_string_is_a_session_without_the_key(cookie):
    assert read_session(KEY, cookie, now=0) is None


@given(st.integers(0, 200), st.characters(codec="ascii"))
def test_changing_any_character_of_a_cookie_breaks_it(position, replacement):
    _, cookie = new_session(KEY, "agents", now=1_000)
    position %= len(cookie)
    altered = cookie[:position] + replacement + cookie[position + 1 :]
    if altered != cookie:
        assert read_session(KEY, altered, now=1_000) is None


def test_csrf_tokens_belong_to_their_session():
    session, _ = new_session(KEY, "admin")
    other, _ = new_session(KEY, "admin")
    token = csrf_token(KEY, session.session_id)
    assert csrf_ok(KEY, session.session_id, token)
    assert not csrf_ok(KEY, other.session_id, token)
    assert not csrf_ok(KEY, session.session_id, None)
    assert not csrf_ok(KEY, session.session_id, "")
