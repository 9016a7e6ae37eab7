"""The proxy's loop of attempts, failover and SSE keep-alive, end to end (DESIGN §6, issue 4).

Each test starts its own proxy (retry settings are per proxy) in front of the shared fake
upstream, queues the upstream's answers, and reads the fake's journal for what happened.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time

import httpx
import pytest

from tests.e2e.conftest import Target, start_proxy
from tests.e2e.fake_client import FakeUpstreamClient
from tests.support import free_port, raw_tcp_upstream, read_request_head

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
UNAVAILABLE = {
    "status": 503,
    "body": {
        "error": {"message": "overloaded", "type": "server_error", "param": None, "code": None}
    },
}


def post_chat(proxy_url: str, *, stream: bool = False) -> httpx.Response:
    body = CHAT | {"stream": True} if stream else CHAT
    return httpx.post(f"{proxy_url}/v1/chat/completions", json=body, timeout=30)


def test_503_503_200_with_retries_on_returns_200_after_three_attempts(
    self_hosted: Target, fake: FakeUpstreamClient
) -> None:
    fake.queue(UNAVAILABLE, UNAVAILABLE, {})
    with start_proxy(fake.base_url, retry_statuses=frozenset({503}), max_attempts=3) as proxy:
        response = post_chat(proxy.url)
    assert response.status_code == 200
    assert response.json()["choices"][0]["message"]["content"] == "Hello from fake upstream!"
    assert len(fake.journal()) == 3


def test_with_retries_off_the_first_503_comes_back_unchanged(
    self_hosted: Target, fake: FakeUpstreamClient
) -> None:
    fake.queue(UNAVAILABLE, {})
    with start_proxy(fake.base_url) as proxy:
        response = post_chat(proxy.url)
    assert response.status_code == 503
    assert response.json() == UNAVAILABLE["body"]
    assert len(fake.journal()) == 1


def test_retries_stop_at_max_attempts_and_return_the_last_answer(
    self_hosted: Target, fake: FakeUpstreamClient
) -> None:
    fake.queue(UNAVAILABLE, UNAVAILABLE, UNAVAILABLE, {})
    with start_proxy(fake.base_url, retry_statuses=frozenset({503}), max_attempts=2) as proxy:
        response = post_chat(proxy.url)
    assert response.status_code == 503
    assert len(fake.journal()) == 2


def test_429_with_retry_after_1_waits_at_least_a_second(
    self_hosted: Target, fake: FakeUpstreamClient
) -> None:
    fake.queue({"status": 429, "headers": {"retry-after": "1"}}, {})
    with start_proxy(fake.base_url, retry_statuses=frozenset({429})) as proxy:
        response = post_chat(proxy.url)
    assert response.status_code == 200
    first, second = fake.journal()
    assert second["received_at"] - first["received_at"] >= 1.0


def test_retry_after_above_the_cap_returns_the_429_at_once(
    self_hosted: Target, fake: FakeUpstreamClient
) -> None:
    fake.queue({"status": 429, "headers": {"retry-after": "60"}}, {})
    with start_proxy(fake.base_url, retry_statuses=frozenset({429}), retry_after_cap=5.0) as proxy:
        response = post_chat(proxy.url)
    assert response.status_code == 429
    assert response.headers["retry-after"] == "60"
    assert len(fake.journal()) == 1


def test_first_upstream_refusing_connections_fails_over_to_the_second(
    self_hosted: Target, fake: FakeUpstreamClient
) -> None:
    refused = f"http://127.0.0.1:{free_port()}/v1"
    with start_proxy(refused, upstream_urls=(refused, fake.base_url)) as proxy:
        response = post_chat(proxy.url)
    assert response.status_code == 200
    assert len(fake.journal()) == 1


def test_connect_refused_everywhere_is_502_after_max_attempts(
    self_hosted: Target, caplog: pytest.LogCaptureFixture
) -> None:
    refused = f"http://127.0.0.1:{free_port()}/v1"
    caplog.set_level(logging.INFO, logger="llmproxy")
    with start_proxy(refused, max_attempts=3) as proxy:
        response = post_chat(proxy.url)
    assert response.status_code == 502
    assert response.json()["error"]["code"] == "upstream_unreachable"
    lines = [r.getMessage() for r in caplog.records if r.name == "llmproxy.access"]
    assert any("attempts=3" in line and " 502 " in line for line in lines), lines


def test_keepalive_comments_fill_silences_only_between_events(
    self_hosted: Target, fake: FakeUpstreamClient
) -> None:
    script = {"stream": True, "chunks": ["a", "b", "c"], "delay_per_chunk": 0.5}
    direct = httpx.post(
        f"{fake.base_url}/chat/completions",
        json=CHAT | {"stream": True},
        headers={"x-fake-script": json.dumps(script | {"id": "x", "created": 1})},
        timeout=30,
    ).content
    fake.queue(script | {"id": "x", "created": 1})
    with start_proxy(fake.base_url, sse_keepalive=0.15) as proxy:
        through = post_chat(proxy.url, stream=True).content
    assert b": keep-alive\n\n" in through
    events = through.split(b"\n\n")
    # A comment is always a whole event of its own, never inside one...
    assert all(e == b": keep-alive" or b": keep-alive" not in e for e in events)
    # ...and without the comments the stream is byte-identical to the upstream's.
    assert through.replace(b": keep-alive\n\n", b"") == direct


async def test_an_sse_body_with_content_length_gets_no_keepalive_comment(
    self_hosted: Target,
) -> None:
    # A comment would make the body longer than its announced length: uvicorn raised
    # "Response content longer than Content-Length" and cut the stream.
    events = [b'data: {"n":1}\n\n', b'data: {"n":2}\n\n', b"data: [DONE]\n\n"]
    body = b"".join(events)

    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await read_request_head(reader)
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                b"Content-Length: %d\r\n\r\n" % len(body) + events[0]
            )
            await writer.drain()
            await asyncio.sleep(0.6)  # a silence of four keep-alive intervals is the scenario
            writer.write(events[1] + events[2])
            await writer.drain()
            await reader.read()  # until the proxy closes or reuses it
        finally:
            writer.close()

    async with raw_tcp_upstream(upstream) as upstream_url:
        with start_proxy(f"{upstream_url}/v1", sse_keepalive=0.15) as proxy:
            async with httpx.AsyncClient(timeout=30) as client:
                response = await client.post(
                    f"{proxy.url}/v1/chat/completions", json=CHAT | {"stream": True}
                )
    assert response.status_code == 200
    assert response.content == body


async def test_a_coded_sse_body_gets_no_keepalive_comment(self_hosted: Target) -> None:
    # A plain-text comment put between the chunks of a compressed stream makes it undecodable.
    # The comment goes where the last chunk ended a line pair, which coded bytes may do by
    # chance: these do (found with usage injection, issue 13).
    parts = [b"\x1b\x07\x00\xf8\n\n", b"\x8a\x01\x03"]  # opaque to the proxy: "br"

    def chunk(data: bytes) -> bytes:
        return b"%x\r\n%b\r\n" % (len(data), data)

    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await read_request_head(reader)
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                b"Content-Encoding: br\r\nTransfer-Encoding: chunked\r\n\r\n" + chunk(parts[0])
            )
            await writer.drain()
            await asyncio.sleep(0.6)  # a silence of four keep-alive intervals is the scenario
            writer.write(chunk(parts[1]) + b"0\r\n\r\n")
            await writer.drain()
            await reader.read()  # until the proxy closes or reuses it
        finally:
            writer.close()

    async with raw_tcp_upstream(upstream) as upstream_url:
        with start_proxy(f"{upstream_url}/v1", sse_keepalive=0.15) as proxy:
            async with (
                httpx.AsyncClient(timeout=30) as client,
                client.stream(
                    "POST", f"{proxy.url}/v1/chat/completions", json=CHAT | {"stream": True}
                ) as response,
            ):
                raw = b"".join([part async for part in response.aiter_raw()])
    assert response.status_code == 200
    assert response.headers["content-encoding"] == "br"
    assert raw == b"".join(parts)  # the upstream's bytes, nothing put in


def test_keepalive_is_off_by_default(self_hosted: Target, fake: FakeUpstreamClient) -> None:
    fake.queue({"stream": True, "chunks": ["a", "b"], "delay_per_chunk": 0.4})
    with start_proxy(fake.base_url) as proxy:
        through = post_chat(proxy.url, stream=True).content
    assert b"keep-alive" not in through
    assert through.endswith(b"data: [DONE]\n\n")


def test_client_disconnect_is_counted_in_the_log_line(
    self_hosted: Target, fake: FakeUpstreamClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="llmproxy")
    fake.queue({"stream": True, "chunks": ["a"] * 20, "delay_per_chunk": 0.2})

    def access_lines() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.name == "llmproxy.access"]

    with start_proxy(fake.base_url) as proxy:
        with httpx.stream(
            "POST", f"{proxy.url}/v1/chat/completions", json=CHAT | {"stream": True}, timeout=30
        ) as response:
            next(response.iter_raw())
        # The client is gone; the fake sees the proxy's upstream connection close...
        fake.wait_for_journal(lambda j: bool(j) and j[0]["disconnected"], timeout=5)
        # ...and the request's log line, written as the forwarder returns, says why it ended.
        deadline = time.monotonic() + 5
        while not any("ending=client_disconnect" in line for line in access_lines()):
            assert time.monotonic() < deadline, access_lines()
            time.sleep(0.02)
