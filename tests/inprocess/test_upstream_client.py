"""The upstream HTTP/1.1 client on its own, against raw TCP upstreams whose bytes each test scripts.

Everything runs over real loopback sockets. Nothing sleeps for luck: tests wait on events with
deadlines, or poll a condition with a deadline (`eventually`); the only sleeps are an upstream's
scripted pacing and one deliberate blocking of the event loop, each commented where it is.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import ssl
import struct
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import trustme

from llmproxy import upstream_client
from llmproxy.upstream_client import (
    MAX_HEAD_BYTES,
    MAX_TRAILER_BYTES,
    ConnectFailedError,
    ConnectionClosedError,
    ConnectTimeoutError,
    Origin,
    ReadTimeoutError,
    ResponseError,
    UnsendableRequestError,
    UpstreamClient,
)
from tests.support import (
    DEADLINE,
    OK,
    ClientFactory,
    Upstream,
    answer_each,
    eventually,
    fetch,
    fetch_whole,
    free_port,
    internals,
    read_body,
    read_request_head,
    scripted,
    until_eof,
)
from tests.support import RawHandler as Handler

# -- origins -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://example.com/v1", Origin("http", "example.com", 80, "example.com")),
        ("http://example.com:8080/v1", Origin("http", "example.com", 8080, "example.com:8080")),
        ("https://api.example.com/v1", Origin("https", "api.example.com", 443, "api.example.com")),
        (
            "https://api.example.com:80/",
            Origin("https", "api.example.com", 80, "api.example.com:80"),
        ),
        ("http://[::1]:9000/v1", Origin("http", "::1", 9000, "[::1]:9000")),
        ("https://[::1]/v1", Origin("https", "::1", 443, "[::1]")),
    ],
)
def test_origin_from_url_shows_the_port_in_host_only_when_not_the_default(
    url: str, expected: Origin
) -> None:
    assert Origin.from_url(url) == expected


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (
            "https://b\u00fccher.example/v1",
            Origin("https", "xn--bcher-kva.example", 443, "xn--bcher-kva.example"),
        ),
        (
            "http://B\u00dcCHER.example:8080/v1",  # urlsplit lowercases the host first
            Origin("http", "xn--bcher-kva.example", 8080, "xn--bcher-kva.example:8080"),
        ),
        (
            "https://\u4f8b\u3048.\u30c6\u30b9\u30c8/",
            Origin("https", "xn--r8jz45g.xn--zckzah", 443, "xn--r8jz45g.xn--zckzah"),
        ),
        (  # already an A-label: unchanged
            "https://xn--bcher-kva.example/",
            Origin("https", "xn--bcher-kva.example", 443, "xn--bcher-kva.example"),
        ),
    ],
)
def test_an_internationalised_host_name_is_used_in_its_idna_form(
    url: str, expected: Origin
) -> None:
    assert Origin.from_url(url) == expected


def test_a_host_name_idna_cannot_encode_is_refused() -> None:
    with pytest.raises(ValueError, match="not a valid host name"):
        Origin.from_url("https://" + "\u00fc" * 64 + ".example/")  # a label over 63 bytes


async def test_the_idna_host_name_is_what_is_resolved_and_sent_as_sni(
    make_client: ClientFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    loop = asyncio.get_running_loop()
    seen: list[tuple[Any, ...]] = []

    async def record_then_refuse(*args: Any, **kwargs: Any) -> Any:
        seen.append((args[1], kwargs.get("server_hostname")))
        raise ConnectionRefusedError("refused by the test")

    monkeypatch.setattr(loop, "create_connection", record_then_refuse)
    client = make_client()
    with pytest.raises(ConnectFailedError):
        await fetch(client, Origin.from_url("https://b\u00fccher.example/v1"))
    assert seen == [("xn--bcher-kva.example", "xn--bcher-kva.example")]


@pytest.mark.parametrize("url", ["ftp://example.com/", "example.com/v1", "http:///v1"])
def test_origin_from_url_refuses_what_is_not_an_http_url(url: str) -> None:
    with pytest.raises(ValueError, match="not an http"):
        Origin.from_url(url)


# -- 1. bodies and the request on the wire -----------------------------------------------------


async def test_a_content_length_body_is_read_whole(make_client: ClientFactory) -> None:
    async with scripted(
        answer_each(b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\nX-Answer: 42\r\n\r\nhello world")
    ) as (origin, _):
        client = make_client()
        response = await fetch(client, origin)
        assert response.status == 200
        assert response.raw_headers == [(b"Content-Length", b"11"), (b"X-Answer", b"42")]
        assert response.header(b"x-answer") == b"42"
        assert response.headers_as_text() == {"content-length": "11", "x-answer": "42"}
        assert await read_body(response) == b"hello world"
        assert await response.read_chunk() == b""  # and stays ended
        response.close()


async def test_a_chunked_body_arriving_in_separate_writes_is_de_chunked(
    make_client: ClientFactory,
) -> None:
    pieces = [b"alpha", b"beta-beta", b"gamma" * 20]
    go: asyncio.Queue[None] = asyncio.Queue()  # the test lets each write out in turn

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        await writer.drain()
        for number, piece in enumerate(pieces):
            await go.get()
            extension = b";name=value" if number == 1 else b""  # chunk extensions are not body
            writer.write(b"%x%s\r\n%s\r\n" % (len(piece), extension, piece))
            await writer.drain()
        await go.get()
        writer.write(b"0\r\nX-Trailer: not body\r\n\r\n")
        await writer.drain()
        await until_eof(reader)

    async with scripted(handler) as (origin, _):
        client = make_client()
        response = await fetch(client, origin)
        assert response.header(b"transfer-encoding") == b"chunked"
        received = []
        for _ in pieces:
            go.put_nowait(None)
            async with asyncio.timeout(DEADLINE):
                received.append(await response.read_chunk())
        go.put_nowait(None)
        async with asyncio.timeout(DEADLINE):
            assert await response.read_chunk() == b""
        assert received == pieces
        assert response.raw_headers == [(b"Transfer-Encoding", b"chunked")]  # no trailer joined
        response.close()
        assert client.pool_counts() == (0, 1)  # a whole chunked body leaves a reusable connection


def _content_length(head: bytes) -> int:
    found = re.search(rb"\r\ncontent-length: *(\d+)\r\n", head, re.IGNORECASE)
    return int(found.group(1)) if found else 0


async def test_the_request_goes_out_byte_for_byte(make_client: ClientFactory) -> None:
    requests: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            requests.append(head + await reader.readexactly(_content_length(head)))
            writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
            await writer.drain()

    big_body = bytes(range(256)) * 400  # over the size sent in the same write as the head
    async with scripted(handler) as (origin, upstream):
        host = f"127.0.0.1:{origin.port}".encode()
        assert origin.host_header == host.decode()
        cases: list[tuple[str, str, list[tuple[str, str]], bytes, bytes]] = [
            (
                "POST",
                "/v1/chat/completions?a=1&b=%20",
                [
                    ("Content-Type", "application/json"),
                    ("Authorization", "Bearer sk-test"),
                    ("x-lower", "v"),
                    ("X-Name", "caf\u00c3\u00a9"),  # latin-1 text of the UTF-8 bytes
                ],
                b'{"model":"m"}',
                b"POST /v1/chat/completions?a=1&b=%20 HTTP/1.1\r\nHost: " + host + b"\r\n"
                b"Content-Type: application/json\r\nAuthorization: Bearer sk-test\r\n"
                b"x-lower: v\r\nX-Name: caf\xc3\xa9\r\nContent-Length: 13\r\n\r\n"
                b'{"model":"m"}',
            ),
            (
                "POST",
                "/v1/empty",
                [],
                b"",
                b"POST /v1/empty HTTP/1.1\r\nHost: " + host + b"\r\nContent-Length: 0\r\n\r\n",
            ),
            (
                "GET",
                "/v1/models",
                [("Accept", "*/*")],
                b"",
                b"GET /v1/models HTTP/1.1\r\nHost: " + host + b"\r\nAccept: */*\r\n\r\n",
            ),
            (
                "PUT",
                "/v1/files/big",
                [],
                big_body,
                b"PUT /v1/files/big HTTP/1.1\r\nHost: " + host + b"\r\n"
                b"Content-Length: 102400\r\n\r\n" + big_body,
            ),
        ]
        client = make_client()
        for method, target, headers, body, _ in cases:
            response = await fetch(client, origin, method, target, headers, body)
            assert response.status == 204
            assert await read_body(response) == b""
            response.close()
        assert requests == [expected for *_, expected in cases]
        assert upstream.accepted == 1


# -- 2. keep-alive -----------------------------------------------------------------------------


async def test_sequential_requests_to_one_origin_share_one_connection(
    make_client: ClientFactory,
) -> None:
    async with scripted(answer_each(OK)) as (origin, upstream):
        client = make_client()
        for _ in range(3):
            response = await fetch(client, origin)
            assert client.pool_counts() == (1, 0)
            assert await read_body(response) == b"ok"
            response.close()
            assert client.pool_counts() == (0, 1)
        assert upstream.accepted == 1


@pytest.mark.parametrize(
    "answer",
    [
        pytest.param(
            b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok",
            id="connection-close",
        ),
        pytest.param(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok", id="http-1.0"),
    ],
)
async def test_a_connection_the_upstream_will_not_keep_is_not_reused(
    make_client: ClientFactory, answer: bytes
) -> None:
    async with scripted(answer_each(answer)) as (origin, upstream):
        client = make_client()
        for _ in range(2):
            assert await fetch_whole(client, origin) == b"ok"
            assert client.pool_counts() == (0, 0)
        assert upstream.accepted == 2
        await eventually(lambda: upstream.ended == 2)


async def test_closing_a_response_before_its_body_ends_aborts_the_connection(
    make_client: ClientFactory,
) -> None:
    first_gone = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await read_request_head(reader)
        if head.startswith(b"GET /partial "):
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n01234")
            await writer.drain()
            await until_eof(reader)
            first_gone.set()
            return
        writer.write(OK)
        await writer.drain()
        await until_eof(reader)

    async with scripted(handler) as (origin, upstream):
        client = make_client()
        response = await fetch(client, origin, target="/partial")
        async with asyncio.timeout(DEADLINE):
            assert await response.read_chunk() == b"01234"
        response.close()  # five bytes still to come: the connection cannot carry another request
        assert client.pool_counts() == (0, 0)
        async with asyncio.timeout(DEADLINE):
            await first_gone.wait()
        second = await fetch(client, origin)
        assert await read_body(second) == b"ok"
        second.close()
        assert upstream.accepted == 2


async def test_a_body_received_whole_but_left_unread_while_paused_leaves_a_working_connection(
    make_client: ClientFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A small stand-in for a large body that arrives whole while the consumer reads nothing
    # (a retried 503 with a big body, say): any buffered byte pauses reading here.
    monkeypatch.setattr(upstream_client, "_PAUSE_ABOVE", 0)
    monkeypatch.setattr(upstream_client, "_RESUME_BELOW", 1)
    async with scripted(
        answer_each(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n0123456789")
    ) as (origin, upstream):
        client = make_client(read_timeout=DEADLINE / 2)
        first = await fetch(client, origin)
        connection = internals(first)
        assert connection._complete  # the situation under test: all in, reading paused
        assert connection._paused
        first.close()  # unread, but whole on the wire: the connection may be reused...
        assert client.pool_counts() == (0, 1)
        second = await fetch(client, origin)  # ...and must then read again
        assert await read_body(second) == b"0123456789"
        second.close()
        assert upstream.accepted == 1


# -- 3. bodies delimited by the connection's close -----------------------------------------------


@pytest.mark.parametrize(
    "head",
    [
        pytest.param(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n", id="no-length"),
        pytest.param(b"HTTP/1.0 200 OK\r\n\r\n", id="http-1.0"),
        # RFC 9112 §6.3: a response whose last transfer coding is not chunked ends at the close.
        pytest.param(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: identity\r\n\r\n", id="te-identity"),
    ],
)
async def test_a_body_delimited_by_the_close_is_delivered_whole(
    make_client: ClientFactory, head: bytes
) -> None:
    parts = [b"first part, ", b"second part, ", b"last part"]

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request_head(reader)
        writer.write(head)
        for part in parts:
            writer.write(part)
            await writer.drain()
        # returning closes the connection: that is the body's end

    async with scripted(handler) as (origin, _):
        client = make_client()
        response = await fetch(client, origin)
        assert response.status == 200
        assert await read_body(response) == b"".join(parts)
        response.close()
        assert client.pool_counts() == (0, 0)  # a closed connection is not pooled


async def test_a_close_delimited_body_cut_by_a_reset_is_a_response_error(
    make_client: ClientFactory,
) -> None:
    may_reset = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\npartial bo")
        await writer.drain()
        await may_reset.wait()
        # Linger 0: closing sends a RST, not the FIN that would end this body cleanly.
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()

    async with scripted(handler) as (origin, _):
        client = make_client()
        response = await fetch(client, origin)
        may_reset.set()
        received: list[bytes] = []
        with pytest.raises(ResponseError):
            await read_body(response, into=received)
        assert b"partial bo".startswith(b"".join(received))
        response.close()
        assert client.pool_counts() == (0, 0)


async def test_a_content_length_body_cut_by_the_close_is_a_response_error(
    make_client: ClientFactory,
) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n01234")
        await writer.drain()  # and close, five bytes short

    async with scripted(handler) as (origin, _):
        client = make_client()
        response = await fetch(client, origin)
        with pytest.raises(ResponseError, match="mid-body"):
            await read_body(response)
        response.close()


# -- 4. informational responses ----------------------------------------------------------------


@pytest.mark.parametrize("separate_writes", [False, True], ids=["one-write", "separate-writes"])
async def test_informational_responses_before_the_final_one_are_skipped(
    make_client: ClientFactory, separate_writes: bool
) -> None:
    answers = [
        b"HTTP/1.1 100 Continue\r\n\r\n",
        b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n",
        b"HTTP/1.1 201 Created\r\nContent-Length: 4\r\nX-Final: yes\r\n\r\nbody",
    ]

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_request_head(reader)
            if separate_writes:
                for answer in answers:
                    writer.write(answer)
                    await writer.drain()
            else:
                writer.write(b"".join(answers))
                await writer.drain()

    async with scripted(handler) as (origin, upstream):
        client = make_client()
        for _ in range(2):
            response = await fetch(client, origin, "POST", body=b"{}")
            assert response.status == 201
            assert response.raw_headers == [(b"Content-Length", b"4"), (b"X-Final", b"yes")]
            assert await read_body(response) == b"body"
            response.close()
        assert upstream.accepted == 1


INTERIM = b"HTTP/1.1 100 Continue\r\n\r\n"


async def test_an_interim_response_after_the_final_one_in_the_same_read_closes_the_connection(
    make_client: ClientFactory,
) -> None:
    """Bytes after the final response's end are no answer to any request: never reused.

    llhttp parses on in the same read, and a 1xx head there was skipped like the 1xx before a
    final response, so the connection went back to the pool (a later read closed it).
    """

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_request_head(reader)
            writer.write(OK + INTERIM)  # one write of 64 bytes: one read on loopback
            await writer.drain()

    async with scripted(handler) as (origin, upstream):
        client = make_client()
        assert await fetch_whole(client, origin) == b"ok"
        await eventually(lambda: client.pool_counts() == (0, 0))
        assert await fetch_whole(client, origin) == b"ok"
        assert upstream.accepted == 2


async def test_an_interim_response_after_the_body_but_before_the_close_closes_the_connection(
    make_client: ClientFactory,
) -> None:
    """The same in a later read that comes while the response is still open (not yet closed)."""
    body_read = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request_head(reader)
        writer.write(OK)
        await writer.drain()
        await body_read.wait()
        writer.write(INTERIM)
        await writer.drain()
        await until_eof(reader)

    async with scripted(handler) as (origin, upstream):
        client = make_client()
        response = await fetch(client, origin)
        assert await read_body(response) == b"ok"
        body_read.set()
        await eventually(lambda: internals(response).closed)
        response.close()
        assert client.pool_counts() == (0, 0)
        await eventually(lambda: upstream.ended == 1)


# -- 5 and 6. responses without a body ---------------------------------------------------------


async def test_a_head_response_ends_at_its_head_whatever_its_content_length(
    make_client: ClientFactory,
) -> None:
    requests: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        requests.append(await reader.readuntil(b"\r\n\r\n"))
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n")  # and no body, as HEAD
        await writer.drain()
        await until_eof(reader)

    async with scripted(handler) as (origin, _):
        client = make_client()
        response = await fetch(client, origin, "HEAD", "/v1/files/x")
        assert response.status == 200
        assert response.header(b"content-length") == b"10"
        assert await read_body(response) == b""  # at once, not after ten bytes that never come
        response.close()
    assert requests == [
        b"HEAD /v1/files/x HTTP/1.1\r\nHost: " + origin.host_header.encode() + b"\r\n\r\n"
    ]


@pytest.mark.parametrize(
    ("answer", "status"),
    [
        (b"HTTP/1.1 204 No Content\r\nX-A: 1\r\n\r\n", 204),
        (b'HTTP/1.1 304 Not Modified\r\nETag: "v1"\r\n\r\n', 304),
    ],
    ids=["204", "304"],
)
async def test_204_and_304_end_at_their_head_and_keep_the_connection(
    make_client: ClientFactory, answer: bytes, status: int
) -> None:
    async with scripted(answer_each(answer)) as (origin, upstream):
        client = make_client()
        for _ in range(2):
            response = await fetch(client, origin)
            assert response.status == status
            assert await read_body(response) == b""
            response.close()
            assert client.pool_counts() == (0, 1)
        assert upstream.accepted == 1


# -- 7. errors ---------------------------------------------------------------------------------


async def test_a_refused_connection_is_a_connect_failure_not_a_timeout(
    make_client: ClientFactory,
) -> None:
    client = make_client()
    origin = Origin.from_url(f"http://127.0.0.1:{free_port()}/v1")
    with pytest.raises(ConnectFailedError) as caught:
        await fetch(client, origin)
    assert not isinstance(caught.value, ConnectTimeoutError)
    assert client.pool_counts() == (0, 0)


@contextlib.contextmanager
def listener_with_a_full_backlog() -> Iterator[int]:
    """A port whose accept queue is full: Linux drops further SYNs, so connecting hangs."""
    listener = socket.socket()
    fillers: list[socket.socket] = []
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port: int = listener.getsockname()[1]
        for _ in range(8):  # a backlog of 0 holds one or two; the rest are left in SYN_SENT
            filler = socket.socket()
            fillers.append(filler)
            filler.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                filler.connect(("127.0.0.1", port))
        yield port
    finally:
        for filler in fillers:
            filler.close()
        listener.close()


async def test_a_connection_not_accepted_in_time_is_a_connect_timeout(
    make_client: ClientFactory,
) -> None:
    # Not a non-routable address such as 10.255.255.1: where outbound connections are
    # intercepted (as in the sandbox this was written in) it connects at once. A full
    # backlog on loopback leaves the SYN unanswered wherever Linux runs the test.
    client = make_client(connect_timeout=0.2)
    with listener_with_a_full_backlog() as port:
        started = time.monotonic()
        with pytest.raises(ConnectTimeoutError):
            await fetch(client, Origin.from_url(f"http://127.0.0.1:{port}"))
        elapsed = time.monotonic() - started
    assert 0.15 <= elapsed <= DEADLINE
    assert client.pool_counts() == (0, 0)


@pytest.mark.parametrize(
    ("answer", "then_close"),
    [
        pytest.param(b"", True, id="closed-before-answering"),
        pytest.param(b"HTTP/1.1 200 OK\r\nContent-Le", True, id="head-cut-by-close"),
        # The upstream keeps these connections open: the client must see the error by itself.
        pytest.param(b"SSH-2.0-OpenSSH_9.6\r\n\r\n", False, id="not-http"),
        pytest.param(b"HTTP/1.1 200 OK\r\nContent-Length: many\r\n\r\n", False, id="bad-length"),
        pytest.param(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\n\r\n\x81\x05hello",
            False,
            id="upgrade",
        ),
    ],
)
async def test_an_answer_that_is_not_an_http_response_is_a_response_error(
    make_client: ClientFactory, answer: bytes, then_close: bool
) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request_head(reader)
        writer.write(answer)
        await writer.drain()
        if not then_close:
            await until_eof(reader)

    async with scripted(handler) as (origin, upstream):
        client = make_client()
        with pytest.raises(ResponseError):
            await fetch(client, origin)
        assert client.pool_counts() == (0, 0)
        await eventually(lambda: upstream.ended == 1)


@pytest.mark.parametrize(
    "status_line",
    [b"HTTP/1.1 000 Zero", b"HTTP/1.1 099 Odd", b"HTTP/1.1 600 Odd", b"HTTP/1.1 999 Odd"],
    ids=["000", "099", "600", "999"],
)
async def test_a_status_code_outside_100_to_599_is_a_response_error(
    make_client: ClientFactory, status_line: bytes
) -> None:
    """RFC 9110 §15: codes outside 100-599 are invalid (llhttp takes any three digits)."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request_head(reader)
        writer.write(status_line + b"\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        await until_eof(reader)  # the connection stays open: the client must refuse by itself

    async with scripted(handler) as (origin, upstream):
        client = make_client()
        with pytest.raises(ResponseError, match="status"):
            await fetch(client, origin)
        assert client.pool_counts() == (0, 0)
        await eventually(lambda: upstream.ended == 1)


@pytest.mark.parametrize("status", [100, 199, 200, 599])
async def test_the_status_codes_at_the_ends_of_100_to_599_are_accepted(
    make_client: ClientFactory, status: int
) -> None:
    interim = b"HTTP/1.1 %d Interim\r\n\r\n" % status if status < 200 else b""
    final = b"HTTP/1.1 %d Final\r\nContent-Length: 2\r\n\r\nok" % max(status, 200)
    async with scripted(answer_each(interim + final)) as (origin, _):
        client = make_client()
        response = await fetch(client, origin)
        assert response.status == max(status, 200)
        assert await read_body(response) == b"ok"
        response.close()


@pytest.mark.parametrize(
    "head",
    [
        pytest.param(
            b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * MAX_HEAD_BYTES + b"\r\n\r\n", id="one-header"
        ),
        pytest.param(
            b"HTTP/1.1 200 OK\r\n"
            + b"X-Many: 0123456789abcdef\r\n" * (MAX_HEAD_BYTES // 20)
            + b"\r\n",
            id="many-headers",
        ),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nX-Endless: " + b"a" * (4 * MAX_HEAD_BYTES), id="unterminated"
        ),
    ],
)
async def test_a_response_head_over_the_limit_is_a_response_error(
    make_client: ClientFactory, head: bytes
) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request_head(reader)
        writer.write(head)
        await writer.drain()
        await until_eof(reader)  # the connection stays open: only the limit can end this

    async with scripted(handler) as (origin, upstream):
        client = make_client()
        with pytest.raises(ResponseError, match="head"):
            await fetch(client, origin)
        assert client.pool_counts() == (0, 0)
        await eventually(lambda: upstream.ended == 1)


# -- 8. read timeouts --------------------------------------------------------------------------


async def test_silence_before_the_head_is_a_read_timeout(make_client: ClientFactory) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request_head(reader)
        await until_eof(reader)

    async with scripted(handler) as (origin, upstream):
        client = make_client(read_timeout=0.3)
        started = time.monotonic()
        with pytest.raises(ReadTimeoutError):
            await fetch(client, origin)
        elapsed = time.monotonic() - started
        assert 0.25 <= elapsed <= DEADLINE
        assert client.pool_counts() == (0, 0)
        await eventually(lambda: upstream.ended == 1)


async def test_silence_mid_body_is_a_read_timeout(make_client: ClientFactory) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n01234")
        await writer.drain()
        await until_eof(reader)

    async with scripted(handler) as (origin, _):
        client = make_client(read_timeout=0.3)
        response = await fetch(client, origin)
        async with asyncio.timeout(DEADLINE):
            assert await response.read_chunk() == b"01234"
        started = time.monotonic()
        with pytest.raises(ReadTimeoutError):
            async with asyncio.timeout(DEADLINE):
                await response.read_chunk()
        assert 0.2 <= time.monotonic() - started <= DEADLINE
        response.close()
        assert client.pool_counts() == (0, 0)


async def test_the_read_timeout_is_between_bytes_not_for_the_whole_body(
    make_client: ClientFactory,
) -> None:
    read_timeout = 0.6
    pieces = [b"piece %d;" % n for n in range(6)]

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        await writer.drain()
        for piece in pieces:
            await asyncio.sleep(0.15)  # the upstream's scripted pace, well within the timeout
            writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            await writer.drain()
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        await until_eof(reader)

    async with scripted(handler) as (origin, _):
        client = make_client(read_timeout=read_timeout)
        started = time.monotonic()
        response = await fetch(client, origin)
        assert await read_body(response) == b"".join(pieces)
        assert time.monotonic() - started > read_timeout  # longer in all than the timeout
        response.close()


async def test_a_reused_connection_times_its_own_exchange_not_the_last_ones(
    make_client: ClientFactory,
) -> None:
    """The read timer of a finished exchange stays armed for the next one on the connection
    (one timer per connection, not per request): it must time the new exchange from the new
    exchange's bytes, neither early (the old deadline) nor never."""
    read_timeout = 0.6

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n1")  # at once
        await writer.drain()
        await read_request_head(reader)
        # Scripted pace: past the first exchange's deadline, within the second one's.
        await asyncio.sleep(0.75 * read_timeout)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n2")
        await writer.drain()
        await read_request_head(reader)
        await until_eof(reader)  # the third is never answered

    async with scripted(handler) as (origin, upstream):
        client = make_client(read_timeout=read_timeout)
        assert await fetch_whole(client, origin) == b"1"
        await asyncio.sleep(0.5 * read_timeout)  # scripted pace: half the first timer is gone
        assert await fetch_whole(client, origin) == b"2"
        started = time.monotonic()
        with pytest.raises(ReadTimeoutError):
            async with asyncio.timeout(DEADLINE):  # (a TimeoutError, not this, if never timed)
                await fetch(client, origin)
        assert read_timeout * 0.9 <= time.monotonic() - started <= DEADLINE
        assert upstream.accepted == 1


# -- 9. back-pressure --------------------------------------------------------------------------


async def test_a_consumer_that_does_not_read_pauses_the_upstream(
    make_client: ClientFactory,
) -> None:
    # Larger than what the loopback socket buffers of both ends can hold, so the upstream's
    # drain() can only finish if the client keeps reading.
    body = bytes(range(256)) * (64 * 1024)  # 16 MiB
    drained = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request_head(reader)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body))
        writer.write(body)
        await writer.drain()
        drained.set()
        await until_eof(reader)

    async with scripted(handler) as (origin, _):
        # The pause below outlasts the read timeout: a paused read is not the upstream's silence.
        client = make_client(read_timeout=0.5)
        response = await fetch(client, origin)
        connection = internals(response)
        await eventually(lambda: connection._paused)
        with pytest.raises(TimeoutError):  # the upstream stays blocked while nobody reads
            async with asyncio.timeout(0.8):
                await drained.wait()
        assert connection._paused
        assert connection._buffered < 1024 * 1024
        assert await read_body(response) == body
        assert drained.is_set()
        response.close()
        assert client.pool_counts() == (0, 1)


# -- 10. the bound on connections --------------------------------------------------------------


def _partial_or_ok() -> Handler:
    """`GET /partial` gets half a body and then silence; anything else gets `OK`."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head = await read_request_head(reader)
            if head.startswith(b"GET /partial "):
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n01234")
                await writer.drain()
                await until_eof(reader)
                return
            writer.write(OK)
            await writer.drain()

    return handler


@pytest.mark.parametrize("first_read_whole", [True, False], ids=["read-whole", "closed-early"])
async def test_a_full_pool_makes_the_next_request_wait_for_the_connection(
    make_client: ClientFactory, first_read_whole: bool
) -> None:
    async with scripted(_partial_or_ok()) as (origin, upstream):
        client = make_client(max_connections=1)
        first = await fetch(client, origin, target="/" if first_read_whole else "/partial")
        second = asyncio.create_task(fetch(client, origin))
        await eventually(lambda: client._pool._waiters)  # the second is queued for room
        assert not second.done()
        assert upstream.accepted == 1
        assert client.pool_counts() == (1, 0)
        if first_read_whole:
            assert await read_body(first) == b"ok"
        first.close()
        response = await second
        assert await read_body(response) == b"ok"
        response.close()
        assert client.pool_counts() == (0, 1)
        # The idle connection is handed over when it can be; an aborted one is replaced.
        assert upstream.accepted == (1 if first_read_whole else 2)


async def test_a_queued_request_cancelled_as_it_is_woken_passes_its_turn_on(
    make_client: ClientFactory,
) -> None:
    async with scripted(_partial_or_ok()) as (origin, _):
        client = make_client(max_connections=1)
        first = await fetch(client, origin, target="/partial")
        cancelled = asyncio.create_task(fetch(client, origin))
        await eventually(lambda: len(client._pool._waiters) == 1)
        patient = asyncio.create_task(fetch(client, origin))
        await eventually(lambda: len(client._pool._waiters) == 2)
        first.close()  # wakes the first in the queue...
        cancelled.cancel()  # ...which is cancelled before it runs
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        response = await patient
        assert await read_body(response) == b"ok"
        response.close()
        assert client.pool_counts() == (0, 1)


async def test_a_full_pool_of_idle_connections_to_other_origins_does_not_block(
    make_client: ClientFactory,
) -> None:
    async with scripted(answer_each(OK)) as (one, _), scripted(answer_each(OK)) as (other, _):
        client = make_client(max_connections=1)
        response = await fetch(client, one)
        assert await read_body(response) == b"ok"
        response.close()
        assert client.pool_counts() == (0, 1)
        response = await fetch(client, other)  # the idle one to `one` makes room
        assert await read_body(response) == b"ok"
        response.close()
        assert client.pool_counts() == (0, 1)


# -- 11 and 12. idle connections ---------------------------------------------------------------


async def test_a_connection_idle_past_the_keepalive_is_closed_not_reused(
    make_client: ClientFactory,
) -> None:
    async with scripted(answer_each(OK)) as (origin, upstream):
        client = make_client(keepalive=0.2)
        assert client.pool_counts() == (0, 0)
        response = await fetch(client, origin)
        assert client.pool_counts() == (1, 0)
        assert await read_body(response) == b"ok"
        response.close()
        idle_from = time.monotonic()
        assert client.pool_counts() == (0, 1)
        await eventually(lambda: upstream.ended == 1)  # the client closed it, idle too long
        assert time.monotonic() - idle_from >= 0.15
        assert client.pool_counts() == (0, 0)
        response = await fetch(client, origin)
        assert client.pool_counts() == (1, 0)
        assert await read_body(response) == b"ok"
        response.close()
        assert client.pool_counts() == (0, 1)
        assert upstream.accepted == 2


async def test_an_expired_idle_connection_is_not_handed_out_before_the_sweep(
    make_client: ClientFactory,
) -> None:
    async with scripted(answer_each(OK)) as (origin, upstream):
        client = make_client(keepalive=0.2)
        assert await fetch_whole(client, origin) == b"ok"
        # Blocking the event loop on purpose: the pool's sweep cannot run, so only the check
        # made when a connection is taken stands between this request and a stale connection.
        time.sleep(0.3)  # noqa: ASYNC251
        assert await fetch_whole(client, origin) == b"ok"
        assert upstream.accepted == 2
        assert client.pool_counts() == (0, 1)


async def test_a_pooled_connection_the_upstream_closed_is_not_handed_out(
    make_client: ClientFactory,
) -> None:
    may_close = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request_head(reader)
        writer.write(OK)  # keep-alive, as far as the client can tell
        await writer.drain()
        if upstream.accepted == 1:
            await may_close.wait()
            return  # closes the connection while it sits idle in the pool
        await until_eof(reader)

    async with scripted(handler) as (origin, upstream):
        client = make_client()
        assert await fetch_whole(client, origin) == b"ok"
        assert client.pool_counts() == (0, 1)
        may_close.set()
        await eventually(lambda: client.pool_counts() == (0, 0))  # the client saw the close
        assert await fetch_whole(client, origin) == b"ok"
        assert upstream.accepted == 2


async def test_bytes_from_the_upstream_between_exchanges_close_the_connection(
    make_client: ClientFactory,
) -> None:
    may_send = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request_head(reader)
        writer.write(OK)
        await writer.drain()
        await may_send.wait()
        writer.write(OK)  # an answer to no request
        await writer.drain()
        await until_eof(reader)

    async with scripted(handler) as (origin, upstream):
        client = make_client()
        assert await fetch_whole(client, origin) == b"ok"
        assert client.pool_counts() == (0, 1)
        may_send.set()
        await eventually(lambda: upstream.ended == 1)
        assert client.pool_counts() == (0, 0)


# -- 13 and 14. closing the client, cancelling a request ---------------------------------------


async def test_closing_the_client_aborts_idle_and_busy_connections(
    make_client: ClientFactory,
) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head = await read_request_head(reader)
            if head.startswith(b"GET /idle "):
                writer.write(OK)
                await writer.drain()
                continue
            if head.startswith(b"GET /mid-body "):
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n01234")
                await writer.drain()
            await until_eof(reader)  # /silent gets nothing
            return

    async with scripted(handler) as (origin, upstream):
        client = make_client()
        mid_body = await fetch(client, origin, target="/mid-body")
        async with asyncio.timeout(DEADLINE):
            assert await mid_body.read_chunk() == b"01234"
        awaiting_head = asyncio.create_task(fetch(client, origin, target="/silent"))
        await eventually(lambda: upstream.accepted == 2)
        idle = await fetch(client, origin, target="/idle")  # a third connection: two are busy
        assert await read_body(idle) == b"ok"
        idle.close()
        assert upstream.accepted == 3
        assert client.pool_counts() == (2, 1)
        awaiting_body = asyncio.create_task(mid_body.read_chunk())

        await client.close()

        assert client.pool_counts() == (0, 0)
        await eventually(lambda: upstream.ended == 3)
        # Those waiting on a connection learn it is gone rather than wait forever.
        with pytest.raises(ResponseError):
            await asyncio.wait_for(awaiting_body, DEADLINE)
        with pytest.raises(ResponseError):
            await asyncio.wait_for(awaiting_head, DEADLINE)
        mid_body.close()
        with pytest.raises(ConnectFailedError):
            await fetch(client, origin)
        assert upstream.accepted == 3


async def test_cancelling_a_request_awaiting_its_head_closes_the_connection(
    make_client: ClientFactory,
) -> None:
    request_seen = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request_head(reader)
        request_seen.set()
        await until_eof(reader)  # never answers

    async with scripted(handler) as (origin, upstream):
        client = make_client()
        task = asyncio.create_task(fetch(client, origin, "POST", "/v1/chat/completions"))
        async with asyncio.timeout(DEADLINE):
            await request_seen.wait()
        assert client.pool_counts() == (1, 0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await eventually(lambda: upstream.ended == 1)  # the upstream saw the connection close
        assert client.pool_counts() == (0, 0)


# -- what is never written ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "headers"),
    [
        ("/", [("x-a", "1\r\nx-injected: 1")]),
        ("/", [("x-a", "bare\nline feed")]),
        ("/", [("x-a", "bare\rcarriage return")]),
        ("/ HTTP/1.1\r\nx-injected: 1\r\nx-b:", []),
    ],
)
async def test_a_line_break_in_a_header_or_the_target_is_never_written(
    make_client: ClientFactory, target: str, headers: list[tuple[str, str]]
) -> None:
    async with scripted(answer_each(OK)) as (origin, upstream):
        client = make_client()
        with pytest.raises(UnsendableRequestError):
            await fetch(client, origin, "POST", target, headers, b"{}")
        assert upstream.accepted == 0  # refused before any connection was made
        response = await fetch(client, origin, "POST", "/", [("x-a", "fine")], b"{}")
        assert await read_body(response) == b"ok"
        response.close()


# -- TLS -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def certificate_authority() -> trustme.CA:
    return trustme.CA()


@contextlib.asynccontextmanager
async def tls_upstream(ca: trustme.CA) -> AsyncIterator[tuple[Origin, Upstream]]:
    """An upstream on 127.0.0.1 speaking TLS with a certificate `ca` issued for that address."""
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_context)
    seen = Upstream()

    async def on_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.accepted += 1
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
            while True:
                await read_request_head(reader)
                writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
                writer.write(b"3\r\ntls\r\n0\r\n\r\n")
                await writer.drain()
        writer.close()

    server = await asyncio.start_server(on_connection, "127.0.0.1", 0, ssl=server_context)
    port = server.sockets[0].getsockname()[1]
    try:
        yield Origin("https", "127.0.0.1", port, f"127.0.0.1:{port}"), seen
    finally:
        server.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(server.wait_closed(), timeout=DEADLINE)


async def test_https_upstream_answers_over_tls_and_keeps_the_connection(
    make_client: ClientFactory, certificate_authority: trustme.CA
) -> None:
    trusting = ssl.create_default_context()
    certificate_authority.configure_trust(trusting)
    async with tls_upstream(certificate_authority) as (origin, upstream):
        client = make_client(ssl_context=trusting)
        for _ in range(2):
            response = await fetch(client, origin, "POST", "/v1/x", [], b"{}")
            assert response.status == 200
            assert await read_body(response) == b"tls"
            response.close()
        assert upstream.accepted == 1


async def test_an_upstream_certificate_nobody_trusts_is_a_connect_failure(
    make_client: ClientFactory, certificate_authority: trustme.CA
) -> None:
    async with tls_upstream(certificate_authority) as (origin, _):
        client = make_client()  # the system's trust store, which does not know this CA
        with pytest.raises(ConnectFailedError, match="certificate"):
            await fetch(client, origin)


async def test_a_connection_made_while_the_client_closes_is_dropped_not_used(
    make_client: ClientFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    loop = asyncio.get_running_loop()
    connect = loop.create_connection
    connected = asyncio.Event()
    proceed = asyncio.Event()

    async def connect_then_hold(*args: Any, **kwargs: Any) -> Any:
        made = await connect(*args, **kwargs)
        connected.set()
        await proceed.wait()  # the client closes while the connection is being made
        return made

    monkeypatch.setattr(loop, "create_connection", connect_then_hold)
    async with scripted(answer_each(OK)) as (origin, upstream):
        client = make_client()
        request = asyncio.create_task(fetch(client, origin))
        async with asyncio.timeout(DEADLINE):
            await connected.wait()
        await client.close()
        proceed.set()
        with pytest.raises(ConnectFailedError):
            await request
        await eventually(lambda: upstream.ended == upstream.accepted == 1)
        assert client.pool_counts() == (0, 0)


# -- issue 10: reuse, writes still going out, trailers, transfer codings -------------------------


async def test_a_connection_whose_fin_was_read_is_not_handed_out_in_the_same_loop_turn(
    make_client: ClientFactory,
) -> None:
    """The upstream's FIN marks the connection unusable at once, not a turn later."""
    may_close = asyncio.Event()
    requests_per_connection: list[int] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        number = len(requests_per_connection)
        requests_per_connection.append(0)
        while True:
            await read_request_head(reader)
            requests_per_connection[number] += 1
            writer.write(OK)
            await writer.drain()
            if number == 0:
                await may_close.wait()
                return  # a FIN while the connection sits idle in the pool

    async with scripted(handler) as (origin, upstream):
        client = make_client()
        assert await fetch_whole(client, origin) == b"ok"
        (connection,) = client._pool._idle[origin]
        eof_read = asyncio.get_running_loop().create_future()
        read_eof = connection.eof_received

        def spy() -> bool | None:
            keep_open = read_eof()
            eof_read.set_result(None)  # wakes this test before `connection_lost` is called
            return keep_open

        connection.eof_received = spy  # type: ignore[method-assign]  # a spy on this one
        may_close.set()
        async with asyncio.timeout(DEADLINE):
            await eof_read
        assert connection._transport is not None
        assert connection._transport.is_closing()  # the situation under test
        response = await fetch(client, origin)
        assert await read_body(response) == b"ok"
        response.close()
        assert response.stale_retries == 0  # not sent into the closing connection first
        assert requests_per_connection == [1, 1]
        assert upstream.accepted == 2


@pytest.mark.parametrize(
    ("keepalive", "hint", "window"),
    [
        (4.0, None, 4.0),
        (4.0, 5.0, 4.0),
        (4.0, 30.0, 4.0),  # a longer hint does not lengthen the keep-alive
        (4.0, 3.0, 2.0),
        (4.0, 2.0, 1.0),
        (4.0, 1.0, 0.5),
        (4.0, 0.0, 0.0),
        (0.2, 1.0, 0.2),
    ],
)
def test_the_reuse_window_is_the_keepalive_or_the_upstreams_shorter_hint_less_a_margin(
    keepalive: float, hint: float | None, window: float
) -> None:
    assert upstream_client.reuse_window(keepalive, hint) == window


async def test_a_connection_idle_past_the_upstreams_keepalive_timeout_hint_is_not_reused(
    make_client: ClientFactory,
) -> None:
    answer = b"HTTP/1.1 200 OK\r\nKeep-Alive: timeout=1, max=100\r\nContent-Length: 2\r\n\r\nok"
    async with scripted(answer_each(answer)) as (origin, upstream):
        client = make_client()  # a keep-alive of a minute: only the hint can close this one
        assert await fetch_whole(client, origin) == b"ok"
        assert await fetch_whole(client, origin) == b"ok"  # within the hint's window: reused
        assert upstream.accepted == 1
        await asyncio.sleep(0.7)  # idle past the window (0.5 s for a hint of 1 s): under test
        assert await fetch_whole(client, origin) == b"ok"
        assert upstream.accepted == 2


def _slow_reader(
    body_size: int, piece: int, pause: float, answer: bytes, stall_after: int | None = None
) -> Handler:
    """An upstream taking a request body `piece` bytes every `pause` s, then answering `answer`.

    Its receive buffer is small, so the client's bytes wait in the client's own buffer. The first
    request on a connection is a small GET (answered OK), after which the test shrinks the
    client's send buffer too; with `stall_after`, it stops reading after that many body bytes.
    """

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
        await read_request_head(reader)
        writer.write(OK)
        await writer.drain()
        await reader.readuntil(b"\r\n\r\n")
        taken = 0
        while taken < body_size:
            if stall_after is not None and taken >= stall_after:
                await writer.wait_closed()  # takes nothing more, until the end
            taken += len(await reader.readexactly(min(piece, body_size - taken)))
            await asyncio.sleep(pause)  # the upstream's scripted pace
        writer.write(answer)
        await writer.drain()
        await until_eof(reader)

    return handler


async def _connection_with_a_small_send_buffer(client: UpstreamClient, origin: Origin) -> None:
    response = await fetch(client, origin)
    assert await read_body(response) == b"ok"
    sock = internals(response)._transport.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16 * 1024)
    response.close()
    assert client.pool_counts() == (0, 1)


async def test_the_read_timeout_waits_for_the_answer_only_once_the_request_is_written(
    make_client: ClientFactory,
) -> None:
    """A request taking longer to write than `read_timeout` is not timed out while it goes."""
    body = b"x" * (2 * 1024 * 1024)
    read_timeout = 0.25
    async with scripted(_slow_reader(len(body), 32 * 1024, 0.02, OK)) as (origin, upstream):
        client = make_client(read_timeout=read_timeout)
        await _connection_with_a_small_send_buffer(client, origin)
        started = time.monotonic()
        response = await fetch(client, origin, "POST", "/v1/files", body=body)
        assert time.monotonic() - started > 2 * read_timeout  # the situation under test
        assert await read_body(response) == b"ok"
        response.close()
        assert upstream.accepted == 1


async def test_a_request_the_upstream_stops_taking_is_a_read_timeout(
    make_client: ClientFactory,
) -> None:
    body = b"x" * (2 * 1024 * 1024)
    read_timeout = 0.25
    handler = _slow_reader(len(body), 32 * 1024, 0.0, OK, stall_after=256 * 1024)
    async with scripted(handler) as (origin, _):
        client = make_client(read_timeout=read_timeout)
        await _connection_with_a_small_send_buffer(client, origin)
        started = time.monotonic()
        with pytest.raises(ReadTimeoutError, match="took no byte of the request"):
            await fetch(client, origin, "POST", "/v1/files", body=body)
        assert read_timeout * 0.8 <= time.monotonic() - started <= DEADLINE
        assert client.pool_counts() == (0, 0)


async def test_a_connection_answered_before_its_request_was_written_is_closed_not_reused(
    make_client: ClientFactory,
) -> None:
    """An early 413 leaves the rest of the body unsent: the next request must not queue behind."""
    early = b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 0\r\n\r\n"

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if upstream.accepted > 1:
            await answer_each(OK)(reader, writer)
            return
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
        await read_request_head(reader)
        writer.write(OK)
        await writer.drain()
        await reader.readuntil(b"\r\n\r\n")
        writer.write(early)  # and never reads the body
        await writer.drain()
        await writer.wait_closed()  # reads nothing more, until the end

    async with scripted(handler) as (origin, upstream):
        client = make_client()
        await _connection_with_a_small_send_buffer(client, origin)
        response = await fetch(client, origin, "POST", "/v1/files", body=b"x" * (4 * 1024 * 1024))
        assert response.status == 413
        assert await read_body(response) == b""
        assert internals(response)._transport.get_write_buffer_size() > 0  # under test
        response.close()
        await eventually(lambda: client.pool_counts() == (0, 0))
        assert await fetch_whole(client, origin) == b"ok"
        assert upstream.accepted == 2


async def test_a_connection_whose_request_ends_within_the_grace_after_an_early_answer_is_reused(
    make_client: ClientFactory,
) -> None:
    early = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nfoo"
    may_read = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
        await read_request_head(reader)
        writer.write(OK)
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        writer.write(early)
        await writer.drain()
        await may_read.wait()
        await reader.readexactly(_content_length(head))  # the rest, at once
        await answer_each(OK)(reader, writer)

    async with scripted(handler) as (origin, upstream):
        client = make_client()
        await _connection_with_a_small_send_buffer(client, origin)
        response = await fetch(client, origin, "POST", "/v1/files", body=b"x" * (1024 * 1024))
        assert await read_body(response) == b"foo"
        response.close()
        assert client.pool_counts() == (1, 0)  # held back while its request goes out
        may_read.set()
        await eventually(lambda: client.pool_counts() == (0, 1))
        assert await fetch_whole(client, origin) == b"ok"
        assert upstream.accepted == 1


@pytest.mark.parametrize(
    "tail",
    [
        # More than one read (which may come with the head and go uncounted) and the limit.
        pytest.param(b"X-Endless: " + b"a" * (8 * MAX_TRAILER_BYTES), id="unterminated-trailer"),
        pytest.param(b"X-Many: 0123456789\r\n" * (8 * MAX_TRAILER_BYTES // 20), id="many-trailers"),
    ],
)
async def test_trailers_over_the_limit_are_a_response_error(
    make_client: ClientFactory, tail: bytes
) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n")
        await writer.drain()
        for start in range(0, len(tail), 4096):
            writer.write(tail[start : start + 4096])
            await writer.drain()
        await until_eof(reader)  # the connection stays open: only the limit can end this

    async with scripted(handler) as (origin, upstream):
        client = make_client()
        response = await fetch(client, origin)
        received: list[bytes] = []
        with pytest.raises(ResponseError, match="trailers"):
            await read_body(response, into=received)
        assert b"".join(received) == b"hello"
        response.close()
        assert client.pool_counts() == (0, 0)
        await eventually(lambda: upstream.ended == 1)


@pytest.mark.parametrize("piece", [4096, 1024 * 1024], ids=["small-reads", "one-read"])
async def test_a_complete_trailer_over_the_limit_is_refused_however_it_is_read(
    make_client: ClientFactory, piece: int
) -> None:
    answer = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n"
        + b"X-T: "
        + b"t" * (MAX_TRAILER_BYTES + 1024)
        + b"\r\n\r\n"
    )

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request_head(reader)
        for start in range(0, len(answer), piece):
            writer.write(answer[start : start + piece])
            await writer.drain()
        await until_eof(reader)

    async with scripted(handler) as (origin, _):
        client = make_client()
        response = await fetch(client, origin)
        with pytest.raises(ResponseError, match="trailers"):
            await read_body(response)
        response.close()


async def test_trailers_within_the_limit_end_the_body_and_keep_the_connection(
    make_client: ClientFactory,
) -> None:
    trailers = b"X-Checksum: abc\r\n" * 100
    answer = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n"
    async with scripted(answer_each(answer + trailers + b"\r\n")) as (origin, upstream):
        client = make_client()
        for _ in range(2):
            assert await fetch_whole(client, origin) == b"ok"
        assert upstream.accepted == 1


@pytest.mark.parametrize(
    "coding",
    [
        b"gzip",
        b"deflate",
        b"gzip, chunked",
        b"chunked, gzip",
        b"x-custom",
        # Lists llhttp frames otherwise than as one final chunked (it would relay the framing).
        b"chunked, identity",
        b"chunked, chunked",
        b"chunked\t",
        b"chunked,",
        b", chunked",
    ],
)
async def test_a_transfer_coding_the_client_does_not_decode_is_a_response_error(
    make_client: ClientFactory, coding: bytes
) -> None:
    """RFC 9112 §6.3: the body would be passed on coded, without the header that says so."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: " + coding + b"\r\n\r\n")
        writer.write(b"5\r\n\x1f\x8b\x08\x00\x00\r\n0\r\n\r\n")  # whatever the framing
        await writer.drain()
        # closing would end a close-delimited body

    async with scripted(handler) as (origin, _):
        client = make_client()
        with pytest.raises(ResponseError, match="Transfer-Encoding"):
            await fetch(client, origin)  # the head says it all
        assert client.pool_counts() == (0, 0)


async def test_a_reused_connection_closed_before_answering_a_post_is_connection_closed(
    make_client: ClientFactory,
) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request_head(reader)
        writer.write(OK)
        await writer.drain()
        await read_request_head(reader)  # and closes without answering

    async with scripted(handler) as (origin, upstream):
        client = make_client()
        assert await fetch_whole(client, origin) == b"ok"
        with pytest.raises(ConnectionClosedError) as caught:
            await fetch(client, origin, "POST", "/v1/chat/completions", body=b"{}")
        assert caught.value.reused
        assert not caught.value.nothing_written
        assert caught.value.stale_retries == 0
        assert upstream.accepted == 1  # not sent again: the upstream may have acted on it
