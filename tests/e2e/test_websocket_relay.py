"""The WebSocket relay end to end (DESIGN §10, issue 12): raw `websockets` clients against the
real proxy in front of the real fake upstream, over loopback.

What the upstream saw comes from the fake: its `echo` event (the handshake as it arrived) and
its journal (each session's handshake, messages, close frames, and when the client left). No
sleeps: every wait is on a message, a close, the journal or a log record, with a deadline. The
one long wait, in the idle-session test, is the behaviour under test.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.frames import Close
from websockets.http11 import Response
from websockets.protocol import State

from llmproxy.testing import ProxyServer
from tests.e2e.conftest import CLIENT_KEY, E2E_DEFAULT_HEADERS, Target, start_proxy
from tests.e2e.fake_client import FakeUpstreamClient, Journal
from tests.e2e.test_headers_e2e import HOP_BY_HOP

pytestmark = pytest.mark.e2e

DEADLINE = 5.0  # for anything that should take milliseconds
CLOSE_WITHIN = 1.0  # DESIGN §10: a lost side has the other side closed within one second
MIB = 2**20
PROXY_KEY = "sk-proxy-test"
KEY_SUBPROTOCOL = f"openai-insecure-api-key.{PROXY_KEY}"
SMALL_LIMIT = 65536

# Each hop's own handshake fields (RFC 6455 §4.1), written by whoever opens that hop.
HANDSHAKE_FIELDS = frozenset(
    {
        "host",
        "upgrade",
        "connection",
        "sec-websocket-key",
        "sec-websocket-version",
        "sec-websocket-extensions",
        "sec-websocket-protocol",
    }
)

Headers = list[tuple[str, str]]


# --- helpers ----------------------------------------------------------------------------------


def ws_url(http_url: str, path: str = "/v1/realtime", query: str = "") -> str:
    return http_url.replace("http://", "ws://", 1) + path + (f"?{query}" if query else "")


def script(**fields: Any) -> dict[str, str]:
    return {"x-fake-script": json.dumps(fields)}


def fake_echo(**fields: Any) -> str:
    """A text event the fake sends back unchanged."""
    return json.dumps({"type": "fake.echo", **fields})


async def recv_message(ws: ClientConnection) -> str | bytes:
    async with asyncio.timeout(DEADLINE):
        return await ws.recv()


async def recv_event(ws: ClientConnection) -> dict[str, Any]:
    message = await recv_message(ws)
    assert isinstance(message, str), message[:100]
    event: dict[str, Any] = json.loads(message)
    return event


async def round_trip(ws: ClientConnection) -> list[dict[str, Any]]:
    """Send `response.create`; return the events up to and including `response.done`."""
    await ws.send(json.dumps({"type": "response.create"}))
    events = [await recv_event(ws)]
    while events[-1]["type"] != "response.done":
        events.append(await recv_event(ws))
    return events


async def read_until_closed(ws: ClientConnection) -> None:
    async with asyncio.timeout(DEADLINE):
        while True:
            await ws.recv()


async def closed_by_peer(ws: ClientConnection) -> Close:
    """Wait for the proxy to close the session (reading past any messages); its close frame."""
    with pytest.raises(ConnectionClosed) as closed:
        await read_until_closed(ws)
    assert closed.value.rcvd is not None, "the connection ended without a close frame"
    return closed.value.rcvd


async def refusal(url: str, **options: Any) -> Response:
    """The HTTP response that refused the upgrade."""
    with pytest.raises(InvalidStatus) as refused:
        async with asyncio.timeout(DEADLINE * 2), connect(url, **options):
            pass
    return refused.value.response


def error_code(response: Response) -> str:
    assert response.headers["content-type"].startswith("application/json")
    body = json.loads(response.body)
    code: str = body["error"]["code"]
    return code


def sessions(journal: Journal) -> Journal:
    return [entry for entry in journal if entry["kind"] == "websocket"]


def one_session(predicate: Callable[[dict[str, Any]], bool]) -> Callable[[Journal], bool]:
    """A journal condition: exactly one WebSocket session, and `predicate` holds for it."""

    def condition(journal: Journal) -> bool:
        found = sessions(journal)
        return len(found) == 1 and predicate(found[0])

    return condition


def client_left(entry: dict[str, Any]) -> bool:
    return bool(entry["disconnected"])


async def wait_journal(fake: FakeUpstreamClient, condition: Callable[[Journal], bool]) -> Journal:
    # In a thread: the fake's client is synchronous, and this loop must keep serving the session.
    return await asyncio.to_thread(fake.wait_for_journal, condition, DEADLINE)


async def session_entry(
    fake: FakeUpstreamClient, predicate: Callable[[dict[str, Any]], bool] = lambda _: True
) -> dict[str, Any]:
    [entry] = sessions(await wait_journal(fake, one_session(predicate)))
    return entry


def header_values(headers: Iterable[Iterable[str]], name: str) -> list[str]:
    return [value for key, value in headers if key == name]


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


MetricSamples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def metric_samples(proxy_url: str) -> MetricSamples:
    response = httpx.get(f"{proxy_url}/metrics", timeout=10)
    assert response.status_code == 200
    found: MetricSamples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def metric(found: MetricSamples, name: str, **labels: str) -> float:
    return found.get((name, tuple(sorted(labels.items()))), 0.0)


ACTIVE = "llmproxy_websocket_sessions_active"


async def wait_for_metric(
    proxy_url: str, condition: Callable[[MetricSamples], bool]
) -> MetricSamples:
    deadline = time.monotonic() + DEADLINE
    while True:
        found = await asyncio.to_thread(metric_samples, proxy_url)
        if condition(found):
            return found
        assert time.monotonic() < deadline, f"metrics condition not met within {DEADLINE} s"
        await asyncio.sleep(0.02)


async def wait_for_access_line(caplog: pytest.LogCaptureFixture, request_id: str) -> list[str]:
    """The access log lines of the session with `request_id`, once there is one."""
    deadline = time.monotonic() + DEADLINE
    while True:
        lines = [
            record.getMessage()
            for record in caplog.records
            if record.name == "llmproxy.access" and request_id in record.getMessage()
        ]
        if lines:
            return lines
        assert time.monotonic() < deadline, f"no access line for {request_id} in {DEADLINE} s"
        await asyncio.sleep(0.02)


@pytest.fixture
def small_limit_proxy(self_hosted: Target, fake: FakeUpstreamClient) -> Iterable[ProxyServer]:
    with start_proxy(
        fake.base_url,
        default_headers=tuple(E2E_DEFAULT_HEADERS.items()),
        max_ws_message_bytes=SMALL_LIMIT,
    ) as proxy:
        yield proxy


@pytest.fixture
def keyed_proxy(self_hosted: Target, fake: FakeUpstreamClient) -> Iterable[ProxyServer]:
    with start_proxy(
        fake.base_url,
        default_headers=tuple(E2E_DEFAULT_HEADERS.items()),
        access_keys=(PROXY_KEY,),
    ) as proxy:
        yield proxy


# --- 1. the handshake -------------------------------------------------------------------------


async def test_the_handshake_merges_headers_with_defaults_winning_and_keeps_the_query(
    target: Target, fake: FakeUpstreamClient
) -> None:
    if not target.default_headers:
        pytest.skip("the proxy under test has no default headers to win")
    defaults = [(name.lower(), value) for name, value in target.default_headers.items()]
    clashing = [(name, f"client-{value}") for name, value in target.default_headers.items()]
    client_headers = [
        ("Authorization", f"Bearer {CLIENT_KEY}"),
        *clashing,  # every default, sent by the client with its own value
        ("OpenAI-Beta", "realtime=v1"),
        ("X-Custom", "one"),
        ("Keep-Alive", "timeout=5"),
        ("TE", "trailers"),
        ("Proxy-Authorization", "Basic dXNlcjpwYXNz"),
        ("OpenAI-Project", "proj_e2e"),
        ("X-Custom", "two"),
        ("X-Request-Id", f"ws-e2e-{uuid.uuid4().hex}"),
        *script(echo=True).items(),
    ]
    query = "model=gpt-realtime&x=%2F"
    async with connect(
        ws_url(target.proxy_url, query=query),
        additional_headers=client_headers,
        subprotocols=["realtime"],  # type: ignore[list-item]
    ) as ws:
        echo = await recv_event(ws)
        assert (await recv_event(ws))["type"] == "session.created"
        assert ws.request is not None
        sent = [(name.lower(), value) for name, value in ws.request.headers.raw_items()]
        assert ws.subprotocol == "realtime"  # the upstream's choice, back to the client
    assert echo["type"] == "fake.echo"
    assert (echo["path"], echo["raw_path"], echo["query"]) == ("/v1/realtime",) * 2 + (query,)
    received: Headers = [(name, value) for name, value in echo["headers"]]

    # The defaults, each exactly once with the proxy's value.
    for name, value in defaults:
        assert header_values(received, name) == [value], name
    # Every other client header but the hop-by-hop ones and the handshake's own: unchanged and
    # in order (the repeated X-Custom included).
    default_names = {name for name, _ in defaults}
    expected = [
        (name, value)
        for name, value in sent
        if name not in HOP_BY_HOP | HANDSHAKE_FIELDS | default_names
    ]
    assert ("openai-beta", "realtime=v1") in expected
    assert [
        (name, value) for name, value in received if name not in HANDSHAKE_FIELDS | default_names
    ] == expected
    for name in HOP_BY_HOP - {"upgrade", "connection"}:
        assert header_values(received, name) == [], name
    # The handshake's own fields are the proxy's: one key each, and not the client's key.
    client_key = header_values(sent, "sec-websocket-key")
    assert len(client_key) == 1
    upstream_key = header_values(received, "sec-websocket-key")
    assert len(upstream_key) == 1
    assert upstream_key != client_key
    assert header_values(received, "sec-websocket-version") == ["13"]
    assert header_values(received, "upgrade") == ["websocket"]
    assert [value.lower() for value in header_values(received, "connection")] == ["upgrade"]
    assert header_values(received, "sec-websocket-protocol") == ["realtime"]
    assert header_values(received, "host") == [fake.url.removeprefix("http://")]
    # The journal agrees with the echo.
    entry = await session_entry(fake)
    assert (entry["path"], entry["query"]) == ("/v1/realtime", query)
    assert [(name, value) for name, value in entry["headers"]] == received


# --- 2. messages ------------------------------------------------------------------------------


def one_mib_text() -> str:
    """A `fake.echo` event of exactly 1 MiB of UTF-8, multi-byte characters included."""
    head, tail = '{"type":"fake.echo","pad":"', '"}'
    wide = "€ü" * 1000  # 5 bytes per pair
    filler = MIB - len(head) - len(tail) - len(wide.encode())
    text = head + wide + "x" * filler + tail
    assert len(text.encode()) == MIB
    return text


async def test_a_1_mib_binary_and_a_1_mib_text_message_come_back_byte_identical(
    target: Target, fake: FakeUpstreamClient
) -> None:
    binary = random.Random(12).randbytes(MIB)  # noqa: S311 - test data, not a secret
    text = one_mib_text()
    async with connect(ws_url(target.proxy_url), max_size=2 * MIB) as ws:
        assert (await recv_event(ws))["type"] == "session.created"
        await ws.send(binary)
        assert await recv_message(ws) == binary
        await ws.send(text)
        assert await recv_message(ws) == text
    entry = await session_entry(fake, client_left)
    upstream_got = [
        (m["kind"], m["size"])
        for m in entry["websocket"]["messages"]
        if m["direction"] == "client_to_server"
    ]
    assert upstream_got == [("bytes", MIB), ("text", MIB)]


async def test_a_fragmented_message_arrives_whole(target: Target, fake: FakeUpstreamClient) -> None:
    text_parts = ['{"type":"fake.echo",', '"part":', '"whole"}']
    async with connect(ws_url(target.proxy_url)) as ws:
        await recv_event(ws)
        await ws.send([b"frag-", b"men", b"ted"])  # one message in three frames
        assert await recv_message(ws) == b"frag-mented"
        await ws.send(text_parts)
        assert await recv_message(ws) == "".join(text_parts)
    entry = await session_entry(fake, client_left)
    upstream_got = [
        (m["kind"], m["size"])
        for m in entry["websocket"]["messages"]
        if m["direction"] == "client_to_server"
    ]
    assert upstream_got == [("bytes", 11), ("text", len("".join(text_parts)))]


async def test_many_small_messages_keep_their_order_both_ways(
    target: Target, fake: FakeUpstreamClient
) -> None:
    count = 300
    messages: list[str | bytes] = [
        fake_echo(seq=index) if index % 2 else index.to_bytes(2, "big") for index in range(count)
    ]
    async with connect(ws_url(target.proxy_url)) as ws:
        await recv_event(ws)

        async def send_all() -> None:
            for message in messages:
                await ws.send(message)

        sending = asyncio.create_task(send_all())
        received = [await recv_message(ws) for _ in range(count)]
        await sending
    assert received == messages
    entry = await session_entry(fake, client_left)
    upstream_got = [
        m["text"] if m["kind"] == "text" else m["size"]
        for m in entry["websocket"]["messages"]
        if m["direction"] == "client_to_server"
    ]
    assert upstream_got == [m if isinstance(m, str) else 2 for m in messages]


# --- 3. close codes ---------------------------------------------------------------------------


@pytest.mark.parametrize(("code", "reason"), [(1000, ""), (4000, "bye")])
async def test_the_clients_close_code_and_reason_reach_the_upstream(
    target: Target, fake: FakeUpstreamClient, code: int, reason: str
) -> None:
    async with connect(ws_url(target.proxy_url)) as ws:
        await recv_event(ws)
        await ws.close(code, reason)
        assert ws.close_code == code  # the upstream's reply, relayed back
    entry = await session_entry(fake, client_left)
    close = entry["websocket"]["client_close"]
    assert (close["code"], close["reason"]) == (code, reason)


async def test_the_upstreams_close_code_and_reason_reach_the_client(
    target: Target, fake: FakeUpstreamClient
) -> None:
    headers = script(ending="close", after_chunks=1, close_code=4001, close_reason="reason")
    async with connect(ws_url(target.proxy_url), additional_headers=headers) as ws:
        assert (await recv_event(ws))["type"] == "session.created"
        close = await closed_by_peer(ws)
        assert (close.code, close.reason) == (4001, "reason")
        assert (ws.close_code, ws.close_reason) == (4001, "reason")
    entry = await session_entry(fake, lambda e: e["websocket"]["server_close"] is not None)
    assert entry["websocket"]["server_close"]["code"] == 4001


# --- 4. a side lost without a close -----------------------------------------------------------


async def test_a_client_lost_without_a_close_has_the_upstream_closed_1001_within_1_s(
    target: Target, fake: FakeUpstreamClient
) -> None:
    async with connect(ws_url(target.proxy_url)) as ws:
        await recv_event(ws)
        lost_at = time.time()
        ws.transport.abort()  # TCP gone, no close frame
    entry = await session_entry(fake, client_left)
    close = entry["websocket"]["client_close"]
    assert close["code"] == 1001
    assert close["at"] - lost_at < CLOSE_WITHIN


async def test_an_upstream_reset_closes_the_client_with_1014_within_1_s(
    target: Target, fake: FakeUpstreamClient
) -> None:
    headers = script(ending="reset", after_chunks=1)
    async with connect(ws_url(target.proxy_url), additional_headers=headers) as ws:
        assert (await recv_event(ws))["type"] == "session.created"
        created_at = time.monotonic()  # the fake resets right after sending it
        close = await closed_by_peer(ws)
        closed_within = time.monotonic() - created_at
    assert close.code == 1014
    assert closed_within < CLOSE_WITHIN
    entry = await session_entry(fake)
    assert entry["websocket"]["ending"] == "reset"


# --- 5. the message limit ---------------------------------------------------------------------


@pytest.mark.parametrize("compression", ["deflate", None], ids=["client-deflate", "client-plain"])
async def test_messages_of_exactly_the_limit_pass_both_ways(
    small_limit_proxy: ProxyServer, fake: FakeUpstreamClient, compression: str | None
) -> None:
    # Incompressible: under permessage-deflate its frames are a little longer than the message,
    # and the limit is on messages (DESIGN §10), not on what a hop's compression made of them.
    at_limit = random.Random(5).randbytes(SMALL_LIMIT)  # noqa: S311 - test data
    async with connect(ws_url(small_limit_proxy.url), compression=compression) as ws:
        await recv_event(ws)
        await ws.send(at_limit)
        assert await recv_message(ws) == at_limit  # the fake's echo is at the limit too
        assert ws.state is State.OPEN


async def test_a_client_message_over_the_limit_closes_1009_to_the_client_and_1001_upstream(
    small_limit_proxy: ProxyServer, fake: FakeUpstreamClient
) -> None:
    async with connect(ws_url(small_limit_proxy.url)) as ws:
        await recv_event(ws)
        await ws.send(b"\x00" * (SMALL_LIMIT + 1))
        close = await closed_by_peer(ws)
    assert close.code == 1009
    entry = await session_entry(fake, client_left)
    assert entry["websocket"]["client_close"]["code"] == 1001
    assert [m for m in entry["websocket"]["messages"] if m["direction"] == "client_to_server"] == []


async def test_an_upstream_message_over_the_limit_closes_1001_to_the_client_and_1009_upstream(
    small_limit_proxy: ProxyServer, fake: FakeUpstreamClient
) -> None:
    fake.queue({"chunks": ["x" * 70_000]})  # one delta event over the limit (too big a header)
    async with connect(ws_url(small_limit_proxy.url)) as ws:
        await recv_event(ws)
        await ws.send(json.dumps({"type": "response.create"}))
        assert (await recv_event(ws))["type"] == "response.created"
        close = await closed_by_peer(ws)
    assert close.code == 1001
    entry = await session_entry(fake, client_left)
    assert entry["websocket"]["client_close"]["code"] == 1009


# --- 6. access keys ---------------------------------------------------------------------------


def carries(entry: dict[str, Any], secret: str) -> bool:
    return any(secret in name or secret in value for name, value in entry["headers"]) or any(
        secret in offered for offered in entry["websocket"]["subprotocols"]
    )


async def test_a_browser_client_proves_itself_with_the_key_subprotocol(
    keyed_proxy: ProxyServer, fake: FakeUpstreamClient
) -> None:
    offered = ["realtime", KEY_SUBPROTOCOL]
    async with connect(ws_url(keyed_proxy.url), subprotocols=offered) as ws:  # type: ignore[arg-type]
        assert (await recv_event(ws))["type"] == "session.created"
        assert ws.subprotocol == "realtime"  # never the key
        assert ws.response is not None
        assert ws.response.headers.get_all("Sec-WebSocket-Protocol") == ["realtime"]
        assert PROXY_KEY not in str(list(ws.response.headers.raw_items()))
    entry = await session_entry(fake)
    assert not carries(entry, PROXY_KEY)
    assert entry["websocket"]["subprotocols"] == ["realtime"]
    assert header_values(entry["headers"], "sec-websocket-protocol") == ["realtime"]
    assert header_values(entry["headers"], "authorization") == [
        E2E_DEFAULT_HEADERS["Authorization"]
    ]


@pytest.mark.parametrize(
    ("header", "value"), [("Authorization", f"Bearer {PROXY_KEY}"), ("x-api-key", PROXY_KEY)]
)
async def test_a_proxy_key_header_is_removed_and_the_default_authorization_sent(
    keyed_proxy: ProxyServer, fake: FakeUpstreamClient, header: str, value: str
) -> None:
    async with connect(ws_url(keyed_proxy.url), additional_headers={header: value}) as ws:
        assert (await recv_event(ws))["type"] == "session.created"
    entry = await session_entry(fake)
    assert not carries(entry, PROXY_KEY)
    assert header_values(entry["headers"], "authorization") == [
        E2E_DEFAULT_HEADERS["Authorization"]
    ]


@pytest.mark.parametrize(
    "options",
    [
        pytest.param({"subprotocols": ["realtime", "openai-insecure-api-key.wrong"]}, id="wrong"),
        pytest.param({"subprotocols": ["realtime"]}, id="none"),
        pytest.param({"additional_headers": {"Authorization": "Bearer nope"}}, id="bearer"),
    ],
)
async def test_a_missing_or_wrong_key_is_refused_401_before_any_upgrade(
    keyed_proxy: ProxyServer, fake: FakeUpstreamClient, options: dict[str, Any]
) -> None:
    response = await refusal(ws_url(keyed_proxy.url), **options)
    assert response.status_code == 401
    assert error_code(response) == "invalid_proxy_key"
    assert "sec-websocket-accept" not in response.headers
    assert sessions(fake.journal()) == []  # the upstream was never asked


# --- 7. refusals ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "refusing",
    [
        pytest.param(
            {
                "status": 403,
                "body": {"error": {"message": "no", "type": "forbidden", "code": "no_realtime"}},
                "headers": {"x-refusal-reason": "policy"},
            },
            id="json",
        ),
        pytest.param(
            {"status": 503, "body": "upstream busy", "headers": {"x-refusal-reason": "busy"}},
            id="text",
        ),
    ],
)
async def test_an_upstream_refusal_reaches_the_client_unchanged(
    target: Target, fake: FakeUpstreamClient, refusing: dict[str, Any]
) -> None:
    headers = script(**refusing)
    direct = await refusal(ws_url(fake.url), additional_headers=headers)  # the oracle
    proxied = await refusal(ws_url(target.proxy_url), additional_headers=headers)
    assert proxied.status_code == direct.status_code == refusing["status"]
    assert proxied.body == direct.body
    body = refusing["body"]
    assert (json.loads(proxied.body) if isinstance(body, dict) else proxied.body.decode()) == body
    assert proxied.headers["x-refusal-reason"] == refusing["headers"]["x-refusal-reason"]
    assert proxied.headers["content-type"] == direct.headers["content-type"]
    assert proxied.headers["x-request-id"].startswith("req_")  # the upstream's own


# --- 8. no upstream session -------------------------------------------------------------------


async def test_an_unreachable_upstream_is_a_502_json_before_any_upgrade(
    self_hosted: Target,
) -> None:
    with start_proxy(f"http://127.0.0.1:{closed_port()}/v1") as proxy:
        response = await refusal(ws_url(proxy.url))
    assert response.status_code == 502
    assert error_code(response) == "upstream_unreachable"


@pytest.fixture
async def silent_upstream() -> AsyncIterator[tuple[int, list[bytes]]]:
    """A loopback server that accepts TCP and reads, never writing a byte: (port, what came)."""
    received: list[bytes] = []

    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            received.append(data)
        writer.close()

    server = await asyncio.start_server(swallow, "127.0.0.1", 0)
    port: int = server.sockets[0].getsockname()[1]
    yield port, received
    server.close()
    await server.wait_closed()


async def test_an_upstream_that_never_answers_the_handshake_is_a_504_json(
    self_hosted: Target, silent_upstream: tuple[int, list[bytes]]
) -> None:
    port, received = silent_upstream
    with start_proxy(f"http://127.0.0.1:{port}/v1", read_timeout=1.0) as proxy:
        started = time.monotonic()
        response = await refusal(ws_url(proxy.url))
        waited = time.monotonic() - started
    assert response.status_code == 504
    assert error_code(response) == "upstream_timeout"
    assert b"".join(received).startswith(b"GET /v1/realtime HTTP/1.1\r\n")
    assert 1.0 <= waited < 1.0 + DEADLINE


# --- 9. no idle timeout -----------------------------------------------------------------------

SILENCE = 90.0  # past nginx's 60 s default, the idle cut the issue names


async def test_a_silent_session_is_still_open_after_90_s(
    target: Target, fake: FakeUpstreamClient
) -> None:
    # No pings from this client: only the proxy's own keepalive could cross the session.
    async with connect(ws_url(target.proxy_url), ping_interval=None) as ws:
        assert (await recv_event(ws))["type"] == "session.created"
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(ws.recv(), SILENCE)  # nothing arrives, nothing closes
        assert ws.state is State.OPEN
        events = await round_trip(ws)
    assert events[-1]["type"] == "response.done"
    assert events[-1]["response"]["status"] == "completed"


# --- 10. operations ---------------------------------------------------------------------------


async def test_one_access_line_per_session_and_metrics_that_add_up(
    self_hosted: Target, fake: FakeUpstreamClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="llmproxy")
    url = self_hosted.proxy_url
    before = await wait_for_metric(url, lambda found: metric(found, ACTIVE) == 0)
    request_id = f"ws-log-{uuid.uuid4().hex}"
    headers = {"X-Request-Id": request_id, **script(chunks=["ab", "cd"])}
    create = json.dumps({"type": "response.create"})
    binary = b"\x07" * 100
    received: list[str | bytes] = []
    async with connect(ws_url(url), additional_headers=headers) as ws:
        received.append(await recv_message(ws))
        during = await asyncio.to_thread(metric_samples, url)
        await ws.send(create)
        while not (isinstance(received[-1], str) and '"response.done"' in received[-1]):
            received.append(await recv_message(ws))
        await ws.send(binary)
        echoed = await recv_message(ws)
        received.append(echoed)
        await ws.close(1000)
    assert echoed == binary
    assert len(received) == 6  # session.created, response.created, 2 deltas, done, the echo
    to_upstream = len(create) + len(binary)
    to_client = sum(len(m.encode() if isinstance(m, str) else m) for m in received)

    [line] = await wait_for_access_line(caplog, request_id)
    assert " WS /v1/realtime 101 " in line
    assert f"to_upstream=2msg/{to_upstream}B" in line
    assert f"to_client=6msg/{to_client}B" in line
    assert "client_close=1000" in line
    assert "upstream_close=1000" in line
    assert "ending=client_closed" in line

    after = await wait_for_metric(url, lambda found: metric(found, ACTIVE) == 0)
    assert metric(during, ACTIVE) == 1

    def delta(name: str, **labels: str) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert delta("llmproxy_websocket_sessions_total", close_code="1000") == 1
    messages = "llmproxy_websocket_messages_total"
    assert delta(messages, direction="client_to_upstream") == 2
    assert delta(messages, direction="upstream_to_client") == 6
    sizes = "llmproxy_websocket_bytes_total"
    assert delta(sizes, direction="client_to_upstream") == to_upstream
    assert delta(sizes, direction="upstream_to_client") == to_client


async def test_max_concurrent_requests_counts_open_sessions(
    self_hosted: Target, fake: FakeUpstreamClient
) -> None:
    with start_proxy(
        fake.base_url,
        default_headers=tuple(E2E_DEFAULT_HEADERS.items()),
        max_concurrent_requests=1,
    ) as proxy:
        url = ws_url(proxy.url)
        async with connect(url) as first:
            await recv_event(first)
            response = await refusal(url)
            assert response.status_code == 503
            assert error_code(response) == "proxy_overloaded"
            assert (await round_trip(first))[-1]["type"] == "response.done"  # unharmed
        # The ended session no longer counts.
        await wait_journal(fake, lambda journal: all(e["disconnected"] for e in sessions(journal)))
        async with connect(url) as second:
            assert (await recv_event(second))["type"] == "session.created"


# --- 12. compression --------------------------------------------------------------------------


async def test_permessage_deflate_is_negotiated_on_both_hops(
    target: Target, fake: FakeUpstreamClient
) -> None:
    compressible = b"realtime audio frame " * 50_000  # ~1 MiB
    async with connect(
        ws_url(target.proxy_url),
        additional_headers=script(echo=True),
        compression="deflate",
        max_size=2 * MIB,
    ) as ws:
        assert ws.response is not None
        offered = ws.response.headers.get("Sec-WebSocket-Extensions", "")
        assert offered.startswith("permessage-deflate")
        echo = await recv_event(ws)
        await recv_event(ws)
        await ws.send(compressible)
        assert await recv_message(ws) == compressible
    [upstream_offer] = header_values(echo["headers"], "sec-websocket-extensions")
    assert upstream_offer.startswith("permessage-deflate")


async def test_a_client_without_deflate_gets_none_while_the_upstream_hop_keeps_it(
    target: Target, fake: FakeUpstreamClient
) -> None:
    async with connect(
        ws_url(target.proxy_url), additional_headers=script(echo=True), compression=None
    ) as ws:
        assert ws.response is not None
        assert "Sec-WebSocket-Extensions" not in ws.response.headers
        echo = await recv_event(ws)
    [upstream_offer] = header_values(echo["headers"], "sec-websocket-extensions")
    assert upstream_offer.startswith("permessage-deflate")
