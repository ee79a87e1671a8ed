"""Every log line is one JSON object (issue 12, finding 8), including what libraries log through
the standard `logging` module: aiohttp's parser errors as one line without a traceback,
APScheduler's skipped runs as one info line naming the job, other tracebacks as a field, and
database-outage records from a library rate-limited."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import warnings
from collections.abc import Iterator

import pytest
import structlog
from aiohttp import web
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.interval import IntervalTrigger

from meterd.logs import AccessLogger, ThirdPartyRecords, configure_logging, get_logger


@pytest.fixture
def output() -> Iterator[io.StringIO]:
    """configure_logging onto a buffer; structlog's and logging's set-up restored afterwards."""
    saved_structlog = structlog.get_config()
    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    stream = io.StringIO()
    configure_logging("info", stream=stream)
    try:
        yield stream
    finally:
        logging.captureWarnings(False)
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in saved_handlers:
            root.addHandler(handler)
        root.setLevel(saved_level)
        structlog.configure(**saved_structlog)


def lines_of(stream: io.StringIO) -> list[dict]:
    """Every line, each parsed as one JSON object (a line that is not fails the test)."""
    text = stream.getvalue()
    assert text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


async def test_a_request_aiohttp_cannot_parse_is_one_json_line_without_a_traceback(output):
    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/", hello)
    runner = web.AppRunner(app, access_log_class=AccessLogger)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        for request in (
            b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: abc\r\n\r\n",
            b"GET /\x01x HTTP/1.1\r\nHost: a\r\n\r\n",
            b"GET / HTTP/1.1\r\nX-Long: " + b"a" * 20_000 + b"\r\n\r\n",
        ):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(request)
            await writer.drain()
            assert (await reader.readline()).split()[1] == b"400"
            writer.close()
            await writer.wait_closed()
        await asyncio.sleep(0.05)
    finally:
        await runner.cleanup()
    lines = lines_of(output)
    bad = [line for line in lines if line["event"] == "bad HTTP request"]
    assert [(line["error"], line["level"], line["status"]) for line in bad] == [
        ("BadHttpMessage", "info", 400),
        ("InvalidURLError", "info", 400),
        ("LineTooLong", "info", 400),
    ]
    assert bad[0]["detail"] == "Invalid character in Content-Length:"
    assert all(line["logger"] == "aiohttp.server" and "exception" not in line for line in bad)
    assert [line["status"] for line in lines if line["event"] == "request"] == [400] * 3
    assert "Traceback" not in output.getvalue()


async def test_a_skipped_scheduled_run_is_one_info_line_naming_the_job(output):
    scheduler = AsyncIOScheduler()
    release = asyncio.Event()

    async def slow() -> None:
        await release.wait()

    scheduler.add_job(
        slow, IntervalTrigger(seconds=0.05), id="metering-tick", max_instances=1, coalesce=True
    )
    scheduler.start()
    try:
        await asyncio.sleep(0.4)
    finally:
        release.set()
        scheduler.shutdown(wait=False)
        await asyncio.sleep(0)
    skipped = [
        line
        for line in lines_of(output)
        if line["event"] == "scheduled run skipped: the previous run has not finished"
    ]
    assert skipped, output.getvalue()
    assert all(
        (line["job"], line["level"], line["logger"])
        == ("metering-tick", "info", "apscheduler.scheduler")
        for line in skipped
    )
    assert "maximum number of running instances" not in output.getvalue()


def test_other_library_records_tracebacks_and_warnings_are_json_lines_too(output):
    get_logger("meterd.test").info("own line", answer=42)
    logging.getLogger("some.library").info("below WARNING: not shown")
    try:
        raise RuntimeError("boom\nsecond line")
    except RuntimeError:
        logging.getLogger("some.library").exception("it failed: %s", "badly")
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("a library warning", RuntimeWarning, stacklevel=1)
    lines = lines_of(output)
    assert [(line["event"], line["level"]) for line in lines[:2]] == [
        ("own line", "info"),
        ("it failed: badly", "error"),
    ]
    assert lines[0]["answer"] == 42
    assert lines[1]["logger"] == "some.library"
    assert lines[1]["exception"].startswith("Traceback (most recent call last):")
    assert "RuntimeError: boom\nsecond line" in lines[1]["exception"]
    assert lines[2]["logger"] == "py.warnings" and "a library warning" in lines[2]["event"]
    assert len(lines) == 3


def test_configuring_twice_does_not_double_the_lines(output):
    configure_logging("info", stream=output)
    logging.getLogger("some.library").warning("once")
    assert [line["event"] for line in lines_of(output)] == ["once"]


def test_a_library_logging_a_database_outage_is_rate_limited_without_a_traceback():
    clock = [100.0]
    records = ThirdPartyRecords(logging.INFO, interval_seconds=10, monotonic=lambda: clock[0])

    def pool_record() -> logging.LogRecord:
        try:
            from sqlalchemy.exc import DisconnectionError

            raise DisconnectionError("connection reset by peer")
        except DisconnectionError:
            import sys

            return logging.LogRecord(
                "sqlalchemy.pool.impl.AsyncAdaptedQueuePool",
                logging.ERROR,
                __file__,
                1,
                "Exception during reset or similar",
                None,
                sys.exc_info(),
            )

    shown = []
    for second in range(25):
        clock[0] = 100.0 + second
        record = pool_record()
        if records.filter(record):
            shown.append(record)
    assert len(shown) == 3  # at 0, 10 and 20 s
    assert all(record.exc_info is None for record in shown)
    fields = [record.meterd_fields for record in shown]  # type: ignore[attr-defined]
    assert [f["suppressed"] for f in fields] == [0, 9, 9]
    assert fields[0]["error"] == "DisconnectionError" and fields[0]["database_unavailable"]
