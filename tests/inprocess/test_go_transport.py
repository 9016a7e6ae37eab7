"""Scenarios of Go's `net/http/transport_test.go`, ported to llmproxy's upstream client.

Each test names the Go test (or the rule in `transport.go`) it follows. Where llmproxy's client
differs from Go's Transport, the docstring says how. Real loopback sockets, scripted byte by byte
(`tests.support.scripted`); one upstream runs in a thread, so that it can reset a connection
while the test holds the event loop and the client cannot have read the reset yet.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest

from llmproxy.upstream_client import (
    ConnectionClosedError,
    Origin,
    ReadTimeoutError,
    ResponseError,
)
from tests.support import (
    DEADLINE,
    OK,
    ClientFactory,
    RawHandler,
    answer_each,
    eventually,
    fetch,
    fetch_whole,
    internals,
    read_body,
    read_request_head,
    scripted,
    until_eof,
)


def _answer_then_close_on_the_next_request(
    first: bytes = OK, *, at_once: bool = False
) -> RawHandler:
    """Answer the first request on the first connection, then close as the next one arrives
    (or, `at_once`, right after the answer).

    The idle-close race, widened: the upstream's idle timer fires exactly as a request comes in.
    Later connections answer every request with OK.
    """
    connections = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        if connections > 1:
            await answer_each(OK)(reader, writer)
            return
        await read_request_head(reader)
        writer.write(first)
        await writer.drain()
        if not at_once:
            await read_request_head(reader)
        # returning closes the connection: a FIN, no byte of an answer

    return handler


# -- retry on a reused connection ------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "headers"),
    [
        pytest.param("GET", [], id="IdempotentNoBodySomeWritten"),
        pytest.param("PUT", [], id="put-is-idempotent"),
        pytest.param("POST", [("Idempotency-Key", "k-1")], id="idempotency-key"),
        pytest.param("POST", [("X-Idempotency-Key", "k-1")], id="x-idempotency-key"),
    ],
)
async def test_a_replayable_request_on_a_reused_connection_closed_unanswered_is_retried(
    make_client: ClientFactory, method: str, headers: list[tuple[str, str]]
) -> None:
    """Go: TestRetryRequestsOnError, "IdempotentNoBodySomeWritten" (and Request.isReplayable).

    The request went out on a reused connection and the upstream closed it without a byte of an
    answer: sent again, once, on a new connection; the caller sees only the second answer.
    """
    async with scripted(_answer_then_close_on_the_next_request()) as (origin, upstream):
        client = make_client()
        assert await fetch_whole(client, origin) == b"ok"
        response = await fetch(client, origin, method, "/v1/x", headers, b"{}")
        assert response.status == 200
        assert await read_body(response) == b"ok"
        response.close()
        assert response.stale_retries == 1
        assert upstream.accepted == 2
        assert client.pool_counts() == (0, 1)


async def test_a_non_idempotent_request_written_to_a_reused_connection_is_not_retried(
    make_client: ClientFactory,
) -> None:
    """Go: transport.go, persistConn.shouldRetryRequest (a written, non-replayable request).

    The upstream may have acted on the POST before it closed: not sent again, and the error
    says what happened (the forwarder answers `502 upstream_connection_closed`).
    """
    async with scripted(_answer_then_close_on_the_next_request()) as (origin, upstream):
        client = make_client()
        assert await fetch_whole(client, origin) == b"ok"
        with pytest.raises(ConnectionClosedError, match="before answering") as caught:
            await fetch(client, origin, "POST", "/v1/chat/completions", body=b"{}")
        assert caught.value.reused
        assert not caught.value.nothing_written
        assert upstream.accepted == 1
        assert client.pool_counts() == (0, 0)


async def test_a_request_on_a_new_connection_closed_unanswered_is_not_retried(
    make_client: ClientFactory,
) -> None:
    """Go: transport.go, persistConn.shouldRetryRequest (`if !pc.isReused() { return false }`).

    A new connection closed before answering is the upstream's answer, not a stale connection.
    """

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request_head(reader)  # and closes without answering

    async with scripted(handler) as (origin, upstream):
        client = make_client()
        with pytest.raises(ConnectionClosedError) as caught:
            await fetch(client, origin)
        assert not caught.value.reused
        assert caught.value.stale_retries == 0
        assert upstream.accepted == 1


async def test_the_retry_on_a_new_connection_happens_once(make_client: ClientFactory) -> None:
    """Go: TestRetryRequestsOnError ("prevents an infinite resend loop").

    The retry goes to a new connection, so a second close before answering is final.
    """
    connections = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        await read_request_head(reader)
        if connections == 1:
            writer.write(OK)
            await writer.drain()
            await read_request_head(reader)
        # closes without answering: the second request on the first, and any on the others

    async with scripted(handler) as (origin, upstream):
        client = make_client()
        assert await fetch_whole(client, origin) == b"ok"
        with pytest.raises(ConnectionClosedError) as caught:
            await fetch(client, origin)
        assert not caught.value.reused
        assert caught.value.stale_retries == 1
        assert upstream.accepted == 2


@dataclass
class _ResettingUpstream:
    """A blocking upstream in a thread: answers one request, then resets the idle connection.

    Then it answers every request on a second connection with OK.
    """

    origin: Origin
    reset: threading.Event = field(default_factory=threading.Event)
    was_reset: threading.Event = field(default_factory=threading.Event)
    requests: list[list[bytes]] = field(default_factory=list)


def _read_head(conn: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        part = conn.recv(65536)
        if not part:
            return b""
        data += part
    return data


def _serve_then_reset(listener: socket.socket, upstream: _ResettingUpstream) -> None:
    with contextlib.suppress(OSError):  # the test failed and went, or closed the listener
        _serve_two_connections(listener, upstream)


def _serve_two_connections(listener: socket.socket, upstream: _ResettingUpstream) -> None:
    for number in range(2):
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(DEADLINE)
            upstream.requests.append([])
            while head := _read_head(conn):
                upstream.requests[number].append(head)
                conn.sendall(OK)
                if number == 0:
                    upstream.reset.wait(DEADLINE)
                    # Linger 0: the close sends a RST, so the client's next write fails at once.
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    break
        if number == 0:
            upstream.was_reset.set()


@contextlib.asynccontextmanager
async def _resetting_upstream() -> AsyncIterator[_ResettingUpstream]:
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(DEADLINE)
    port = listener.getsockname()[1]
    upstream = _ResettingUpstream(Origin.from_url(f"http://127.0.0.1:{port}"))
    thread = threading.Thread(target=_serve_then_reset, args=(listener, upstream), daemon=True)
    thread.start()
    try:
        yield upstream
    finally:
        upstream.reset.set()
        await asyncio.to_thread(thread.join, DEADLINE)  # the loop runs: connections can close
        listener.close()


@pytest.mark.parametrize(
    ("method", "body"),
    [
        pytest.param("POST", b"foo\n", id="NothingWrittenGetBody"),
        pytest.param("DELETE", b"", id="NothingWrittenNoBody"),
    ],
)
async def test_a_request_none_of_which_was_written_to_a_reused_connection_is_retried(
    make_client: ClientFactory, method: str, body: bytes
) -> None:
    """Go: TestRetryRequestsOnError, "NothingWrittenGetBody" and "NothingWrittenNoBody".

    Go fails the connection's second write on purpose; here the upstream really resets the
    idle connection, and the client writes before its event loop can have read the reset: the
    write fails at once, nothing left, so even a POST may go again on a new connection.
    """
    async with _resetting_upstream() as upstream:
        client = make_client()
        assert await fetch_whole(client, upstream.origin) == b"ok"
        upstream.reset.set()
        # Blocking the event loop on purpose: the client must not see the reset before it
        # writes, as when the upstream closes exactly as the request goes out.
        assert upstream.was_reset.wait(DEADLINE)
        response = await fetch(client, upstream.origin, method, "/v1/x", body=body)
        assert await read_body(response) == b"ok"
        response.close()
        assert response.stale_retries == 1
        await client.close()  # the upstream's thread ends with its connection
        assert len(upstream.requests[0]) == 1  # the retried request never reached it
        assert upstream.requests[1][0].startswith(f"{method} /v1/x ".encode())


# -- the idle-close race ---------------------------------------------------------------------


async def test_a_connection_the_upstream_closes_right_after_a_keep_alive_answer_is_not_reused(
    make_client: ClientFactory,
) -> None:
    """Go: TestTransportIssue10457 (a server that says keep-alive, then hangs up at once).

    Whether or not the client has read the close when the next request comes, that request is
    answered: on a new connection, or retried on one if it raced the close.
    """
    keep_alive_answer = b"HTTP/1.1 200 OK\r\nFoo: Bar\r\nContent-Length: 0\r\n\r\n"
    handler = _answer_then_close_on_the_next_request(keep_alive_answer, at_once=True)

    async with scripted(handler) as (origin, upstream):
        client = make_client()
        response = await fetch(client, origin)
        assert response.header(b"foo") == b"Bar"
        assert await read_body(response) == b""
        response.close()
        assert await fetch_whole(client, origin) == b"ok"
        assert upstream.accepted == 2


async def test_idle_connections_the_upstream_closed_are_replaced(
    make_client: ClientFactory,
) -> None:
    """Go: TestTransportServerClosingUnexpectedly (ts.CloseClientConnections, then a request)."""
    close_idle = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for _ in range(2):
            await read_request_head(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n%d" % upstream.accepted)
            await writer.drain()
        await close_idle.wait()

    async with scripted(handler) as (origin, upstream):
        client = make_client()
        first = await fetch_whole(client, origin)
        assert await fetch_whole(client, origin) == first  # one kept-alive connection
        close_idle.set()  # surprise
        await eventually(lambda: upstream.ended == 1)
        assert await fetch_whole(client, origin) != first
        assert upstream.accepted == 2


# -- informational responses -----------------------------------------------------------------


async def test_unknown_informational_responses_before_the_answer_are_ignored(
    make_client: ClientFactory,
) -> None:
    """Go: TestTransportIgnore1xxResponses (a 123 before the 200, then the server hangs up)."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request_head(reader)
        writer.write(
            b"HTTP/1.1 123 OneTwoThree\r\nFoo: bar\r\n\r\n"
            b"HTTP/1.1 200 OK\r\nBar: baz\r\nContent-Length: 5\r\n\r\nHello"
        )
        await writer.drain()

    async with scripted(handler) as (origin, _):
        client = make_client()
        response = await fetch(client, origin)
        assert response.status == 200
        assert response.raw_headers == [(b"Bar", b"baz"), (b"Content-Length", b"5")]
        assert await read_body(response) == b"Hello"
        response.close()


async def test_endless_informational_responses_are_a_response_error(
    make_client: ClientFactory,
) -> None:
    """Go: TestTransportLimits1xxResponses.

    Go counts 1xx responses (and, since Go 1.24, their header bytes); llmproxy bounds all bytes
    before the final head by the head limit.
    """

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request_head(reader)
        for _ in range(10_000):
            writer.write(b"HTTP/1.1 199 Early\r\nFoo: bar\r\n\r\n" * 100)
            await writer.drain()
        await until_eof(reader)

    async with scripted(handler) as (origin, upstream):
        client = make_client()
        with pytest.raises(ResponseError, match="head"):
            await fetch(client, origin)
        assert client.pool_counts() == (0, 0)
        await eventually(lambda: upstream.ended == 1)


async def test_switching_protocols_is_refused(make_client: ClientFactory) -> None:
    """Go: TestTransportTreat101Terminal. Go hands a 101 back as the final response; llmproxy
    forwards no upgrades over this client, so a 101 to a plain request is an error."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request_head(reader)
        writer.write(b"HTTP/1.1 101 Switching Protocols\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n")
        await writer.drain()
        await until_eof(reader)

    async with scripted(handler) as (origin, _):
        client = make_client()
        with pytest.raises(ResponseError):
            await fetch(client, origin)


# -- the response-header timeout -------------------------------------------------------------


async def test_no_response_head_within_the_read_timeout_is_a_read_timeout(
    make_client: ClientFactory,
) -> None:
    """Go: TestTransportResponseHeaderTimeout (/fast answers, /slow times out, /fast again).

    llmproxy's read timeout is also the response-header timeout: it starts once the request is
    written, and a timed-out connection is closed, never reused.
    """

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head = await read_request_head(reader)
            if head.startswith(b"GET /slow "):
                await until_eof(reader)
                return
            writer.write(OK)
            await writer.drain()

    async with scripted(handler) as (origin, upstream):
        read_timeout = 0.2
        client = make_client(read_timeout=read_timeout)
        assert await fetch_whole(client, origin) == b"ok"
        started = time.monotonic()
        with pytest.raises(ReadTimeoutError):
            await fetch(client, origin, target="/slow")
        assert read_timeout * 0.8 <= time.monotonic() - started <= DEADLINE
        assert client.pool_counts() == (0, 0)
        assert await fetch_whole(client, origin) == b"ok"
        assert upstream.accepted == 2


# -- early responses -------------------------------------------------------------------------


async def test_a_connection_answered_before_its_request_was_written_is_not_reused(
    make_client: ClientFactory,
) -> None:
    """Go: TestTransportNoReuseAfterEarlyResponse (golang.org/issue/7569).

    The upstream answers a large POST after its head and reads nothing more: the answer is
    honoured, and the next request goes to a new connection instead of queueing behind the rest
    of the body (Go waits maxWriteWaitBeforeConnReuse, 50 ms, for the write; so does llmproxy).
    """

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        if head.startswith(b"GET "):
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nbar")
            await writer.drain()
            await until_eof(reader)
            return
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nfoo")  # keep-alive
        await writer.drain()
        await writer.wait_closed()  # reads nothing more, until the end

    async with scripted(handler) as (origin, upstream):
        client = make_client()
        body = b"x" * (16 * 1024 * 1024)  # more than the sockets' buffers take
        response = await fetch(client, origin, "POST", "/", body=body)
        assert await read_body(response) == b"foo"
        assert internals(response)._transport.get_write_buffer_size() > 0  # under test
        response.close()
        response = await fetch(client, origin)
        assert await read_body(response) == b"bar"
        response.close()
        assert upstream.accepted == 2


async def test_an_answer_that_arrives_while_the_request_is_written_is_returned(
    make_client: ClientFactory,
) -> None:
    """Go: TestTransportPrefersResponseOverWriteError (issue 11745).

    The upstream refuses a large PUT after its head and closes; the client returns the 400
    rather than an error about the write it could not finish.
    """

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()
        writer.write_eof()
        await until_eof(reader)  # reads the rest, so the close is a FIN and not a reset

    async with scripted(handler) as (origin, upstream):
        client = make_client()
        for _ in range(3):
            response = await fetch(client, origin, "PUT", "/", body=b"a" * (2 * 1024 * 1024))
            assert response.status == 400
            assert await read_body(response) == b""
            response.close()
        assert upstream.accepted == 3
