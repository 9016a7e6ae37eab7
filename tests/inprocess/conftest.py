"""In-process fixtures: the proxy app driven through httpx's ASGI transport, and a throwaway
aiohttp upstream on a free loopback port."""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
from aiohttp import web

from llmproxy.config import Configuration
from llmproxy.upstream_client import UpstreamClient
from tests.support import (
    DEADLINE,
    PATIENT_KEEPALIVE,
    PATIENT_READ_TIMEOUT,
    ClientFactory,
    ThrowawayUpstream,
    lifespan,
    proxy_app,
)


@pytest.fixture
async def upstream() -> AsyncIterator[ThrowawayUpstream]:
    server = ThrowawayUpstream()
    await server.start()
    yield server
    await server.stop()


ProxyFactory = Callable[..., contextlib.AbstractAsyncContextManager[httpx.AsyncClient]]


@pytest.fixture
def proxy() -> ProxyFactory:
    """`async with proxy(upstream_url, **settings) as client`: an in-process proxy client."""

    @contextlib.asynccontextmanager
    async def start(upstream_url: str, **settings: Any) -> AsyncIterator[httpx.AsyncClient]:
        configuration = Configuration(upstream_urls=(f"{upstream_url}/v1",), **settings)
        async with lifespan(proxy_app(configuration)) as app:
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://proxy") as client:
                yield client

    return start


async def echo(request: web.Request) -> web.Response:
    body = await request.read()
    return web.json_response(
        {
            "method": request.method,
            "raw_path": request.raw_path,
            "headers": [[k.decode(), v.decode()] for k, v in request.raw_headers],
            "body_sha256": hashlib.sha256(body).hexdigest(),
            "body_length": len(body),
        }
    )


@pytest.fixture
async def make_client() -> AsyncIterator[ClientFactory]:
    """`make_client(**options)`: an UpstreamClient with patient defaults, closed after the test."""
    made: list[UpstreamClient] = []

    def make(**options: Any) -> UpstreamClient:
        options.setdefault("connect_timeout", DEADLINE)
        options.setdefault("read_timeout", PATIENT_READ_TIMEOUT)
        options.setdefault("keepalive", PATIENT_KEEPALIVE)
        client = UpstreamClient(**options)
        made.append(client)
        return client

    yield make
    for client in made:
        await client.close()
