"""The forwarding path against a throwaway upstream on a free port (DESIGN §3, §4, §5).

The proxy runs in-process (httpx's ASGI transport, lifespan run by the test) except where a test
must watch bytes arrive over time, which needs a real server (`serve_asgi`).
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
from collections.abc import MutableMapping
from typing import Any

import httpx
import pytest
from aiohttp import web

from llmproxy.config import Configuration
from tests.inprocess.conftest import ProxyFactory, echo
from tests.support import (
    ThrowawayUpstream,
    free_port,
    lifespan,
    proxy_app,
    raw_tcp_upstream,
    read_request_head,
    serve_asgi,
)

DEFAULT_KEY = "sk-upstream-DEFAULT-secret"


async def test_body_and_query_are_forwarded_byte_identically(
    upstream: ThrowawayUpstream, proxy: ProxyFactory
) -> None:
    upstream.handler = echo
    body = bytes(range(256)) * 3 + b'{"model": "x", "base_url": "http://evil"}'
    path_and_query = "/v1/files/a%2Fb%20c/content?x=1&y=%20%2F&x=2&empty=&flag"
    async with proxy(upstream.url) as client:
        response = await client.post(path_and_query, content=body)
    assert response.status_code == 200
    seen = response.json()
    assert seen["method"] == "POST"
    assert seen["raw_path"] == path_and_query
    assert seen["body_sha256"] == hashlib.sha256(body).hexdigest()
    assert seen["body_length"] == len(body)


@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"])
async def test_every_method_goes_through_the_same_forwarder(
    upstream: ThrowawayUpstream, proxy: ProxyFactory, method: str
) -> None:
    upstream.handler = echo
    async with proxy(upstream.url) as client:
        response = await client.request(method, "/v1/some/new/endpoint?q=1")
    assert response.json()["method"] == method
    assert response.json()["raw_path"] == "/v1/some/new/endpoint?q=1"


async def test_get_models_is_forwarded(upstream: ThrowawayUpstream, proxy: ProxyFactory) -> None:
    models = {"object": "list", "data": [{"id": "gpt-test", "object": "model"}]}

    async def list_models(request: web.Request) -> web.Response:
        assert request.path == "/v1/models"
        return web.json_response(models, headers={"x-request-id": "req_models"})

    upstream.handler = list_models
    async with proxy(upstream.url) as client:
        response = await client.get("/v1/models")
    assert response.status_code == 200
    assert response.json() == models
    assert response.headers["x-request-id"] == "req_models"


async def test_default_headers_win_and_hop_by_hop_are_dropped(
    upstream: ThrowawayUpstream, proxy: ProxyFactory
) -> None:
    upstream.handler = echo
    async with proxy(
        upstream.url,
        default_headers=(("OpenAI-Organization", "org-default"),),
        upstream_api_key=DEFAULT_KEY,
    ) as client:
        response = await client.post(
            "/v1/chat/completions",
            content=b"{}",
            headers=[
                ("authorization", "Bearer client-key"),
                ("openai-organization", "org-client"),
                ("connection", "authorization, x-listed"),
                ("x-listed", "gone"),
                ("keep-alive", "timeout=5"),
                ("x-trace", "1"),
                ("x-trace", "2"),
            ],
        )
    headers = [(k.lower(), v) for k, v in response.json()["headers"]]
    assert ("authorization", f"Bearer {DEFAULT_KEY}") in headers
    assert ("openai-organization", "org-default") in headers
    names = [k for k, _ in headers]
    assert names.count("authorization") == 1
    assert names.count("openai-organization") == 1
    assert "x-listed" not in names
    assert "keep-alive" not in names
    assert "connection" not in names or dict(headers)["connection"] == "keep-alive"
    assert [v for k, v in headers if k == "x-trace"] == ["1", "2"]
    assert dict(headers)["host"] == upstream.url.removeprefix("http://")


async def test_429_passes_through_with_retry_after_and_body(
    upstream: ThrowawayUpstream, proxy: ProxyFactory
) -> None:
    error_body = (
        b'{"error": {"message": "Rate limit reached", "type": "requests",'
        b' "param": null, "code": "rate_limit_exceeded"}}'
    )

    async def rate_limited(request: web.Request) -> web.Response:
        return web.Response(
            status=429,
            body=error_body,
            headers={
                "Content-Type": "application/json",
                "retry-after": "7",
                "x-ratelimit-remaining-requests": "0",
                "x-request-id": "req_429",
            },
        )

    upstream.handler = rate_limited
    async with proxy(upstream.url) as client:
        response = await client.post("/v1/chat/completions", json={"model": "m"})
    assert response.status_code == 429
    assert response.content == error_body
    assert response.headers["retry-after"] == "7"
    assert response.headers["x-ratelimit-remaining-requests"] == "0"
    assert response.headers["x-request-id"] == "req_429"


async def test_text_plain_500_passes_through(
    upstream: ThrowawayUpstream, proxy: ProxyFactory
) -> None:
    async def broken(request: web.Request) -> web.Response:
        return web.Response(status=500, text="upstream exploded\n", content_type="text/plain")

    upstream.handler = broken
    async with proxy(upstream.url) as client:
        response = await client.post("/v1/chat/completions", json={})
    assert response.status_code == 500
    assert response.text == "upstream exploded\n"
    assert response.headers["content-type"].startswith("text/plain")


async def test_gzip_body_passes_through_raw_with_its_encoding(
    upstream: ThrowawayUpstream, proxy: ProxyFactory
) -> None:
    payload = json.dumps({"object": "list", "data": ["x" * 1000]}).encode()
    compressed = gzip.compress(payload)

    async def gzipped(request: web.Request) -> web.Response:
        return web.Response(
            body=compressed,
            headers={"Content-Encoding": "gzip", "Content-Type": "application/json"},
        )

    upstream.handler = gzipped
    async with proxy(upstream.url) as client, client.stream("GET", "/v1/models") as response:
        raw = b"".join([chunk async for chunk in response.aiter_raw()])
    assert response.headers["content-encoding"] == "gzip"
    assert raw == compressed
    assert gzip.decompress(raw) == payload


def assert_proxy_error(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert error["code"] == code
    assert error["param"] is None
    assert isinstance(error["message"], str)
    assert isinstance(error["type"], str)
    assert DEFAULT_KEY not in response.text


async def test_connect_refused_is_502_json(proxy: ProxyFactory) -> None:
    closed_port = free_port()
    async with proxy(f"http://127.0.0.1:{closed_port}", upstream_api_key=DEFAULT_KEY) as client:
        response = await client.post("/v1/chat/completions", json={})
    assert_proxy_error(response, 502, "upstream_unreachable")


async def test_no_headers_within_read_timeout_is_504_json(
    upstream: ThrowawayUpstream, proxy: ProxyFactory
) -> None:
    never = asyncio.Event()

    async def silent(request: web.Request) -> web.Response:
        await never.wait()
        raise AssertionError("unreachable")

    upstream.handler = silent
    async with proxy(upstream.url, read_timeout=0.3, upstream_api_key=DEFAULT_KEY) as client:
        response = await client.post("/v1/chat/completions", json={})
    assert_proxy_error(response, 504, "upstream_timeout")


async def test_non_http_upstream_is_502_bad_response(proxy: ProxyFactory) -> None:
    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request_head(reader)
        writer.write(b"SSH-2.0-OpenSSH_9.6\r\nthis is not http\r\n\r\n")
        await writer.drain()
        writer.close()

    async with raw_tcp_upstream(garbage) as url, proxy(url) as client:
        response = await client.post("/v1/chat/completions", json={})
    assert_proxy_error(response, 502, "upstream_bad_response")


async def test_control_bytes_in_upstream_header_is_502_not_a_crash(proxy: ProxyFactory) -> None:
    async def injected(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nX-Bad: a\rb\r\nContent-Length: 2\r\n\r\n{}")
        await writer.drain()
        writer.close()

    async with raw_tcp_upstream(injected) as url, proxy(url) as client:
        response = await client.get("/v1/models")
    assert_proxy_error(response, 502, "upstream_bad_response")


@pytest.mark.parametrize("path", ["/", "/admin", "/v2/models", "/healthz/x", "/v1x"])
async def test_paths_outside_v1_are_404_in_openai_shape(
    upstream: ThrowawayUpstream, proxy: ProxyFactory, path: str
) -> None:
    upstream.handler = echo
    async with proxy(upstream.url) as client:
        response = await client.get(path)
    assert_proxy_error(response, 404, "not_found")
    assert upstream.requests == []


@pytest.mark.parametrize(
    "raw_path", ["/v1/../admin", "/v1/%2e%2e/admin", "/v1/models/./x", "/v1/.%2E/x", "/v1/a/.."]
)
async def test_dot_segments_are_refused_over_a_raw_socket(
    upstream: ThrowawayUpstream, raw_path: str
) -> None:
    upstream.handler = echo
    configuration = Configuration(upstream_urls=(f"{upstream.url}/v1",))
    async with serve_asgi(proxy_app(configuration)) as proxy_url:
        host, port = proxy_url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(f"GET {raw_path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        await writer.drain()
        response = await asyncio.wait_for(reader.read(), timeout=5)
        writer.close()
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 ")
    assert json.loads(body)["error"]["code"] == "invalid_path"
    assert upstream.requests == []


async def test_healthz_and_readyz(proxy: ProxyFactory) -> None:
    async with proxy("http://127.0.0.1:9") as client:
        assert (await client.get("/healthz")).json() == {"status": "ok"}
        assert (await client.get("/readyz")).json() == {"status": "ready"}


# --- Streaming over a real server: each chunk must reach the client before the next exists. ---


async def test_stream_chunks_pass_through_one_by_one(upstream: ThrowawayUpstream) -> None:
    events = [f'data: {{"n": {i}}}\n\n'.encode() for i in range(5)] + [b"data: [DONE]\n\n"]
    client_got: list[asyncio.Event] = [asyncio.Event() for _ in events]

    async def lockstep_stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for index, event in enumerate(events):
            await response.write(event)
            # The next event is written only once the client holds this one: a proxy that
            # buffered (or re-chunked to a fixed size) would stall here and time out.
            await asyncio.wait_for(client_got[index].wait(), timeout=5)
        await response.write_eof()
        return response

    upstream.handler = lockstep_stream
    configuration = Configuration(upstream_urls=(f"{upstream.url}/v1",))
    received: list[bytes] = []
    async with (
        serve_asgi(proxy_app(configuration)) as proxy_url,
        httpx.AsyncClient(base_url=proxy_url) as client,
        client.stream("POST", "/v1/chat/completions", json={"stream": True}) as response,
    ):
        assert response.headers["content-type"] == "text/event-stream"
        buffer = b""
        async for chunk in response.aiter_raw():
            buffer += chunk
            while (
                buffer.startswith(events[len(received)]) if len(received) < len(events) else False
            ):
                received.append(events[len(received)])
                buffer = buffer[len(received[-1]) :]
                client_got[len(received) - 1].set()
    assert received == events
    assert buffer == b""


async def test_upstream_reset_mid_sse_ends_with_error_event_and_no_done() -> None:
    async def reset_after_two(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request_head(reader)
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        for n in range(2):
            event = f'data: {{"n": {n}}}\n\n'.encode()
            writer.write(f"{len(event):x}\r\n".encode() + event + b"\r\n")
        await writer.drain()
        writer.transport.abort()  # RST, mid-stream, without the terminating chunk

    async with raw_tcp_upstream(reset_after_two) as url:
        configuration = Configuration(upstream_urls=(f"{url}/v1",))
        async with (
            serve_asgi(proxy_app(configuration)) as proxy_url,
            httpx.AsyncClient(base_url=proxy_url) as client,
        ):
            response = await client.post("/v1/chat/completions", json={"stream": True})
    assert response.status_code == 200
    events = [e for e in response.text.split("\n\n") if e]
    assert events[:2] == ['data: {"n": 0}', 'data: {"n": 1}']
    assert len(events) == 3
    final = json.loads(events[2].removeprefix("data: "))
    assert final["error"]["code"] == "upstream_stream_interrupted"
    assert "[DONE]" not in response.text


async def test_upstream_reset_mid_json_body_aborts_the_client_connection() -> None:
    async def reset_mid_body(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request_head(reader)
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100\r\n\r\n" + b'{"partial": '
        )
        await writer.drain()
        writer.transport.abort()

    async with raw_tcp_upstream(reset_mid_body) as url:
        configuration = Configuration(upstream_urls=(f"{url}/v1",))
        async with (
            serve_asgi(proxy_app(configuration)) as proxy_url,
            httpx.AsyncClient(base_url=proxy_url) as client,
        ):
            with pytest.raises(httpx.RemoteProtocolError):
                await client.get("/v1/models")


async def test_before_start_up_readyz_and_v1_answer_503_not_ready() -> None:
    app = proxy_app(Configuration(upstream_urls=("http://127.0.0.1:9/v1",)))  # lifespan not run
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://proxy") as client:
        healthz = await client.get("/healthz")
        readyz = await client.get("/readyz")
        forwarded = await client.get("/v1/models")
    assert healthz.status_code == 200
    assert readyz.status_code == 503
    assert forwarded.status_code == 503
    assert forwarded.json()["error"]["code"] == "proxy_not_ready"


async def test_a_header_with_a_line_break_reaching_the_forwarder_gets_400_not_a_write(
    upstream: ThrowawayUpstream,
) -> None:
    # Servers' parsers refuse such values; under one that did not, nothing must reach the wire.
    configuration = Configuration(upstream_urls=(f"{upstream.url}/v1",))
    sent: list[MutableMapping[str, Any]] = []

    async def receive() -> MutableMapping[str, Any]:
        return {"type": "http.request", "body": b"{}", "more_body": False}

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/v1/chat/completions",
        "raw_path": b"/v1/chat/completions",
        "query_string": b"",
        "headers": [(b"content-length", b"2"), (b"x-a", b"1\r\nx-injected: 1")],
    }
    async with lifespan(proxy_app(configuration)) as app:
        await app(scope, receive, send)
    assert sent[0]["status"] == 400
    assert b"invalid_header" in sent[1]["body"]
    assert upstream.requests == []


# -- issue 10: the upstream side's reuse rule and framing, seen through the proxy --------------


def _keep_alive_then_close_unanswered() -> Any:
    """First connection: one answer, then it closes as the next request arrives, unanswered."""
    connections = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        await read_request_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n")
        writer.write(b"Content-Length: 2\r\n\r\n{}")
        await writer.drain()
        if connections == 1:
            await read_request_head(reader)
        else:
            await reader.read()
        writer.close()  # unanswered, on the first connection

    return handler


def _access_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "llmproxy.access"]


async def test_a_post_on_a_reused_connection_closed_unanswered_is_502_connection_closed(
    proxy: ProxyFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="llmproxy.access")
    async with raw_tcp_upstream(_keep_alive_then_close_unanswered()) as url, proxy(url) as client:
        assert (await client.post("/v1/chat/completions", json={})).status_code == 200
        response = await client.post("/v1/chat/completions", json={})
    assert_proxy_error(response, 502, "upstream_connection_closed")
    assert " stale_retries=0 " in _access_lines(caplog)[-1]


async def test_a_get_on_a_reused_connection_closed_unanswered_is_retried_and_logged(
    proxy: ProxyFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="llmproxy.access")
    async with raw_tcp_upstream(_keep_alive_then_close_unanswered()) as url, proxy(url) as client:
        assert (await client.get("/v1/models")).status_code == 200
        response = await client.get("/v1/models")
    assert response.status_code == 200
    line = _access_lines(caplog)[-1]
    assert " attempts=1 stale_retries=1 " in line, line


async def test_a_transfer_coding_other_than_chunked_is_502_bad_response(
    proxy: ProxyFactory,
) -> None:
    async def gzip_coded(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n" + gzip.compress(b"{}"))
        await writer.drain()
        writer.close()  # the close would end the body

    async with raw_tcp_upstream(gzip_coded) as url, proxy(url) as client:
        response = await client.get("/v1/models")
    assert_proxy_error(response, 502, "upstream_bad_response")
