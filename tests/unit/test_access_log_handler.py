"""The access log's batching handler: lines are late by at most a bound, never lost or reordered."""

from __future__ import annotations

import asyncio
import io
import logging

import httpx

from llmproxy.access_log import BufferedLineHandler
from llmproxy.config import Configuration
from tests.support import free_port, lifespan, proxy_app


class NotifyingStream(io.StringIO):
    """A text stream that sets an event when written to."""

    def __init__(self) -> None:
        super().__init__()
        self.written = asyncio.Event()

    def write(self, text: str) -> int:
        self.written.set()
        return super().write(text)


def record(message: str) -> logging.LogRecord:
    return logging.LogRecord("llmproxy.access", logging.INFO, __file__, 0, message, (), None)


async def test_lines_in_a_loop_wait_for_one_batched_write() -> None:
    stream = NotifyingStream()
    handler = BufferedLineHandler(stream, flush_delay=0.05)
    handler.handle(record("first"))
    handler.handle(record("second"))
    assert stream.getvalue() == ""  # not written per line
    async with asyncio.timeout(5):
        await stream.written.wait()
    assert stream.getvalue() == "first\nsecond\n"


def test_lines_outside_a_loop_are_written_at_once() -> None:
    stream = io.StringIO()
    handler = BufferedLineHandler(stream)
    handler.handle(record("alone"))
    assert stream.getvalue() == "alone\n"


async def test_a_full_batch_is_written_without_waiting() -> None:
    stream = io.StringIO()
    handler = BufferedLineHandler(stream, flush_delay=60, flush_bytes=20)
    handler.handle(record("0123456789"))
    assert stream.getvalue() == ""
    handler.handle(record("abcdefghij"))
    assert stream.getvalue() == "0123456789\nabcdefghij\n"


async def test_close_writes_what_is_pending() -> None:
    stream = io.StringIO()
    handler = BufferedLineHandler(stream, flush_delay=60)
    handler.handle(record("last words"))
    handler.close()
    assert stream.getvalue() == "last words\n"


async def test_the_app_writes_buffered_lines_out_when_it_shuts_down() -> None:
    # uvicorn ends a SIGTERM'd process by re-raising the signal, so exit hooks never run: the
    # lifespan's shutdown is the last moment to write lines still waiting for their batch.
    stream = io.StringIO()
    handler = BufferedLineHandler(stream, flush_delay=3600)
    access = logging.getLogger("llmproxy.access")
    access.addHandler(handler)
    level = access.level
    access.setLevel(logging.INFO)
    try:
        app = proxy_app(Configuration(upstream_urls=(f"http://127.0.0.1:{free_port()}/v1",)))
        async with lifespan(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://proxy") as client:
                response = await client.get("/v1/models", headers={"x-request-id": "flush-1"})
            assert response.status_code == 502  # nothing listens there
            assert "flush-1" not in stream.getvalue()  # still waiting for its batch
        assert "flush-1 GET /v1/models 502" in stream.getvalue()
    finally:
        access.removeHandler(handler)
        access.setLevel(level)
