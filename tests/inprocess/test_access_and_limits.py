"""Access keys, body limit, concurrency cap, request ids, log lines (issue 5, DESIGN §3.3, §5)."""

from __future__ import annotations

import asyncio
import json
import logging

import httpx
import pytest
from aiohttp import web

from llmproxy.config import Configuration
from tests.inprocess.conftest import ProxyFactory, echo
from tests.support import ThrowawayUpstream, free_port, proxy_app, serve_asgi

PROXY_KEY = "proxy-key-ALPHA-0123456789"
OTHER_KEY = "proxy-key-BETA-9876543210"
UPSTREAM_KEY = "sk-upstream-SECRET-for-access-tests"


def upstream_headers(response: httpx.Response) -> dict[str, list[str]]:
    seen: dict[str, list[str]] = {}
    for name, value in response.json()["headers"]:
        seen.setdefault(name.lower(), []).append(value)
    return seen


@pytest.mark.parametrize(
    "headers",
    [
        {"Authorization": f"Bearer {PROXY_KEY}"},
        {"authorization": f"bearer   {OTHER_KEY}"},
        {"x-api-key": PROXY_KEY},
    ],
    ids=["bearer", "bearer-any-case-second-key", "x-api-key"],
)
async def test_a_valid_access_key_is_accepted_and_never_forwarded(
    upstream: ThrowawayUpstream, proxy: ProxyFactory, headers: dict[str, str]
) -> None:
    upstream.handler = echo
    async with proxy(
        upstream.url, access_keys=(PROXY_KEY, OTHER_KEY), upstream_api_key=UPSTREAM_KEY
    ) as client:
        response = await client.post("/v1/chat/completions", content=b"{}", headers=headers)
    assert response.status_code == 200
    seen = upstream_headers(response)
    assert seen["authorization"] == [f"Bearer {UPSTREAM_KEY}"]
    assert "x-api-key" not in seen
    assert PROXY_KEY not in response.text
    assert OTHER_KEY not in response.text


async def test_every_header_carrying_the_proxy_key_is_removed(
    upstream: ThrowawayUpstream, proxy: ProxyFactory
) -> None:
    upstream.handler = echo
    async with proxy(upstream.url, access_keys=(PROXY_KEY,)) as client:
        response = await client.post(
            "/v1/chat/completions",
            content=b"{}",
            headers=[("authorization", f"Bearer {PROXY_KEY}"), ("x-api-key", PROXY_KEY)],
        )
    assert response.status_code == 200
    assert PROXY_KEY not in response.text  # neither header reached the upstream


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong-key"},
        {"Authorization": PROXY_KEY},  # not a Bearer credential
        {"Authorization": f"Basic {PROXY_KEY}"},
        {"x-api-key": PROXY_KEY[:-1]},
        {"x-api-key": PROXY_KEY + "x"},
    ],
    ids=["missing", "wrong", "no-bearer", "basic", "prefix", "longer"],
)
async def test_a_missing_or_wrong_key_is_401_and_nothing_is_forwarded(
    upstream: ThrowawayUpstream, proxy: ProxyFactory, headers: dict[str, str]
) -> None:
    upstream.handler = echo
    async with proxy(upstream.url, access_keys=(PROXY_KEY,)) as client:
        response = await client.post("/v1/chat/completions", content=b"{}", headers=headers)
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_proxy_key"
    assert PROXY_KEY not in response.text
    assert upstream.requests == []


async def test_without_access_keys_the_client_authorization_passes(
    upstream: ThrowawayUpstream, proxy: ProxyFactory
) -> None:
    upstream.handler = echo
    async with proxy(upstream.url) as client:
        response = await client.post(
            "/v1/chat/completions", content=b"{}", headers={"Authorization": "Bearer sk-own"}
        )
    assert upstream_headers(response)["authorization"] == ["Bearer sk-own"]


async def test_declared_body_over_the_limit_is_413_before_reading(
    upstream: ThrowawayUpstream, proxy: ProxyFactory
) -> None:
    upstream.handler = echo
    async with proxy(upstream.url, max_body_bytes=1000) as client:
        fits = await client.post("/v1/embeddings", content=b"x" * 1000)
        too_large = await client.post("/v1/embeddings", content=b"x" * 1001)
    assert fits.status_code == 200
    assert too_large.status_code == 413
    assert too_large.json()["error"]["code"] == "request_too_large"
    assert len(upstream.requests) == 1


async def test_chunked_body_over_the_limit_is_413(upstream: ThrowawayUpstream) -> None:
    upstream.handler = echo

    async def chunks() -> object:
        for _ in range(20):
            yield b"y" * 100

    configuration = Configuration(upstream_urls=(f"{upstream.url}/v1",), max_body_bytes=1500)
    async with (
        serve_asgi(proxy_app(configuration)) as proxy_url,
        httpx.AsyncClient(base_url=proxy_url) as client,
    ):
        response = await client.post("/v1/embeddings", content=chunks())  # type: ignore[arg-type]
    assert response.status_code == 413
    assert upstream.requests == []


async def test_concurrency_cap_answers_503_beyond_it(
    upstream: ThrowawayUpstream, proxy: ProxyFactory
) -> None:
    release = asyncio.Event()
    arrived = asyncio.Event()

    async def held(request: web.Request) -> web.Response:
        arrived.set()
        await asyncio.wait_for(release.wait(), timeout=10)
        return web.json_response({"ok": True})

    upstream.handler = held
    async with proxy(upstream.url, max_concurrent_requests=1) as client:
        first = asyncio.create_task(client.get("/v1/models"))
        await asyncio.wait_for(arrived.wait(), timeout=5)
        second = await client.get("/v1/models")
        release.set()
        assert (await first).status_code == 200
        third = await client.get("/v1/models")
    assert second.status_code == 503
    assert second.json()["error"]["code"] == "proxy_overloaded"
    assert third.status_code == 200


async def test_request_id_is_kept_from_the_client_or_generated(
    upstream: ThrowawayUpstream, proxy: ProxyFactory
) -> None:
    async def with_upstream_id(request: web.Request) -> web.Response:
        response = await echo(request)
        response.headers["x-request-id"] = "req_upstream_own"
        return response

    upstream.handler = with_upstream_id
    async with proxy(upstream.url) as client:
        given = await client.get("/v1/models", headers={"x-request-id": "client-id-1"})
        generated = await client.get("/v1/models")
        unsafe = await client.get("/v1/models", headers={"x-request-id": "a b\tc"})
    assert given.headers["x-llmproxy-request-id"] == "client-id-1"
    assert upstream_headers(given)["x-request-id"] == ["client-id-1"]
    assert given.headers["x-request-id"] == "req_upstream_own"  # the upstream's passes back

    new_id = generated.headers["x-llmproxy-request-id"]
    assert len(new_id) == 32
    assert upstream_headers(generated)["x-request-id"] == [new_id]

    # An id unsafe to log is not used; the proxy generates its own for its log and reply.
    assert unsafe.headers["x-llmproxy-request-id"] != "a b\tc"


async def test_proxy_errors_carry_the_request_id(proxy: ProxyFactory) -> None:
    async with proxy(f"http://127.0.0.1:{free_port()}", max_attempts=1) as client:
        response = await client.get("/v1/models", headers={"x-request-id": "rid-502"})
    assert response.status_code == 502
    assert response.headers["x-llmproxy-request-id"] == "rid-502"


@pytest.mark.parametrize("log_format", ["text", "json"])
async def test_one_log_line_per_request_without_secrets(
    upstream: ThrowawayUpstream,
    proxy: ProxyFactory,
    caplog: pytest.LogCaptureFixture,
    log_format: str,
) -> None:
    upstream.handler = echo
    caplog.set_level(logging.INFO, logger="llmproxy.access")
    async with proxy(
        upstream.url,
        access_keys=(PROXY_KEY,),
        upstream_api_key=UPSTREAM_KEY,
        default_headers=(("X-Secret-Default", "default-header-SECRET"),),
        log_format=log_format,
    ) as client:
        await client.post(
            "/v1/chat/completions",
            content=b'{"a": 1}',
            headers={"x-api-key": PROXY_KEY, "x-request-id": "rid-log"},
        )
        await client.get("/v1/models")  # 401: no key
    lines = [r.getMessage() for r in caplog.records if r.name == "llmproxy.access"]
    assert len(lines) == 2
    for line in lines:
        for secret in (PROXY_KEY, UPSTREAM_KEY, "default-header-SECRET"):
            assert secret not in line
    if log_format == "json":
        first, second = (json.loads(line) for line in lines)
        assert first["request_id"] == "rid-log"
        assert first["status"] == 200
        assert first["upstream_status"] == 200
        assert first["attempts"] == 1
        assert first["bytes_in"] == 8
        assert first["bytes_out"] > 0
        assert first["ending"] == "complete"
        assert first["first_byte_ms"] is not None
        assert second["status"] == 401
        assert second["ending"] == "proxy_error"
    else:
        assert lines[0].startswith("rid-log POST /v1/chat/completions 200 ")
        assert "ending=complete" in lines[0]
        assert " 401 " in lines[1]
