"""Opt-in usage injection through real sockets (DESIGN §11, issue 13 item 3): the official SDK,
the real proxy with `usage_injection` on (and one with it off), the real fake upstream.

The fake streams as OpenAI does: the usage chunk and a `"usage": null` in every other chunk only
when the request asks `stream_options.include_usage: true`. So with the setting on, a client that
did not ask must get exactly the bytes the fake sends to the request the client sent (read from
the fake directly, ids and timestamps pinned), while the fake was sent the request asking for
usage (its journal's body digest) and the proxy counted the tokens the fake reported to that one.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
from collections.abc import Iterator
from typing import Any

import httpx
import httpx2
import pytest
from aiohttp import web

from llmproxy.testing import ProxyServer
from tests.e2e.conftest import GUARD, Target, start_proxy
from tests.e2e.fake_client import FakeUpstreamClient, Journal
from tests.e2e.sse_events import data_events
from tests.e2e.test_usage_e2e import (
    DEADLINE,
    KINDS,
    PINNED,
    PROMPT,
    PROXY_KEY,
    TEAM,
    TOKEN_FIELDS,
    Client,
    Exchange,
    access_line,
    assert_no_key_in,
    client_for,
    direct,
    fields_of,
    headers_for,
    metric_samples,
    token_deltas,
    usage_named_keys,
)
from tests.support import Handler, ThrowawayUpstream
from tests.unit.test_usage import reference_of_stream

pytestmark = pytest.mark.e2e

CHUNKS = ["Hel", "lo", ", wor", "ld", " — ça va? 🙂"]
PROMPT_TEXT = "Once upon a time, in a land far away,"
AUTH = {"authorization": f"Bearer {PROXY_KEY}"}


@pytest.fixture(scope="module")
def proxies(target: Target) -> Iterator[tuple[ProxyServer, ProxyServer]]:
    """(a proxy with usage_injection on, one with the setting left at its default), both with
    the named key of test_usage_e2e, in front of the suite's fake upstream."""
    if not target.self_hosted:
        pytest.skip("needs a proxy started by the suite")
    named = usage_named_keys()
    GUARD.secrets.append(PROXY_KEY.encode())
    try:
        with (
            start_proxy(
                target.fake.base_url,
                named_keys_from_file=named,
                usage_injection=True,
                read_timeout=10.0,
            ) as injecting,
            start_proxy(target.fake.base_url, named_keys_from_file=named, read_timeout=10.0) as off,
        ):
            yield injecting, off
    finally:
        GUARD.secrets.remove(PROXY_KEY.encode())


@pytest.fixture
def injecting(proxies: tuple[ProxyServer, ProxyServer]) -> ProxyServer:
    return proxies[0]


@pytest.fixture
def off(proxies: tuple[ProxyServer, ProxyServer]) -> ProxyServer:
    return proxies[1]


@pytest.fixture
def sdk_on(injecting: ProxyServer, fake: FakeUpstreamClient) -> Iterator[Client]:
    """The SDK (recording every body byte it receives) through the injecting proxy."""
    yield from client_for(injecting, PROXY_KEY)


@pytest.fixture
def sdk_off(off: ProxyServer, fake: FakeUpstreamClient) -> Iterator[Client]:
    """The SDK through the proxy with the setting off."""
    yield from client_for(off, PROXY_KEY)


@pytest.fixture
def lines(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level("INFO", logger="llmproxy.access")
    return caplog


def digest(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


def asking_for_usage(sent: bytes) -> bytes:
    """The request the upstream should get: the client's, with `include_usage: true`, in
    compact JSON (non-ASCII as UTF-8), the keys in their order, `stream_options` last if new."""
    request = json.loads(sent)
    options = request.get("stream_options") or {}
    request["stream_options"] = {**options, "include_usage": True}
    return json.dumps(request, separators=(",", ":"), ensure_ascii=False).encode()


def one_finished(journal: Journal) -> bool:
    return len(journal) == 1 and journal[0]["completed"]


def received_digest(fake: FakeUpstreamClient) -> str:
    """The body digest of the one request the upstream received (the fake's journal)."""
    (entry,) = fake.wait_for_journal(one_finished, DEADLINE)
    return str(entry["body_sha256"])


def answer_to(
    fake: FakeUpstreamClient, exchange: Exchange, body: bytes, script: dict[str, Any]
) -> bytes:
    """The fake's answer to `body` sent directly to the path of `exchange`."""
    request = httpx2.Request("POST", exchange.request.url, content=body)
    return direct(fake, Exchange(request), script)


def payloads(body: bytes) -> list[Any]:
    return [json.loads(data) for data in data_events(body) if data != "[DONE]"]


def stream_chat(client: Client, model: str, headers: dict[str, str], **options: Any) -> list[Any]:
    stream = client.sdk.chat.completions.create(
        model=model, messages=PROMPT, stream=True, extra_headers=headers, **options
    )
    return list(stream)


def stream_completions(
    client: Client, model: str, headers: dict[str, str], **options: Any
) -> list[Any]:
    stream = client.sdk.completions.create(
        model=model, prompt=PROMPT_TEXT, stream=True, extra_headers=headers, **options
    )
    return list(stream)


STREAMS = {"chat": stream_chat, "completions": stream_completions}


def text_of(endpoint: str, chunks: list[Any]) -> str:
    if endpoint == "chat":
        return "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    return "".join(chunk.choices[0].text for chunk in chunks if chunk.choices)


def assert_counted(
    injecting: ProxyServer,
    caplog: pytest.LogCaptureFixture,
    request_id: str,
    before: dict[Any, float],
    model: str,
    expected: tuple[str | None, int, int, int, int],
) -> None:
    """The access line and llmproxy_tokens_total have the tokens the upstream reported."""
    line = access_line(caplog, request_id)
    fields = fields_of(line)
    assert fields["key"] == TEAM
    assert fields["model"] == model
    assert "usage=unknown" not in line
    assert [int(fields[name]) for name in TOKEN_FIELDS] == list(expected[1:])
    after = metric_samples(injecting)
    assert token_deltas(before, after, TEAM, model) == dict(zip(KINDS, expected[1:], strict=True))
    assert_no_key_in(line, caplog.text)


# --- a stream that did not ask: asked upstream, answered as not asked, counted -------------------


@pytest.mark.parametrize("ending", ["done", "crlf", "split_event", "ping"])
@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_a_stream_without_include_usage_is_asked_upstream_and_answered_as_not_asked(
    injecting: ProxyServer,
    sdk_on: Client,
    sdk_off: Client,
    fake: FakeUpstreamClient,
    lines: pytest.LogCaptureFixture,
    endpoint: str,
    ending: str,
) -> None:
    model = f"inject-e2e-{endpoint}-{ending}"
    script = {**PINNED, "id": f"inject-{endpoint}-{ending}", "chunks": CHUNKS, "ending": ending}
    request_id = f"inject-{endpoint}-{ending}"
    before = metric_samples(injecting)

    chunks = STREAMS[endpoint](sdk_on, model, headers_for(script, request_id))

    exchange = sdk_on.last
    sent = exchange.request.content
    assert "stream_options" not in json.loads(sent)
    # The upstream was sent the request asking for usage ...
    asked = asking_for_usage(sent)
    assert received_digest(fake) == digest(asked)
    # ... and the client got, byte for byte, the upstream's answer to what the client sent:
    # no usage chunk, no `"usage": null`.
    not_asked_answer = direct(fake, exchange, script)
    assert reference_of_stream(not_asked_answer) is None  # the fake reports no usage unasked
    assert exchange.status == 200
    assert bytes(exchange.body) == not_asked_answer
    assert all(chunk.usage is None and chunk.choices for chunk in chunks)
    for payload in payloads(bytes(exchange.body)):
        assert "usage" not in payload
        assert payload["choices"] != []
    assert text_of(endpoint, chunks) == "".join(CHUNKS)
    # The same request with the setting off: the same bytes, the same text.
    fake.clear()
    chunks_off = STREAMS[endpoint](sdk_off, model, headers_for(script, request_id + "-off"))
    assert received_digest(fake) == digest(sent)
    assert bytes(sdk_off.last.body) == bytes(exchange.body)
    assert text_of(endpoint, chunks_off) == text_of(endpoint, chunks)
    # The proxy counted what the upstream reported to the request asking for usage.
    expected = reference_of_stream(answer_to(fake, exchange, asked, script))
    assert expected is not None
    assert expected[0] == model
    assert expected[1] > 0
    assert expected[2] > 0
    assert_counted(injecting, lines, request_id, before, model, expected)


def test_include_usage_false_is_asked_upstream_and_answered_without_usage(
    injecting: ProxyServer,
    sdk_on: Client,
    fake: FakeUpstreamClient,
    lines: pytest.LogCaptureFixture,
) -> None:
    # `include_usage: false` did not ask for usage (the code sets it true and hides the chunk).
    model = "inject-e2e-false"
    script = {**PINNED, "id": "inject-false", "chunks": CHUNKS}
    before = metric_samples(injecting)
    chunks = stream_chat(
        sdk_on,
        model,
        headers_for(script, "inject-false"),
        stream_options={"include_usage": False},
    )
    exchange = sdk_on.last
    sent = exchange.request.content
    assert json.loads(sent)["stream_options"] == {"include_usage": False}
    asked = asking_for_usage(sent)
    assert json.loads(asked)["stream_options"] == {"include_usage": True}
    assert received_digest(fake) == digest(asked)
    assert bytes(exchange.body) == direct(fake, exchange, script)
    assert all(chunk.usage is None for chunk in chunks)
    assert text_of("chat", chunks) == "".join(CHUNKS)
    expected = reference_of_stream(answer_to(fake, exchange, asked, script))
    assert expected is not None
    assert_counted(injecting, lines, "inject-false", before, model, expected)


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_a_stream_that_asked_for_usage_gets_its_usage_chunk_unchanged(
    injecting: ProxyServer,
    sdk_on: Client,
    fake: FakeUpstreamClient,
    lines: pytest.LogCaptureFixture,
    endpoint: str,
) -> None:
    model = f"inject-e2e-asked-{endpoint}"
    script = {**PINNED, "id": f"inject-asked-{endpoint}", "chunks": CHUNKS}
    request_id = f"inject-asked-{endpoint}"
    before = metric_samples(injecting)
    chunks = STREAMS[endpoint](
        sdk_on,
        model,
        headers_for(script, request_id),
        stream_options={"include_usage": True},
    )
    exchange = sdk_on.last
    assert received_digest(fake) == digest(exchange.request.content)  # forwarded as sent
    answer = direct(fake, exchange, script)
    assert bytes(exchange.body) == answer  # usage chunk and `"usage": null` kept
    usages = [chunk.usage for chunk in chunks if chunk.usage is not None]
    assert len(usages) == 1
    assert [chunk.choices for chunk in chunks if chunk.usage is not None] == [[]]
    assert all("usage" in payload for payload in payloads(answer))
    expected = reference_of_stream(answer)
    assert expected is not None
    assert (usages[0].prompt_tokens, usages[0].completion_tokens) == expected[1:3]
    assert_counted(injecting, lines, request_id, before, model, expected)


# --- the bytes of the request: changed only when injecting ---------------------------------------

# A body laid out as no JSON encoder would redo it: spaces, escapes, an odd key order.
ODD_LAYOUT = (
    b'{ "stream" : true,\n  "messages": [ {"role": "user",'
    b' "content": "caf\\u00e9 \\ud83d\\ude42"} ],\n  "model": "inject-e2e-layout",'
    b' "temperature": 1.50 }'
)


def post(proxy: ProxyServer, path: str, body: bytes, headers: dict[str, str]) -> httpx.Response:
    return httpx.post(
        f"{proxy.base_url}{path}",
        content=body,
        headers={**AUTH, "content-type": "application/json", **headers},
        timeout=10,
    )


def test_with_the_setting_off_the_forwarded_body_is_the_client_s_byte_for_byte(
    off: ProxyServer,
    injecting: ProxyServer,
    fake: FakeUpstreamClient,
    lines: pytest.LogCaptureFixture,
) -> None:
    script = {**PINNED, "id": "inject-layout", "chunks": CHUNKS}
    answer = post(off, "/chat/completions", ODD_LAYOUT, headers_for(script, "inject-layout-off"))
    assert answer.status_code == 200
    assert received_digest(fake) == digest(ODD_LAYOUT)
    fake.clear()
    direct_answer = httpx.post(
        f"{fake.base_url}/chat/completions",
        content=ODD_LAYOUT,
        headers={"content-type": "application/json", "x-fake-script": json.dumps(script)},
        timeout=10,
    )
    assert answer.content == direct_answer.content  # the answer too
    fields = fields_of(access_line(lines, "inject-layout-off"))
    assert fields["usage"] == "unknown"
    assert fields["usage_unknown_reason"] == "not_reported"
    # The same body with the setting on is re-encoded, asking for usage.
    fake.clear()
    on = post(injecting, "/chat/completions", ODD_LAYOUT, headers_for(script, "inject-layout-on"))
    assert on.status_code == 200
    asked = asking_for_usage(ODD_LAYOUT)
    opening = '{"stream":true,"messages":[{"role":"user","content":"café 🙂"}]'
    assert asked.startswith(opening.encode())
    assert received_digest(fake) == digest(asked)
    assert on.content == direct_answer.content


def nested(depth: int) -> bytes:
    return b'{"model": "m", "stream": true, "x": ' + b"[" * depth + b"]" * depth + b"}"


# Requests the injecting proxy must forward exactly as sent: not a stream, asking already, not
# for these paths, not JSON, or JSON that Python reads but cannot write back as the same request
# (deeper than its recursion limit, a lone surrogate, a number beyond a float).
UNTOUCHED: dict[str, tuple[str, bytes]] = {
    "not-streamed": ("/chat/completions", b'{"model": "m", "messages": [], "stream": false}'),
    "stream-absent": ("/completions", b'{"model": "m", "prompt": "x"}'),
    "stream-not-true": ("/chat/completions", b'{"model": "m", "stream": "true"}'),
    "asked-already": (
        "/chat/completions",
        b'{"model": "m", "stream": true, "stream_options": {"include_usage": true}}',
    ),
    "stream-options-not-object": (
        "/chat/completions",
        b'{"model": "m", "stream": true, "stream_options": "include_usage"}',
    ),
    "responses": ("/responses", b'{"model": "m", "input": "x", "stream": true}'),
    "embeddings": ("/embeddings", b'{"model": "m", "input": "x", "stream": true}'),
    "trailing-slash": ("/chat/completions/", b'{"model": "m", "stream": true}'),
    "a-list": ("/chat/completions", b'[{"model": "m", "stream": true}]'),
    "invalid-json": ("/chat/completions", b'{"model": "m", "stream": true,'),
    "not-utf-8": ("/chat/completions", b'{"model": "m", "stream": true, "user": "\xff"}'),
    "empty": ("/chat/completions", b""),
    "nested-deep": ("/chat/completions", nested(50_000)),
    "lone-surrogate": ("/chat/completions", b'{"model": "m", "stream": true, "user": "\\ud800"}'),
    "float-overflow": ("/chat/completions", b'{"model": "m", "stream": true, "top_p": 1e400}'),
    "nan": ("/chat/completions", b'{"model": "m", "stream": true, "top_p": NaN}'),
}


@pytest.mark.parametrize("name", sorted(UNTOUCHED))
def test_other_requests_reach_the_upstream_byte_for_byte(
    injecting: ProxyServer, fake: FakeUpstreamClient, name: str
) -> None:
    path, body = UNTOUCHED[name]
    # The fake echoes what arrived: its answer does not depend on reading the body.
    answer = post(injecting, path, body, {"x-fake-script": '{"echo": true}'})
    assert answer.status_code == 200, answer.text
    assert answer.json()["body_sha256"] == digest(body)
    assert received_digest(fake) == digest(body)


def test_a_non_streamed_answer_is_passed_unchanged(
    sdk_on: Client, fake: FakeUpstreamClient
) -> None:
    script = {**PINNED, "id": "inject-json"}
    completion = sdk_on.sdk.chat.completions.create(
        model="inject-e2e-json", messages=PROMPT, extra_headers=headers_for(script, "inject-json")
    )
    assert completion.usage is not None
    exchange = sdk_on.last
    assert received_digest(fake) == digest(exchange.request.content)
    assert bytes(exchange.body) == direct(fake, exchange, script)


def test_a_responses_stream_is_passed_unchanged(sdk_on: Client, fake: FakeUpstreamClient) -> None:
    script = {**PINNED, "id": "resp_inject", "chunks": CHUNKS}
    stream = sdk_on.sdk.responses.create(
        model="inject-e2e-responses",
        input="Say hello",
        stream=True,
        extra_headers=headers_for(script, "inject-responses"),
    )
    events = list(stream)
    assert events[-1].type == "response.completed"
    exchange = sdk_on.last
    assert received_digest(fake) == digest(exchange.request.content)
    assert bytes(exchange.body) == direct(fake, exchange, script)


def test_a_body_too_big_to_hold_still_gets_the_stream_it_asked_for(
    injecting: ProxyServer, fake: FakeUpstreamClient, lines: pytest.LogCaptureFixture
) -> None:
    # Over request_buffer_bytes (1 MiB) the proxy streams the body on as it arrives. Whether
    # or not it can ask for usage then, the client must get the stream it asked for.
    request = {
        "model": "inject-e2e-big",
        "messages": [{"role": "user", "content": "many words " * 150_000}],
        "stream": True,
    }
    body = json.dumps(request).encode()
    assert len(body) > 1 << 20
    script = {**PINNED, "id": "inject-big", "chunks": CHUNKS}
    answer = post(injecting, "/chat/completions", body, headers_for(script, "inject-big"))
    assert answer.status_code == 200
    received = received_digest(fake)
    assert received in (digest(body), digest(asking_for_usage(body)))
    fake.clear()
    direct_answer = httpx.post(
        f"{fake.base_url}/chat/completions",
        content=body,
        headers={"content-type": "application/json", "x-fake-script": json.dumps(script)},
        timeout=10,
    )
    assert answer.content == direct_answer.content
    fields = fields_of(access_line(lines, "inject-big"))
    if received == digest(body):
        assert fields["usage_unknown_reason"] == "not_reported"
    else:
        assert int(fields["input_tokens"]) > 0


# --- answers the fake does not send: framed by Content-Length, compressed -----------------------


FRAMED_SCRIPT = {**PINNED, "id": "inject-framed", "chunks": CHUNKS}


def fake_streams(fake: FakeUpstreamClient, script: dict[str, Any]) -> tuple[bytes, bytes]:
    """(the fake's chat stream when asked for usage, when not), to serve from elsewhere."""
    request = {"model": "inject-e2e-framed", "messages": PROMPT, "stream": True}
    answers = []
    for body in (asking_for_usage(json.dumps(request).encode()), json.dumps(request).encode()):
        answer = httpx.post(
            f"{fake.base_url}/chat/completions",
            content=body,
            headers={"content-type": "application/json", "x-fake-script": json.dumps(script)},
            timeout=10,
        )
        assert answer.status_code == 200
        answers.append(answer.content)
    assert reference_of_stream(answers[0]) is not None
    assert reference_of_stream(answers[1]) is None
    return answers[0], answers[1]


async def through_injecting_proxy(
    handler: Handler, accept_encoding: str = "identity"
) -> tuple[int, bytes]:
    upstream = ThrowawayUpstream()
    upstream.handler = handler
    await upstream.start()
    try:
        with start_proxy(
            f"{upstream.url}/v1", named_keys_from_file=usage_named_keys(), usage_injection=True
        ) as proxy:
            async with httpx.AsyncClient(timeout=10) as client:
                response = await client.post(
                    f"{proxy.base_url}/chat/completions",
                    json={"model": "m", "messages": PROMPT, "stream": True},
                    headers={**AUTH, "accept-encoding": accept_encoding},
                )
                return response.status_code, response.content
    finally:
        await upstream.stop()


async def test_a_stream_framed_by_content_length_arrives_whole_and_as_not_asked(
    proxies: tuple[ProxyServer, ProxyServer], fake: FakeUpstreamClient
) -> None:
    # Some servers announce an SSE body's length (buffering proxies, replays): removing bytes
    # must not leave a Content-Length the body no longer has.
    asked, plain = await asyncio.to_thread(fake_streams, fake, FRAMED_SCRIPT)

    async def framed(request: web.Request) -> web.StreamResponse:
        await request.read()
        return web.Response(body=asked, headers={"content-type": "text/event-stream"})

    status, body = await through_injecting_proxy(framed)
    assert status == 200
    assert body == plain


async def test_a_gzip_compressed_stream_arrives_as_not_asked(
    proxies: tuple[ProxyServer, ProxyServer], fake: FakeUpstreamClient
) -> None:
    # The SDK accepts gzip; a server that compresses its SSE still owes the client the stream
    # it asked for.
    asked, plain = await asyncio.to_thread(fake_streams, fake, FRAMED_SCRIPT)

    async def compressing(request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(
            headers={"content-type": "text/event-stream", "content-encoding": "gzip"}
        )
        response.enable_chunked_encoding()
        await response.prepare(request)
        await response.write(gzip.compress(asked, mtime=0))
        await response.write_eof()
        return response

    status, body = await through_injecting_proxy(compressing, "gzip")
    assert status == 200
    assert body == plain  # decoded by httpx if the proxy passed it on compressed


async def test_a_cr_framed_stream_flows_event_by_event_and_arrives_as_not_asked(
    proxies: tuple[ProxyServer, ProxyServer], fake: FakeUpstreamClient
) -> None:
    # SSE lets lines end with a lone CR. The events must still be found as they come: the
    # upstream sends the rest only once the client has the first content event.
    asked, plain = await asyncio.to_thread(fake_streams, fake, FRAMED_SCRIPT)
    assert b"\r" not in asked
    asked, plain = asked.replace(b"\n\n", b"\r\r"), plain.replace(b"\n\n", b"\r\r")
    events = [event + b"\r\r" for event in asked.split(b"\r\r")[:-1]]
    opening = b"".join(events[:2])  # the role delta and the first content event
    shown = b"".join(event + b"\r\r" for event in plain.split(b"\r\r")[:2])  # as the client
    first_seen = asyncio.Event()

    async def cr_framed(request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        await response.write(opening)
        await asyncio.wait_for(first_seen.wait(), DEADLINE)
        for event in events[2:]:
            await response.write(event)
        await response.write_eof()
        return response

    upstream = ThrowawayUpstream()
    upstream.handler = cr_framed
    await upstream.start()
    received = b""
    try:
        with start_proxy(
            f"{upstream.url}/v1", named_keys_from_file=usage_named_keys(), usage_injection=True
        ) as proxy:
            async with (
                httpx.AsyncClient(timeout=10) as client,
                client.stream(
                    "POST",
                    f"{proxy.base_url}/chat/completions",
                    json={"model": "m", "messages": PROMPT, "stream": True},
                    headers=AUTH,
                ) as response,
            ):
                assert response.status_code == 200
                async for chunk in response.aiter_raw():
                    received += chunk
                    if received.startswith(shown):
                        first_seen.set()
    finally:
        await upstream.stop()
    assert first_seen.is_set()
    assert received == plain
