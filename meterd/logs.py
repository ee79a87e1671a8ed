"""structlog: one JSON object per line on stdout. Never log tokens, card data or PINs.

Libraries that log through the standard `logging` module (aiohttp, APScheduler, SQLAlchemy,
asyncio) are rendered by the same JSON renderer, with their logger's name in `logger` and a
traceback, if any, as the `exception` field: every line is one JSON object. Their records below
WARNING are not shown (aiosqlite and APScheduler are chatty at INFO and DEBUG), and three kinds
are reshaped, since each is expected and says all it has to say in one line:
- aiohttp's "Error handling request" for a request it could not parse (a bad request line, a bad
  header, one too long): one info line `bad HTTP request` with the error's class and first line,
  no traceback (the access log has the 400 too);
- APScheduler's "maximum number of running instances reached": one info line
  `scheduled run skipped` naming the job (the previous run is still going; it is not an error);
- a record carrying a database-unavailable error (SQLAlchemy's pool while the server is away):
  the error's class and text instead of the traceback, at most one line per
  `OUTAGE_LOG_INTERVAL_SECONDS` per logger and message, with the number suppressed.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

import structlog
from aiohttp.abc import AbstractAccessLogger
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web import BaseRequest, StreamResponse
from aiohttp.web_protocol import RequestPayloadError
from structlog.typing import EventDict

from meterd.store.outage import OUTAGE_LOG_INTERVAL_SECONDS, describe, is_unavailable

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}
THIRD_PARTY_LEVEL = logging.WARNING
_FIELDS = "meterd_fields"  # a record attribute the filter below fills with extra fields


def configure_logging(level: str = "info", *, stream: TextIO | None = None) -> None:
    """meterd's own logs (structlog) and every library's (`logging`) as JSON lines on `stream`
    (stdout unless told)."""
    stream = stream or sys.stdout
    timestamper = structlog.processors.TimeStamper(fmt="iso", utc=True)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            timestamper,
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(sort_keys=True),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[
                structlog.stdlib.add_log_level,
                structlog.stdlib.add_logger_name,
                timestamper,
                _add_record_fields,
            ],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                structlog.processors.JSONRenderer(sort_keys=True),
            ],
        )
    )
    handler.addFilter(ThirdPartyRecords(_LEVELS[level]))
    root = logging.getLogger()
    for old in list(root.handlers):  # configuring twice replaces, never doubles, the handler
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(THIRD_PARTY_LEVEL)
    logging.captureWarnings(True)  # Python's warnings too, as JSON (logger "py.warnings")


def _add_record_fields(_logger: Any, _method: str, event_dict: EventDict) -> EventDict:
    record = event_dict.get("_record")
    event_dict.update(getattr(record, _FIELDS, None) or {})
    return event_dict


class ThirdPartyRecords(logging.Filter):
    """Reshapes the records described in the module docstring, rate-limits database-outage
    records, and drops what falls below meterd's level after reshaping."""

    def __init__(
        self,
        level: int = logging.INFO,
        *,
        interval_seconds: float = OUTAGE_LOG_INTERVAL_SECONDS,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self.level = level
        self.interval_seconds = interval_seconds
        self._monotonic = monotonic
        self._last_line: dict[tuple[str, str], float] = {}
        self._suppressed: dict[tuple[str, str], int] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, HttpProcessingError) and record.name.startswith("aiohttp"):
            _reshape(
                record,
                logging.INFO,
                "bad HTTP request",
                remote=str(record.args[0]) if isinstance(record.args, tuple) else None,
                status=error.code,
                error=type(error).__name__,
                detail=_first_line(error.message),
            )
        elif isinstance(error, RequestPayloadError) and record.name.startswith("aiohttp"):
            # the rest of a body meterd already answered 400 for (it does not decode as its
            # Content-Encoding says), drained by aiohttp before it closes the connection
            _reshape(
                record,
                logging.INFO,
                "bad HTTP request body",
                error=type(error).__name__,
                detail=_first_line(str(error)),
            )
        elif record.name.startswith("apscheduler") and "maximum number of running instances" in (
            str(record.msg)
        ):
            job = record.args[0] if isinstance(record.args, tuple) and record.args else None
            _reshape(
                record,
                logging.INFO,
                "scheduled run skipped: the previous run has not finished",
                job=getattr(job, "id", str(job)),
            )
        elif error is not None and is_unavailable(error):
            key = (record.name, str(record.msg))
            now = self._monotonic()
            last = self._last_line.get(key)
            if last is not None and now - last < self.interval_seconds:
                self._suppressed[key] = self._suppressed.get(key, 0) + 1
                return False
            self._last_line[key] = now
            _reshape(
                record,
                record.levelno,
                record.getMessage(),
                database_unavailable=True,
                suppressed=self._suppressed.pop(key, 0),
                **describe(error),
            )
        return record.levelno >= self.level


def _first_line(text: object) -> str:
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    return lines[0][:200] if lines else ""


def _reshape(record: logging.LogRecord, level: int, message: str, **fields: Any) -> None:
    record.levelno = level
    record.levelname = logging.getLevelName(level)
    record.msg = message
    record.args = None
    record.exc_info = None
    record.exc_text = None
    setattr(record, _FIELDS, {k: v for k, v in fields.items() if v is not None})


def get_logger(name: str) -> Any:
    return structlog.get_logger(name)


class AccessLogger(AbstractAccessLogger):
    """One JSON line per request, with whatever the handler bound through contextvars
    (e.g. `call_sid`). The query string is not logged: it may carry anything."""

    def log(self, request: BaseRequest, response: StreamResponse, time: float) -> None:
        structlog.get_logger("access").info(
            "request",
            method=request.method,
            path=request.path,
            status=response.status,
            duration_ms=round(time * 1000, 2),
            remote=request.remote,
            body_bytes=response.body_length,
        )

    @property
    def enabled(self) -> bool:
        return True
