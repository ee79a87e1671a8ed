"""What each open connection has sent of its request, for choosing which one to close when
meterd is at its connection limit (`meterd/web/connections.py`).

A connection is in one of three states, from the bytes its transport hands over (before aiohttp
parses them) and the answers meterd gives:

- silent: nothing since it opened or since its last answer (idle keep-alive, or a client that
  connected and sent nothing yet);
- partial: part of a request (headers not all there, or fewer body bytes than its
  Content-Length): a client on a slow network, or one trickling its request on purpose;
- complete: a whole request, waiting for meterd or being handled.

A complete request is never closed to make room: under overload it is a real request waiting its
turn, and closing the oldest of those would close each just before its turn and answer none.
Silent and partial connections may be closed once they have been so for
GRACE_SECONDS_BEFORE_EVICTION (a connection accepted a moment ago may have its request in the
socket, not read yet by a busy loop; the kernel's count of unread bytes is asked too).
"""

from __future__ import annotations

import asyncio
import fcntl
import re
import sys
import termios
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from aiohttp.web_protocol import RequestHandler

GRACE_SECONDS_BEFORE_EVICTION = 1.0
HEAD_BYTES_MAX = 256 * 1024  # past this a request's head is never complete (aiohttp refuses it)
_END_OF_HEAD = b"\r\n\r\n"
_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length[ \t]*:[ \t]*(\d+)", re.IGNORECASE)
_CHUNKED = re.compile(rb"\r\ntransfer-encoding[ \t]*:[^\r\n]*chunked", re.IGNORECASE)


@dataclass
class _Partial:
    since: float  # loop time of its first byte
    head: bytes = b""  # what arrived before the end of the head was found
    body_needed: int | None = None  # once the head is complete: its Content-Length
    body_received: int = 0

    def add(self, data: bytes) -> bool:
        """Take the next bytes; True once the whole request has arrived."""
        if self.body_needed is None:
            self.head += data
            end = self.head.find(_END_OF_HEAD)
            if end < 0:
                if len(self.head) > HEAD_BYTES_MAX:
                    self.head = self.head[-len(_END_OF_HEAD) :]  # bounded; stays partial
                return False
            head = b"\r\n" + self.head[:end]
            length = _CONTENT_LENGTH.search(head)
            # a chunked body's end is not counted here: its head is taken as the request
            self.body_needed = 0 if length is None or _CHUNKED.search(head) else int(length[1])
            self.body_received = len(self.head) - end - len(_END_OF_HEAD)
            self.head = b""
        else:
            self.body_received += len(data)
        return self.body_received >= self.body_needed


class Arrivals:
    def __init__(self) -> None:
        # both in time order (insertion order: a connection is moved to the end when it enters)
        self._silent_since: dict[RequestHandler, float] = {}
        self._partial: dict[RequestHandler, _Partial] = {}

    def silent(self, handler: RequestHandler) -> None:
        """Opened, or answered: silent from now until it sends again."""
        self._partial.pop(handler, None)
        self._silent_since.pop(handler, None)
        self._silent_since[handler] = asyncio.get_running_loop().time()

    def heard(self, handler: RequestHandler, data: bytes) -> None:
        """The client sent `data` (not parsed by aiohttp yet)."""
        since = self._silent_since.pop(handler, None)
        partial = self._partial.get(handler)
        if partial is None:
            if since is None:
                return  # more after a complete request (pipelined): it stays complete
            partial = self._partial[handler] = _Partial(asyncio.get_running_loop().time())
        if partial.add(data):
            del self._partial[handler]  # complete: never evicted until it is answered

    def gone(self, handler: RequestHandler) -> None:
        self._silent_since.pop(handler, None)
        self._partial.pop(handler, None)

    def is_complete(self, handler: RequestHandler) -> bool:
        return handler not in self._silent_since and handler not in self._partial

    def victim(
        self,
        transports: dict[RequestHandler, asyncio.Transport],
        spared: Callable[[RequestHandler], bool],
    ) -> RequestHandler | None:
        """The connection to close to make room: the oldest silent one, else the oldest
        partial one, silent or partial for the grace period, with no unread bytes in its socket
        (a request a busy loop has not read yet), and not `spared`."""
        grace_ended = asyncio.get_running_loop().time() - GRACE_SECONDS_BEFORE_EVICTION
        heard: list[RequestHandler] = []
        victim = _oldest(self._silent_since.items(), grace_ended, transports, spared, heard)
        for handler in heard:  # bytes in its socket: no longer silent
            del self._silent_since[handler]
            self._partial[handler] = _Partial(grace_ended + GRACE_SECONDS_BEFORE_EVICTION)
        if victim is None:
            partial_since = ((h, p.since) for h, p in self._partial.items())
            victim = _oldest(partial_since, grace_ended, transports, spared, [])
        return victim


def _oldest(
    candidates: Iterable[tuple[RequestHandler, float]],
    grace_ended: float,
    transports: dict[RequestHandler, asyncio.Transport],
    spared: Callable[[RequestHandler], bool],
    heard: list[RequestHandler],
) -> RequestHandler | None:
    for handler, since in candidates:
        if since > grace_ended:
            return None  # in time order: none after it has been so long enough
        if spared(handler):
            continue
        if _bytes_waiting(transports[handler]):
            heard.append(handler)
            continue
        return handler
    return None


def _bytes_waiting(transport: asyncio.Transport) -> bool:
    """Whether the kernel holds bytes of this connection the loop has not read yet (FIONREAD)."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        return False
    try:
        waiting = fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0")
    except OSError:
        return False  # closed meanwhile: nothing to keep it for
    return int.from_bytes(waiting, sys.byteorder) > 0
