"""Hostile input over a raw socket: every item gets a defined outcome (issue 5, item 3).

Requests are the exact bytes a hostile client would send (STYLE 8); what reached the upstream is
read from the fake upstream's echo and journal. Each outcome is either a clear 4xx or the request
passed through correctly, and after each one the server still answers. Nothing a client sends
may crash the proxy (no 500), choose the upstream, or make it repeat a configured default
header value (DESIGN §3, §4, §5).

Outcomes that come from the HTTP server rather than the proxy's code (uvicorn with httptools,
llhttp underneath) are pinned here too, because they are the proxy's behaviour as deployed:
malformed framing is a 400 in the OpenAI error shape and a closed connection.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
import string
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlsplit

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from llmproxy.testing import ProxyServer
from tests.e2e.conftest import E2E_DEFAULT_HEADERS, UPSTREAM_SECRET, Target, start_proxy
from tests.e2e.fake_client import FakeUpstreamClient
from tests.e2e.raw_http import (
    RawResponse,
    assert_proxy_error,
    connect,
    exchange,
    request_bytes,
)
from tests.support import raw_tcp_upstream, read_request_head

pytestmark = pytest.mark.e2e

ECHO = (b"x-fake-scenario", b"echo")
CHAT = "/v1/chat/completions"
BODY = b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hostile"}]}'
REFUSED_CODES = ("invalid_http_request", "request_header_fields_too_large")

Headers = list[tuple[bytes, bytes]]


# --- helpers ----------------------------------------------------------------------------------


@pytest.fixture
def secrets(target: Target) -> tuple[bytes, ...]:
    """Configured values that must never come back to a client outside an echo of them."""
    values = [value.encode() for value in target.default_headers.values()]
    if target.self_hosted:
        values.append(UPSTREAM_SECRET.encode())
    return tuple(values)


def assert_no_secret(response: RawResponse, secrets: tuple[bytes, ...], *, body: bool) -> None:
    """No secret in the response headers, nor in the body unless it is the fake's echo."""
    for name, value in response.headers:
        for secret in secrets:
            assert secret not in value, f"{secret!r} leaked in response header {name!r}"
    if body:
        for secret in secrets:
            assert secret not in response.body, f"{secret!r} leaked in the response body"


def assert_server_rejected(response: RawResponse) -> None:
    """The HTTP server refused the bytes before the proxy saw a request."""
    assert response.status in (400, 431), response
    error = json.loads(response.body)["error"]  # the OpenAI shape (llmproxy.protocol)
    assert error["code"] in REFUSED_CODES
    assert response.header("connection") == b"close"


async def assert_still_serving(url: str, path: str = "/v1/models") -> None:
    """A fresh, ordinary request still gets its ordinary answer."""
    headers = [ECHO] if path.startswith("/v1/") else []
    response = await exchange(url, request_bytes("GET", path, headers))
    assert response.status == 200, response


async def echo(target: Target, data: bytes) -> dict[str, Any]:
    """Send `data` (a request carrying `x-fake-scenario: echo`); what the upstream received."""
    response = await exchange(target.proxy_url, data)
    assert response.status == 200, response
    assert_no_secret(
        response, tuple(v.encode() for v in target.default_headers.values()), body=False
    )
    seen: dict[str, Any] = response.json()
    return seen


def upstream_values(seen: dict[str, Any], name: str) -> list[str]:
    return [value for header, value in seen["headers"] if header == name.lower()]


def assert_body_arrived(seen: dict[str, Any], body: bytes) -> None:
    assert seen["body_length"] == len(body)
    assert seen["body_sha256"] == hashlib.sha256(body).hexdigest()
    # An empty body may come with `Content-Length: 0` (llmproxy sends it for POST) or without.
    assert upstream_values(seen, "content-length") in ([str(len(body))], [] if body else ["0"])
    assert upstream_values(seen, "transfer-encoding") == []


def assert_defaults_arrived(seen: dict[str, Any], target: Target) -> None:
    for name, value in target.default_headers.items():
        assert upstream_values(seen, name) == [value], name


def assert_reached_the_fake(seen: dict[str, Any], fake: FakeUpstreamClient) -> None:
    assert upstream_values(seen, "host") == [urlsplit(fake.url).netloc]


def chunked(*parts: bytes, extension: bytes = b"", trailer: bytes = b"") -> bytes:
    body = b"".join(b"%X%s\r\n%s\r\n" % (len(part), extension, part) for part in parts)
    return body + b"0\r\n" + trailer + b"\r\n"


@asynccontextmanager
async def serving(proxy: ProxyServer) -> AsyncIterator[ProxyServer]:
    """Run a proxy while this event loop keeps serving a raw upstream of the same test."""
    await asyncio.to_thread(proxy.start)
    try:
        yield proxy
    finally:
        await asyncio.to_thread(proxy.stop)


RawHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def answering(response: bytes) -> RawHandler:
    """A raw upstream that reads one request and writes `response` verbatim, then closes."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request_head(reader)
        writer.write(response)
        await writer.drain()
        writer.close()

    return handle


# --- Connection and other hop-by-hop headers ----------------------------------------------------


async def test_connection_authorization_removes_only_the_clients_authorization(
    target: Target, fake: FakeUpstreamClient
) -> None:
    if "authorization" not in {name.lower() for name in target.default_headers}:
        pytest.skip("the proxy under test has no default Authorization")
    seen = await echo(
        target,
        request_bytes(
            "POST",
            CHAT,
            [ECHO, (b"Authorization", b"Bearer sk-client"), (b"Connection", b"authorization")],
            BODY,
        ),
    )
    assert_defaults_arrived(seen, target)
    assert "Bearer sk-client" not in json.dumps(seen["headers"])
    assert upstream_values(seen, "connection") == []
    assert_body_arrived(seen, BODY)


async def test_connection_naming_every_default_cannot_remove_them(
    target: Target, fake: FakeUpstreamClient
) -> None:
    if not target.default_headers:
        pytest.skip("the proxy under test has no default headers")
    listing = ", ".join(target.default_headers).encode()
    seen = await echo(
        target,
        request_bytes(
            "POST", CHAT, [ECHO, (b"Connection", listing), (b"Connection", b"close")], BODY
        ),
    )
    assert_defaults_arrived(seen, target)
    assert_body_arrived(seen, BODY)


async def test_connection_naming_the_framing_headers_keeps_the_body(
    target: Target, fake: FakeUpstreamClient
) -> None:
    # Listing them drops them as hop-by-hop; the body must still arrive, framed afresh.
    seen = await echo(
        target,
        request_bytes(
            "POST",
            CHAT,
            [
                ECHO,
                (b"Connection", b"content-length, transfer-encoding, host, keep-alive"),
                (b"Transfer-Encoding", b"chunked"),
            ],
            chunked(BODY[:10], BODY[10:]),
            content_length=False,
        ),
    )
    assert_body_arrived(seen, BODY)
    assert_reached_the_fake(seen, fake)


HOP_BY_HOP_CASES = {
    "keep-alive": [(b"Keep-Alive", b"timeout=5, max=1000")],
    "te-trailers": [(b"TE", b"trailers"), (b"Trailer", b"x-checksum")],
    "upgrade-websocket-alone": [(b"Upgrade", b"websocket")],
    "upgrade-foo-alone": [(b"Upgrade", b"foo/1.0")],
    "proxy-connection": [(b"Proxy-Connection", b"keep-alive")],
    "proxy-authorization": [(b"Proxy-Authorization", b"Basic cHJveHk6c2VjcmV0")],
}


@pytest.mark.parametrize("headers", HOP_BY_HOP_CASES.values(), ids=HOP_BY_HOP_CASES.keys())
async def test_hop_by_hop_headers_are_stripped_and_the_body_forwarded(
    target: Target, fake: FakeUpstreamClient, headers: Headers
) -> None:
    seen = await echo(target, request_bytes("POST", CHAT, [ECHO, *headers], BODY))
    for name, _ in headers:
        assert upstream_values(seen, name.decode()) == []
    assert_defaults_arrived(seen, target)
    assert_body_arrived(seen, BODY)


# --- WebSocket upgrades of the wrong shape (issue 12) --------------------------------------------

UPGRADE = [(b"Connection", b"Upgrade"), (b"Upgrade", b"websocket")]
WS_KEY = (b"Sec-WebSocket-Key", b"dGhlIHNhbXBsZSBub25jZQ==")  # RFC 6455 §1.3's example
WS_VERSION = (b"Sec-WebSocket-Version", b"13")
REALTIME = "/v1/realtime?model=gpt-realtime"


def upgrade_bytes(
    target: str = REALTIME,
    headers: Headers | None = None,
    body: bytes = b"",
    *,
    content_length: bool = True,
) -> bytes:
    """A WebSocket opening handshake; `headers` replace the key and version when given."""
    fields = [*UPGRADE, *([WS_KEY, WS_VERSION] if headers is None else headers)]
    return request_bytes("GET", target, fields, body, content_length=content_length)


async def refused_upgrade(url: str, data: bytes) -> RawResponse:
    """The answer to a refused upgrade, on a connection the server then closes."""
    async with connect(url) as connection:
        await connection.send(data)
        response = await connection.read_response()
        assert response.status != 101, response
        assert await connection.closed_by_peer()
    return response


async def assert_unharmed(target: Target, fake: FakeUpstreamClient) -> None:
    """The server still answers, and the refused upgrade never reached the upstream."""
    await assert_still_serving(target.proxy_url)
    assert [(entry["kind"], entry["path"]) for entry in fake.journal()] == [("http", "/v1/models")]


BAD_HANDSHAKES = {
    "no-key": [WS_VERSION],
    "no-version": [WS_KEY],
    "key-not-16-bytes": [(b"Sec-WebSocket-Key", b"c2hvcnQ="), WS_VERSION],
    "key-twice": [WS_KEY, WS_KEY, WS_VERSION],
}


@pytest.mark.parametrize("headers", BAD_HANDSHAKES.values(), ids=BAD_HANDSHAKES.keys())
async def test_a_handshake_without_a_valid_key_and_version_is_400(
    target: Target, fake: FakeUpstreamClient, secrets: tuple[bytes, ...], headers: Headers
) -> None:
    # RFC 6455 §4.2.1: without a valid key and version it is no opening handshake; served as a
    # plain GET it would reach the upstream (the proxy before issue 12 did exactly that).
    response = await refused_upgrade(target.proxy_url, upgrade_bytes(headers=headers))
    assert_proxy_error(response, 400, "websocket_upgrade_invalid")
    assert_no_secret(response, secrets, body=True)
    await assert_unharmed(target, fake)


@pytest.mark.parametrize("version", [b"8", b"14", b"0", b"thirteen"])
async def test_an_unsupported_version_is_426_naming_version_13(
    target: Target,
    fake: FakeUpstreamClient,
    secrets: tuple[bytes, ...],
    version: bytes,
) -> None:
    # RFC 6455 §4.2.2 and §4.4: the answer names the versions the server speaks.
    data = upgrade_bytes(headers=[WS_KEY, (b"Sec-WebSocket-Version", version)])
    response = await refused_upgrade(target.proxy_url, data)
    assert_proxy_error(response, 426, "websocket_upgrade_invalid")
    assert response.values("sec-websocket-version") == [b"13"]
    assert_no_secret(response, secrets, body=True)
    await assert_unharmed(target, fake)


UPGRADES_WITH_A_BODY = {
    "content-length": upgrade_bytes(body=b"hello"),
    "chunked": upgrade_bytes(
        headers=[WS_KEY, WS_VERSION, (b"Transfer-Encoding", b"chunked")],
        body=chunked(b"hello"),
        content_length=False,
    ),
    # The "body" would otherwise be read as the client's first WebSocket frame.
    "content-length-of-a-frame": upgrade_bytes(body=b"\x81\x85\x00\x00\x00\x00hello"),
}


@pytest.mark.parametrize("data", UPGRADES_WITH_A_BODY.values(), ids=UPGRADES_WITH_A_BODY.keys())
async def test_an_upgrade_carrying_a_body_is_400(
    target: Target, fake: FakeUpstreamClient, secrets: tuple[bytes, ...], data: bytes
) -> None:
    # RFC 6455 §4.1 has no body on the opening handshake.
    response = await refused_upgrade(target.proxy_url, data)
    assert_proxy_error(response, 400, "invalid_http_request")
    assert_no_secret(response, secrets, body=True)
    await assert_unharmed(target, fake)


REFUSED_UPGRADE_PATHS = {
    "/healthz": (404, "not_found"),
    "/": (404, "not_found"),
    "/realtime": (404, "not_found"),
    "/v1realtime": (404, "not_found"),
    "/v1/../x": (400, "invalid_path"),
    "/v1/../v1/realtime": (400, "invalid_path"),
    "/v1/%2e%2e/realtime": (400, "invalid_path"),
    "/v1/./realtime": (400, "invalid_path"),
}


@pytest.mark.parametrize(
    ("path", "refusal"), REFUSED_UPGRADE_PATHS.items(), ids=REFUSED_UPGRADE_PATHS.keys()
)
async def test_an_upgrade_outside_the_api_is_refused(
    target: Target,
    fake: FakeUpstreamClient,
    secrets: tuple[bytes, ...],
    path: str,
    refusal: tuple[int, str],
) -> None:
    # Only `/v1/...` is relayed, as for HTTP: `/healthz` answers a plain GET but is no
    # WebSocket endpoint, and a dot segment could climb out of the upstream's base path.
    status, code = refusal
    response = await refused_upgrade(target.proxy_url, upgrade_bytes(path))
    assert_proxy_error(response, status, code)
    assert_no_secret(response, secrets, body=True)
    await assert_unharmed(target, fake)


# Handshakes the HTTP parser takes but `websockets`, which re-reads the head after the upgrade,
# does not: it refuses any Content-Length, and lines over 8 KiB (`websockets.http11`). Its
# refusal was never written and the connection never closed (the HTTP client timeouts end at
# the upgrade), so such a client held its connection for good.
UNREAD_BY_WEBSOCKETS = {
    "content-length-zero": upgrade_bytes(headers=[WS_KEY, WS_VERSION, (b"Content-Length", b"0")]),
    "header-line-over-8-kib": upgrade_bytes(headers=[WS_KEY, WS_VERSION, (b"X-Long", b"a" * 9000)]),
    "target-over-8-kib": upgrade_bytes(f"{REALTIME}&q={'a' * 9000}"),
}


def upstream_spoke(journal: list[dict[str, Any]]) -> bool:
    """The fake's session sent its first event (so the client may leave without a race)."""
    (entry,) = journal
    messages = entry["websocket"]["messages"]
    return any(message["direction"] == "server_to_client" for message in messages)


@pytest.mark.parametrize("data", UNREAD_BY_WEBSOCKETS.values(), ids=UNREAD_BY_WEBSOCKETS.keys())
async def test_a_handshake_websockets_cannot_read_is_still_answered(
    target: Target, fake: FakeUpstreamClient, secrets: tuple[bytes, ...], data: bytes
) -> None:
    # Either answer is fine: `Content-Length: 0` is no body (RFC 9110 §8.6) and 9 KiB is
    # within the head limit, so the upgrade may go through; or it is refused. Never silence.
    async with connect(target.proxy_url) as connection:
        await connection.send(data)
        response = await connection.read_response()
        if response.status == 101:
            await asyncio.to_thread(fake.wait_for_journal, upstream_spoke)
        else:
            assert 400 <= response.status < 500, response
            assert set(response.json()["error"]) == {"message", "type", "param", "code"}
            assert await connection.closed_by_peer()
    assert_no_secret(response, secrets, body=True)
    if response.status == 101:
        await assert_still_serving(target.proxy_url)
    else:
        await assert_unharmed(target, fake)


@pytest.mark.parametrize("protocol", [b"websocket", b"foo"])
async def test_a_refused_upgrade_still_forwards_the_body(
    request: pytest.FixtureRequest, target: Target, fake: FakeUpstreamClient, protocol: bytes
) -> None:
    # The same bug as h2c in test_headers_e2e.py: any `Connection: Upgrade` offer on a request
    # with a body, not only h2c, makes uvicorn's httptools protocol drop the body.
    data = request_bytes(
        "POST", CHAT, [ECHO, (b"Connection", b"Upgrade"), (b"Upgrade", protocol)], BODY
    )
    seen = await echo(target, data)
    assert upstream_values(seen, "upgrade") == []
    assert_body_arrived(seen, BODY)


# --- request framing ----------------------------------------------------------------------------

CHUNKED_BODIES = {
    "one-chunk": chunked(BODY),
    "byte-per-chunk": chunked(*(BODY[i : i + 1] for i in range(len(BODY)))),
    "extensions": chunked(BODY[:7], BODY[7:], extension=b";name=value"),
    "uppercase-hex": chunked(BODY * 3),
    "binary-with-crlf": chunked(b"\r\n0\r\n\r\n", bytes(range(256)), b"\r\n"),
    "empty": chunked(),
}


def dechunk(data: bytes) -> bytes:
    parts: list[bytes] = []
    while True:
        size_line, data = data.split(b"\r\n", 1)
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            return b"".join(parts)
        parts.append(data[:size])
        data = data[size + 2 :]


@pytest.mark.parametrize("framed", CHUNKED_BODIES.values(), ids=CHUNKED_BODIES.keys())
async def test_a_chunked_body_is_forwarded_with_its_length(
    target: Target, fake: FakeUpstreamClient, framed: bytes
) -> None:
    seen = await echo(
        target,
        request_bytes(
            "POST",
            CHAT,
            [ECHO, (b"Transfer-Encoding", b"chunked")],
            framed,
            content_length=False,
        ),
    )
    assert_body_arrived(seen, dechunk(framed))


async def test_trailer_fields_do_not_become_request_headers(
    request: pytest.FixtureRequest, target: Target, fake: FakeUpstreamClient
) -> None:
    # RFC 9110 §6.5.1: trailer fields are not to be merged into the header section unless the
    # recipient knows that is safe; a proxy that does so lets a client hide headers from any
    # gateway in front of it.
    framed = chunked(BODY, trailer=b"X-Checksum: abc\r\nX-Proxy-Default: from-trailer\r\n")
    seen = await echo(
        target,
        request_bytes(
            "POST",
            CHAT,
            [ECHO, (b"Transfer-Encoding", b"chunked"), (b"Trailer", b"X-Checksum")],
            framed,
            content_length=False,
        ),
    )
    assert_body_arrived(seen, BODY)
    assert upstream_values(seen, "x-checksum") == []
    assert "from-trailer" not in json.dumps(seen["headers"])


async def test_an_access_key_in_a_trailer_does_not_authenticate(
    self_hosted: Target, fake: FakeUpstreamClient
) -> None:
    key = b"sk-proxy-access-key-in-trailer"
    framed = chunked(BODY, trailer=b"Authorization: Bearer " + key + b"\r\n")
    data = request_bytes(
        "POST",
        CHAT,
        [ECHO, (b"Transfer-Encoding", b"chunked")],
        framed,
        content_length=False,
    )
    proxy = start_proxy(fake.base_url, access_keys=(key.decode(),))
    async with serving(proxy):
        response = await exchange(proxy.url, data)
    assert_proxy_error(response, 401, "invalid_proxy_key")
    assert fake.journal() == []


def framing_case(*header_lines: bytes, body: bytes = BODY) -> bytes:
    head = [b"POST /v1/chat/completions HTTP/1.1", b"Host: proxy.test", b"x-fake-scenario: echo"]
    return b"\r\n".join([*head, *header_lines]) + b"\r\n\r\n" + body


LENGTH = b"Content-Length: %d" % len(BODY)
REJECTED_BY_THE_SERVER = {
    "content-length-and-chunked": framing_case(
        LENGTH, b"Transfer-Encoding: chunked", body=chunked(BODY)
    ),
    "chunked-and-content-length": framing_case(
        b"Transfer-Encoding: chunked", LENGTH, body=chunked(BODY)
    ),
    "content-length-and-identity": framing_case(LENGTH, b"Transfer-Encoding: identity"),
    "content-length-conflicting": framing_case(LENGTH, b"Content-Length: %d" % (len(BODY) + 1)),
    "content-length-repeated-equal": framing_case(LENGTH, LENGTH),
    "content-length-list": framing_case(b"Content-Length: %d, %d" % (len(BODY), len(BODY))),
    "content-length-non-numeric": framing_case(b"Content-Length: seventy"),
    "content-length-hex": framing_case(b"Content-Length: 0x%x" % len(BODY)),
    "content-length-negative": framing_case(b"Content-Length: -%d" % len(BODY)),
    "content-length-plus-sign": framing_case(b"Content-Length: +%d" % len(BODY)),
    "chunked-not-last": framing_case(b"Transfer-Encoding: chunked, gzip", body=chunked(BODY)),
    "chunked-twice": framing_case(
        b"Transfer-Encoding: chunked", b"Transfer-Encoding: chunked", body=chunked(BODY)
    ),
    "unknown-coding-only": framing_case(b"Transfer-Encoding: xchunked", body=chunked(BODY)),
    "whitespace-before-colon": framing_case(LENGTH, b"X-Spaced : value"),
    "tab-before-colon": framing_case(LENGTH, b"X-Tabbed\t: value"),
    "space-in-name": framing_case(LENGTH, b"X Spaced: value"),
    "nul-in-value": framing_case(LENGTH, b"X-Nul: a\x00b"),
    "escape-in-value": framing_case(LENGTH, b"X-Ctl: a\x1bb"),
    "del-in-value": framing_case(LENGTH, b"X-Ctl: a\x7fb"),
    "bare-cr-in-value": framing_case(LENGTH, b"X-Cr: a\rb"),
    "obsolete-line-folding": framing_case(LENGTH, b"X-Folded: a", b" b"),
    "line-without-colon": framing_case(LENGTH, b"X-No-Colon"),
    "non-ascii-in-target": b"GET /v1/caf\xe9 HTTP/1.1\r\nHost: proxy.test\r\n\r\n",
    "space-in-target": b"GET /v1/a b HTTP/1.1\r\nHost: proxy.test\r\n\r\n",
}


@pytest.mark.parametrize("data", REJECTED_BY_THE_SERVER.values(), ids=REJECTED_BY_THE_SERVER.keys())
async def test_malformed_framing_and_fields_are_400(
    target: Target, fake: FakeUpstreamClient, secrets: tuple[bytes, ...], data: bytes
) -> None:
    async with connect(target.proxy_url) as connection:
        await connection.send(data)
        response = await connection.read_response()
        assert_server_rejected(response)
        assert await connection.closed_by_peer()
    assert_no_secret(response, secrets, body=True)
    await assert_still_serving(target.proxy_url)
    assert [entry["query"] for entry in fake.journal()] == [""]  # only the check above


async def test_a_transfer_coding_nobody_decodes_is_refused(
    request: pytest.FixtureRequest, target: Target, fake: FakeUpstreamClient
) -> None:
    # RFC 9112 §6.1: a server that receives a transfer coding it does not understand should
    # answer 501. uvicorn removes only the chunked framing and hands on the still-gzipped bytes;
    # the proxy then forwards them with a Content-Length and no coding, so the upstream cannot
    # know what it got. Either refusal (400 or 501) is fine.
    coded = gzip.compress(BODY)
    for codings in (
        [b"Transfer-Encoding: gzip, chunked"],
        [b"Transfer-Encoding: gzip", b"Transfer-Encoding: chunked"],
    ):
        response = await exchange(target.proxy_url, framing_case(*codings, body=chunked(coded)))
        assert response.status in (400, 501), response
    assert fake.journal() == []


# --- Host, forwarding headers and the body cannot choose the upstream -------------------------


async def test_a_request_without_host_is_forwarded_with_the_upstreams_host(
    target: Target, fake: FakeUpstreamClient
) -> None:
    # RFC 9112 §3.2 wants a 400 here; uvicorn accepts it. The proxy never routes on Host (the
    # upstream is fixed), so accepting it is harmless: the upstream gets its own Host.
    seen = await echo(target, request_bytes("POST", CHAT, [ECHO], BODY, host=None))
    assert_reached_the_fake(seen, fake)
    assert_body_arrived(seen, BODY)
    assert_defaults_arrived(seen, target)


@pytest.mark.parametrize(
    "data",
    [
        request_bytes("GET", "/v1/models", [ECHO, (b"Host", b"evil.example")]),
        request_bytes("GET", "/v1/models", [ECHO], host=b""),
        request_bytes("GET", "http://evil.example/v1/models", [ECHO]),
        request_bytes(
            "GET", "http://evil.example:6666/v1/models", [ECHO], host=b"evil.example:6666"
        ),
    ],
    ids=["two-hosts", "empty-host", "absolute-form", "absolute-form-with-matching-host"],
)
async def test_host_and_absolute_form_never_choose_the_upstream(
    target: Target, fake: FakeUpstreamClient, data: bytes
) -> None:
    seen = await echo(target, data)
    assert_reached_the_fake(seen, fake)
    assert seen["raw_path"] == "/v1/models"
    (entry,) = fake.journal()
    assert entry["path"] == "/v1/models"


async def test_spoofed_forwarding_headers_pass_through_unchanged_and_none_are_added(
    target: Target, fake: FakeUpstreamClient
) -> None:
    # Policy: the proxy treats them as any other end-to-end header. It adds none of its own, so
    # an upstream that trusts them trusts exactly what the client claimed, as without the proxy.
    spoofed = [
        (b"X-Forwarded-For", b"10.0.0.1, 203.0.113.7"),
        (b"X-Forwarded-For", b"127.0.0.1"),
        (b"Forwarded", b'for="[2001:db8::1]";proto=https;host=evil.example, for=unknown'),
        (b"X-Forwarded-Host", b"evil.example"),
        (b"X-Forwarded-Proto", b"https"),
        (b"X-Real-IP", b"127.0.0.1"),
        (b"Via", b"1.1 trusted-gateway"),
    ]
    seen = await echo(target, request_bytes("POST", CHAT, [ECHO, *spoofed], BODY))
    forwarding = {name.decode().lower() for name, _ in spoofed}
    arrived = [(name, value) for name, value in seen["headers"] if name in forwarding]
    assert arrived == [(name.decode().lower(), value.decode()) for name, value in spoofed]
    assert_reached_the_fake(seen, fake)

    plain = await echo(target, request_bytes("POST", CHAT, [ECHO], BODY))
    added = {name for name, _ in plain["headers"]} & (forwarding | {"x-forwarded-port"})
    assert added == set()


async def test_upstream_fields_in_the_body_are_ignored(
    target: Target, fake: FakeUpstreamClient
) -> None:
    body = json.dumps(
        {
            "model": "gpt-4o-mini",
            "messages": [{"role": "user", "content": "hi"}],
            "base_url": "http://127.0.0.1:9/v1",
            "api_base": "http://evil.example/v1",
            "api_key": "sk-attacker",
            "api_type": "azure",
            "organization": "org-attacker",
            "extra_headers": {"Authorization": "Bearer sk-attacker"},
        }
    ).encode()
    seen = await echo(target, request_bytes("POST", CHAT, [ECHO], body))
    assert_body_arrived(seen, body)
    assert_reached_the_fake(seen, fake)
    assert_defaults_arrived(seen, target)
    assert "sk-attacker" not in json.dumps(seen["headers"])
    (entry,) = fake.journal()
    assert entry["path"] == CHAT


# --- path tricks --------------------------------------------------------------------------------

REFUSED_PATHS = {
    "/v1/../admin": "invalid_path",
    "/v1/%2e%2e/admin": "invalid_path",
    "/v1/%2E%2E/admin": "invalid_path",
    "/v1/.%2e/admin": "invalid_path",
    "/v1/./models": "invalid_path",
    "/v1/models/..": "invalid_path",
    "//v1/models": "not_found",
    "/v1%2fmodels": "not_found",
    "/v1@evil.example/models": "not_found",
    "/admin": "not_found",
}


@pytest.mark.parametrize(("path", "code"), REFUSED_PATHS.items(), ids=REFUSED_PATHS.keys())
async def test_path_tricks_that_are_refused(
    target: Target, fake: FakeUpstreamClient, secrets: tuple[bytes, ...], path: str, code: str
) -> None:
    response = await exchange(target.proxy_url, request_bytes("GET", path, [ECHO]))
    assert_proxy_error(response, 400 if code == "invalid_path" else 404, code)
    assert_no_secret(response, secrets, body=True)
    assert fake.journal() == []


FORWARDED_VERBATIM = [
    "/v1//models",
    "/v1/models%2Fx",
    "/v1/files/a%2F..%2Fb/content",
    "/v1/%2F%2Fevil.example/x",
    "/v1//evil.example/x",
    "/v1/@evil.example/x",
    "/v1/http://evil.example/x",
    "/v1/...",
    "/v1/models?next=//evil.example&x=%2e%2e",
]


@pytest.mark.parametrize("path", FORWARDED_VERBATIM)
async def test_other_path_tricks_are_forwarded_verbatim_to_the_upstream(
    target: Target, fake: FakeUpstreamClient, path: str
) -> None:
    seen = await echo(target, request_bytes("GET", path, [ECHO]))
    raw_path, _, query = path.partition("?")
    assert seen["raw_path"] == raw_path
    assert seen["query"] == query
    assert_reached_the_fake(seen, fake)


async def test_a_fragment_never_reaches_the_upstream(
    target: Target, fake: FakeUpstreamClient
) -> None:
    seen = await echo(target, request_bytes("GET", "/v1/models?x=1#frag/../../admin", [ECHO]))
    assert (seen["raw_path"], seen["query"]) == ("/v1/models", "x=1")


# --- sizes ----------------------------------------------------------------------------------------


async def test_a_16_kib_url_is_forwarded_verbatim(target: Target, fake: FakeUpstreamClient) -> None:
    query = "q=" + "a" * 16 * 1024
    seen = await echo(target, request_bytes("GET", f"/v1/models?{query}", [ECHO]))
    assert seen["query"] == query


async def test_a_very_long_url_is_refused(
    target: Target, fake: FakeUpstreamClient, secrets: tuple[bytes, ...]
) -> None:
    # httptools.parse_url refuses targets over 65535 bytes (uint16 offsets, httptools#142).
    response = await exchange(
        target.proxy_url, request_bytes("GET", "/v1/models?q=" + "a" * 100_000, [ECHO])
    )
    assert 400 <= response.status < 500, response
    assert_no_secret(response, secrets, body=True)
    await assert_still_serving(target.proxy_url)
    assert len(fake.journal()) == 1  # only the check above


def header_block(size: int) -> Headers:
    """About `size` bytes of distinct, ordinary headers (1 KiB each)."""
    return [(b"X-Filler-%d" % index, b"v" * 1000) for index in range(size // 1024)]


async def test_an_oversized_header_block_is_refused(
    request: pytest.FixtureRequest, target: Target, fake: FakeUpstreamClient
) -> None:
    # Issue 5 item 2: header limits set deliberately. Common limits: nginx 32 KiB, Node 16 KiB.
    data = request_bytes("GET", "/v1/models", [ECHO, *header_block(100 * 1024)])
    response = await exchange(target.proxy_url, data)
    assert response.status in (400, 413, 431), response.status
    assert fake.journal() == []


async def test_a_megabyte_of_headers_does_not_break_the_server(
    target: Target, fake: FakeUpstreamClient, secrets: tuple[bytes, ...]
) -> None:
    data = request_bytes("GET", "/v1/models", [ECHO, *header_block(1024 * 1024)])
    response = await exchange(target.proxy_url, data)
    assert response.status in (200, 400, 413, 431), response.status
    assert_no_secret(response, secrets, body=response.status != 200)
    await assert_still_serving(target.proxy_url)


async def test_a_10_mb_upstream_body_arrives_byte_for_byte(
    target: Target, fake: FakeUpstreamClient
) -> None:
    # Distinct content, so a dropped, repeated or reordered piece changes the hash.
    body = "".join(hashlib.sha256(b"%d" % i).hexdigest() for i in range(10 * 1024 * 1024 // 64))
    fake.queue({"body": body})
    response = await exchange(target.proxy_url, request_bytes("GET", "/v1/models"), deadline=30.0)
    assert response.status == 200
    assert response.header("content-length") == str(len(body)).encode()
    assert len(response.body) == len(body)
    assert hashlib.sha256(response.body).digest() == hashlib.sha256(body.encode()).digest()


# --- one connection, several requests, or half of one ---------------------------------------


async def test_pipelined_requests_are_answered_in_order(
    target: Target, fake: FakeUpstreamClient
) -> None:
    pipelined = (
        request_bytes("GET", "/v1/models?n=1", [ECHO])
        + request_bytes("POST", f"{CHAT}?n=2", [ECHO], BODY)
        + request_bytes(
            "POST",
            f"{CHAT}?n=3",
            [ECHO, (b"Transfer-Encoding", b"chunked")],
            chunked(BODY),
            content_length=False,
        )
        + request_bytes("GET", "/v1/models?n=4", [ECHO, (b"Connection", b"close")])
    )
    async with connect(target.proxy_url) as connection:
        await connection.send(pipelined)
        answers = [(await connection.read_response()).json() for _ in range(4)]
        assert await connection.closed_by_peer()
    assert [seen["query"] for seen in answers] == ["n=1", "n=2", "n=3", "n=4"]
    assert [seen["body_length"] for seen in answers] == [0, len(BODY), len(BODY), 0]


async def test_a_malformed_request_pipelined_behind_a_good_one(
    target: Target, fake: FakeUpstreamClient
) -> None:
    # When both arrive in one read, llhttp fails the buffer after uvicorn has already started
    # the good request's task: uvicorn answers one 400 and closes, so the good request gets no
    # answer, though it may still reach the upstream (then cancelled as a client disconnect,
    # DESIGN §4.3). RFC 9112 §9.3.2 lets a server close like this; clients retry unanswered
    # idempotent requests and pipeline no others. If the two arrive apart, both are answered.
    async with connect(target.proxy_url) as connection:
        await connection.send(
            request_bytes("GET", "/v1/models?n=1", [ECHO]) + framing_case(LENGTH, b"X-Nul: \x00")
        )
        first = await connection.read_response()
        if first.status == 200:
            assert first.json()["query"] == "n=1"
            assert_server_rejected(await connection.read_response())
        else:
            assert_server_rejected(first)
        assert await connection.closed_by_peer()
    await assert_still_serving(target.proxy_url)
    assert [entry["query"] for entry in fake.journal()][-1] == ""  # the check above went through


HALF_REQUESTS = {
    "request-line-only": b"POST /v1/chat/completions HTTP/1.1\r\n",
    "head-cut-mid-header": b"POST /v1/chat/completions HTTP/1.1\r\nHost: proxy.test\r\nContent-Le",
    "body-cut": request_bytes("POST", CHAT, [ECHO], BODY)[: -len(BODY) // 2],
    "chunked-body-cut": request_bytes(
        "POST",
        CHAT,
        [ECHO, (b"Transfer-Encoding", b"chunked")],
        chunked(BODY),
        content_length=False,
    )[:-10],
}


@pytest.mark.parametrize("data", HALF_REQUESTS.values(), ids=HALF_REQUESTS.keys())
async def test_a_client_that_sends_half_a_request_and_leaves(
    target: Target, fake: FakeUpstreamClient, data: bytes
) -> None:
    async with connect(target.proxy_url) as connection:
        await connection.send(data)
    await assert_still_serving(target.proxy_url)
    # The proxy forwards only whole bodies: the half request never reached the upstream.
    assert [entry["path"] for entry in fake.journal()] == ["/v1/models"]


# --- header values that are not ASCII -----------------------------------------------------------


async def test_non_ascii_header_values_pass_unchanged(
    request: pytest.FixtureRequest, target: Target, fake: FakeUpstreamClient
) -> None:
    # RFC 9110 §5.5 allows obs-text (0x80-0xFF) in field values: latin-1, UTF-8 and bytes that
    # are neither reach the upstream as the same bytes (issue 10, item 5; was a 400 before).
    values = [b"caf\xe9", b"\xc3\xa9t\xc3\xa9", b"\xff\xfe"]
    data = request_bytes("GET", "/v1/models", [ECHO, *((b"X-Text", v) for v in values)])
    response = await exchange(target.proxy_url, data)
    assert response.status == 200, response
    arrived = upstream_values(response.json(), "x-text")
    assert [value.encode("latin-1") for value in arrived] == values


async def test_a_non_ascii_default_header_goes_out_as_its_utf8_bytes(
    self_hosted: Target, fake: FakeUpstreamClient
) -> None:
    # Client values pass as bytes (latin-1 inside the proxy); a configured value is text and
    # must reach the upstream as its UTF-8 bytes, not as latin-1 of it or re-encoded twice.
    with start_proxy(fake.base_url, default_headers=(("X-Team", "Équipe ünï"),)) as proxy:
        data = request_bytes("GET", "/v1/models", [ECHO, (b"X-Client", b"\xc3\x89")])
        response = await exchange(proxy.url, data)
    assert response.status == 200, response
    seen = response.json()
    assert [v.encode("latin-1") for v in upstream_values(seen, "x-team")] == ["Équipe ünï".encode()]
    assert [v.encode("latin-1") for v in upstream_values(seen, "x-client")] == [b"\xc3\x89"]


# --- hostile upstream responses ---------------------------------------------------------------

BAD_UPSTREAM_HEADERS = {
    "bare-cr": b"X-Bad: a\rb",
    "bare-lf-line": b"X-Bad: a\nb",
    "nul": b"X-Bad: a\x00b",
    "space-in-name": b"X Bad: v",
    "space-before-colon": b"X-Bad : v",
    "no-colon": b"X-Bad",
}
BAD_UPSTREAM_HEADER_CASES = [
    *(pytest.param(line, id=name) for name, line in BAD_UPSTREAM_HEADERS.items()),
    pytest.param(b"X-Bad: a\x01b", id="soh"),
    pytest.param(b"X-Bad: a\x1bb", id="escape"),
    pytest.param(b"X-Bad: a\x7fb", id="del"),
]


@pytest.mark.parametrize("line", BAD_UPSTREAM_HEADER_CASES)
async def test_bad_bytes_in_upstream_response_headers_are_502(
    self_hosted: Target, secrets: tuple[bytes, ...], line: bytes
) -> None:
    response_bytes = (
        b"HTTP/1.1 200 OK\r\n" + line + b"\r\nContent-Type: application/json\r\n"
        b"Content-Length: 2\r\n\r\n{}"
    )
    async with (
        raw_tcp_upstream(answering(response_bytes)) as url,
        serving(
            start_proxy(f"{url}/v1", default_headers=tuple(E2E_DEFAULT_HEADERS.items()))
        ) as proxy,
    ):
        response = await exchange(proxy.url, request_bytes("GET", "/v1/models"))
        assert_proxy_error(response, 502, "upstream_bad_response")
        assert_no_secret(response, secrets, body=True)
        await assert_still_serving(proxy.url, "/healthz")


async def test_a_header_split_by_crlf_upstream_is_two_headers_not_an_injection(
    self_hosted: Target,
) -> None:
    # CRLF inside what the upstream meant as one value is just the end of that header line on
    # the wire; the proxy passes on the two well-formed headers, nothing more.
    response_bytes = (
        b"HTTP/1.1 200 OK\r\nX-A: a\r\nX-B: b\r\nContent-Type: application/json\r\n"
        b"Content-Length: 2\r\n\r\n{}"
    )
    async with (
        raw_tcp_upstream(answering(response_bytes)) as url,
        serving(start_proxy(f"{url}/v1")) as proxy,
    ):
        response = await exchange(proxy.url, request_bytes("GET", "/v1/models"))
    assert response.status == 200
    assert (response.values("x-a"), response.values("x-b"), response.body) == (
        [b"a"],
        [b"b"],
        b"{}",
    )


GZIPPED = gzip.compress(b'{"object": "list", "data": []}' * 200, mtime=0)
GZIP_RESPONSES = {
    "content-length": b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
    b"Content-Encoding: gzip\r\nContent-Length: %d\r\n\r\n" % len(GZIPPED) + GZIPPED,
    "chunked": b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
    b"Content-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n"
    + chunked(GZIPPED[:40], GZIPPED[40:]),
    "close-delimited": b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
    b"Content-Encoding: gzip\r\nConnection: close\r\n\r\n" + GZIPPED,
}


@pytest.mark.parametrize("response_bytes", GZIP_RESPONSES.values(), ids=GZIP_RESPONSES.keys())
@pytest.mark.parametrize("accept_encoding", [None, b"gzip"], ids=["no-accept", "accept-gzip"])
async def test_gzip_upstream_bodies_pass_raw_with_their_content_encoding(
    self_hosted: Target, response_bytes: bytes, accept_encoding: bytes | None
) -> None:
    heads: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        heads.append(await read_request_head(reader))
        writer.write(response_bytes)
        await writer.drain()
        writer.close()

    headers = [] if accept_encoding is None else [(b"Accept-Encoding", accept_encoding)]
    async with raw_tcp_upstream(handle) as url, serving(start_proxy(f"{url}/v1")) as proxy:
        response = await exchange(proxy.url, request_bytes("GET", "/v1/models", headers))
    assert response.status == 200
    assert response.header("content-encoding") == b"gzip"
    assert response.body == GZIPPED
    length = response.header("content-length")
    assert length is None or int(length) == len(GZIPPED)
    # The proxy's own client must not invent an Accept-Encoding the client did not send.
    (head,) = heads
    sent = [
        line.split(b":", 1)[1].strip()
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"accept-encoding:")
    ]
    assert sent == ([] if accept_encoding is None else [accept_encoding])


# --- fuzz ---------------------------------------------------------------------------------------

SPECIAL_BYTES = [
    b"\r\n",
    b"\r",
    b"\n",
    b"\x00",
    b":",
    b" ",
    b"\t",
    b"\xe9",
    b"\xff",
    b",",
    b"\r\n\r\n",
]
SPECIAL_NAMES = [
    b"Connection",
    b"Keep-Alive",
    b"Upgrade",
    b"TE",
    b"Trailer",
    b"Proxy-Connection",
    b"Authorization",
    b"X-Proxy-Default",
    b"X-Forwarded-For",
    b"Forwarded",
    b"Expect",
    b"Host",
    b"x-request-id",
    b"Content-Type",
]
SPECIAL_VALUES = [b"close", b"upgrade", b"keep-alive", b"100-continue", b"trailers", b"h2c"]
# Bytes that may end a header line and so re-frame the request: the body check skips them, as
# it skips `Connection`/`Upgrade` (an upgrade offer loses the body, a known uvicorn bug).
_REFRAMING = (b"\r", b"\n")

fragments = st.lists(
    st.one_of(st.binary(max_size=8), st.sampled_from(SPECIAL_BYTES)), max_size=5
).map(b"".join)
tokens = st.text(string.ascii_letters + string.digits + "-_.~!#", min_size=1, max_size=10)
printable = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=30)
# Weighted towards well-formed lines, so that about half the requests get through to the echo.
fuzz_names = st.one_of(
    st.sampled_from(SPECIAL_NAMES),
    tokens.map(str.encode),
    tokens.map(str.encode),
    fragments.filter(bool),  # an empty name is one more 400, no news
)
fuzz_values = st.one_of(
    st.sampled_from(SPECIAL_VALUES),
    printable.map(str.encode),
    printable.map(str.encode),
    fragments,
    st.binary(max_size=40),
)
fuzz_headers = st.lists(st.tuples(fuzz_names, fuzz_values), max_size=4)


async def _fuzz_once(url: str, headers: Headers, body: bytes) -> RawResponse:
    # Content-Length before the fuzzed lines: if they end the head early, the rest still holds
    # at least that many bytes, so the server never waits for a body that will not come.
    head = [b"POST /v1/chat/completions HTTP/1.1", b"Host: proxy.test", b"x-fake-scenario: echo"]
    head.append(b"Content-Length: %d" % len(body))
    head += [name + b": " + value for name, value in headers]
    async with connect(url) as connection:
        await connection.send(b"\r\n".join(head) + b"\r\n\r\n" + body)
        return await connection.read_response()


@given(headers=fuzz_headers, body=st.binary(max_size=2048))
@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
def test_fuzzed_headers_and_bodies_always_get_a_well_formed_answer(
    target: Target, secrets: tuple[bytes, ...], headers: Headers, body: bytes
) -> None:
    response = asyncio.run(_fuzz_once(target.proxy_url, headers, body))
    event(f"status {response.status}")
    assert response.status != 500, response
    if response.status >= 500:
        assert response.status in (502, 504), response
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    echoed = response.status == 200
    assert_no_secret(response, secrets, body=not echoed)
    names = {name.strip().lower() for name, _ in headers}
    reframed = any(bad in part for pair in headers for part in pair for bad in _REFRAMING)
    if echoed and not reframed and not {b"connection", b"upgrade"} & names:
        event("body checked")
        assert response.json()["body_sha256"] == hashlib.sha256(body).hexdigest()
    asyncio.run(assert_still_serving(target.proxy_url))
