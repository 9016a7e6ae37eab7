"""The server's own `send` (`_ProxyCycle`) against uvicorn's: the same bytes on the wire, the
same errors and the same connection state for the same ASGI messages.

`_ProxyCycle.send` replaces uvicorn's `RequestResponseCycle.send` on the hot path (one scan of
all header names and one of all values instead of two regular-expression searches per header);
these tests hold it to uvicorn's behaviour for every message uvicorn handles the same way
(204 and 304, where the proxy departs on purpose, have tests of their own in
tests/e2e/test_hostile_input.py).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from typing import Any

import pytest
import uvicorn
from hypothesis import given
from hypothesis import strategies as st
from starlette.types import Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import (
    HEADER_RE,
    HEADER_VALUE_RE,
    RequestResponseCycle,
)
from uvicorn.server import ServerState

from llmproxy.headers import FIELD_NAME_BYTES_FINE, FIELD_VALUE_BYTES_FINE
from llmproxy.protocol import ProxyHttpProtocol, _ProxyCycle
from tests.unit.test_server_protocol import RecordingTransport


async def never_answers(scope: Scope, receive: Receive, send: Send) -> None:
    await asyncio.Event().wait()  # the test sends in the app's place


@pytest.fixture(autouse=True)
def _quiet_uvicorn() -> Iterator[None]:
    # The app's task is cancelled after each run; uvicorn logs that as an app error.
    logger = logging.getLogger("uvicorn.error")
    logger.disabled = True
    yield
    logger.disabled = False


async def run_messages(
    request: bytes, messages: list[dict[str, Any]], uvicorns: bool
) -> tuple[bytes, str | None, bool, bool, bool | None]:
    """Send `messages` on the cycle of `request`; what was written, the error, and the state."""
    config = uvicorn.Config(never_answers, http=ProxyHttpProtocol, lifespan="off", access_log=False)
    protocol = ProxyHttpProtocol(
        config=config, server_state=ServerState(), app_state={}, _loop=asyncio.get_running_loop()
    )
    transport = RecordingTransport()
    protocol.connection_made(transport)  # type: ignore[arg-type]
    protocol.data_received(request)
    cycle = protocol.cycle
    assert type(cycle) is _ProxyCycle
    if uvicorns:
        cycle.__class__ = RequestResponseCycle
    error = None
    try:
        for message in messages:
            await cycle.send(message)
    except (RuntimeError, ValueError) as failure:
        error = f"{type(failure).__name__}: {failure}"
    await asyncio.sleep(0)  # the joined writes leave at the end of the turn
    for task in protocol.tasks:
        task.cancel()
    await asyncio.gather(*protocol.tasks, return_exceptions=True)
    return transport.written(), error, cycle.keep_alive, transport.closed, cycle.chunked_encoding


def both(request: bytes, messages: list[dict[str, Any]]) -> tuple[Any, Any]:
    async def run() -> tuple[Any, Any]:
        ours = await run_messages(request, messages, uvicorns=False)
        theirs = await run_messages(request, messages, uvicorns=True)
        return ours, theirs

    return asyncio.run(run())


NAMES = st.sampled_from(
    [
        b"content-type",
        b"Content-Length",
        b"content-length",
        b"Transfer-Encoding",
        b"connection",
        b"Connection",
        b"x-request-id",
        b"X-RateLimit-Remaining",
        b"bad name",
        b"bad(name",
        b"b\x7fd",
        b"\xc3\xa9t\xc3\xa9",
    ]
) | st.binary(min_size=1, max_size=6)
VALUES = st.sampled_from(
    [
        b"application/json",
        b"chunked",
        b"CHUNKED",
        b"close",
        b"keep-alive, Close",
        b"5",
        b"0",
        b"12",
        b"a\tb",
        b"a\r\nb",
        b"\x00",
        b"caf\xe9",
        b"",
        b"x5",
    ]
) | st.binary(max_size=6)
BODIES = st.lists(st.sampled_from([b"", b"hello", b"12345", b"x" * 7]), max_size=3)


@given(
    method=st.sampled_from(["GET", "POST", "HEAD"]),
    client_close=st.booleans(),
    status=st.sampled_from([200, 201, 400, 404, 429, 500, 502]),
    headers=st.lists(st.tuples(NAMES, VALUES), max_size=6),
    bodies=BODIES,
    last_more=st.booleans(),
)
def test_the_same_bytes_errors_and_state_as_uvicorns_send(
    method: str,
    client_close: bool,
    status: int,
    headers: list[tuple[bytes, bytes]],
    bodies: list[bytes],
    last_more: bool,
) -> None:
    request = f"{method} /v1/x HTTP/1.1\r\nHost: p\r\n".encode()
    request += b"Connection: close\r\n\r\n" if client_close else b"\r\n"
    messages: list[dict[str, Any]] = [
        {"type": "http.response.start", "status": status, "headers": headers}
    ]
    for index, body in enumerate(bodies):
        more = index < len(bodies) - 1 or last_more
        messages.append({"type": "http.response.body", "body": body, "more_body": more})
    ours, theirs = both(request, messages)
    assert ours == theirs


@pytest.mark.parametrize(
    ("messages", "error"),
    [
        ([{"type": "http.response.body", "body": b""}], "Expected ASGI message"),
        (
            [
                {"type": "http.response.start", "status": 200, "headers": []},
                {"type": "http.response.start", "status": 200, "headers": []},
            ],
            "Expected ASGI message 'http.response.body'",
        ),
        (
            [
                {"type": "http.response.start", "status": 200, "headers": []},
                {"type": "http.response.body", "body": b"", "more_body": False},
                {"type": "http.response.body", "body": b""},
            ],
            "after response already completed",
        ),
        (
            [{"type": "http.response.start", "status": 200, "headers": [(b"x", b"a\nb")]}],
            "Invalid HTTP header value.",
        ),
        (
            [{"type": "http.response.start", "status": 200, "headers": [(b"x y", b"v")]}],
            "Invalid HTTP header name.",
        ),
    ],
)
def test_out_of_order_messages_and_bad_headers_fail_as_under_uvicorn(
    messages: list[dict[str, Any]], error: str
) -> None:
    ours, theirs = both(b"POST /v1/x HTTP/1.1\r\nHost: p\r\n\r\n", messages)
    assert ours == theirs
    assert ours[1] is not None
    assert error in ours[1]


def test_a_forwarded_answer_is_written_as_uvicorn_writes_it() -> None:
    headers = [
        (b"Content-Type", b"application/json"),
        (b"Content-Length", b"2"),
        (b"x-llmproxy-request-id", b"abc"),
    ]
    messages = [
        {"type": "http.response.start", "status": 200, "headers": headers},
        {"type": "http.response.body", "body": b"ok", "more_body": False},
    ]
    ours, theirs = both(b"POST /v1/x HTTP/1.1\r\nHost: p\r\n\r\n", messages)
    assert ours == theirs
    assert ours[0] == (
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n"
        b"x-llmproxy-request-id: abc\r\n\r\nok"
    )


@pytest.mark.parametrize("byte", range(256))
def test_the_byte_tables_refuse_what_uvicorns_expressions_refuse(byte: int) -> None:
    one = bytes([byte])
    assert bool(one.translate(None, FIELD_NAME_BYTES_FINE)) == bool(HEADER_RE.search(one))
    assert bool(one.translate(None, FIELD_VALUE_BYTES_FINE)) == bool(HEADER_VALUE_RE.search(one))
