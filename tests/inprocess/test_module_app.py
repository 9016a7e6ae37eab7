"""The challenge's test shape: `llmproxy.app.app` with `get_configuration` overridden through
`app.dependency_overrides`, driven with FastAPI's `TestClient` and with httpx's ASGI transport,
in front of the real fake upstream (the `fake_upstream` fixture of its pytest plugin).

Neither client has `ProxyHttpProtocol` under it, so these requests take the forwarder's
fallback disconnect watcher (a task waiting in `receive`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Iterable, Iterator

import httpx
import pytest
from fastapi.testclient import TestClient

from fake_upstream.server import FakeUpstreamServer
from llmproxy.app import UNHARDENED_WARNING, ProxyApp, app, get_configuration
from llmproxy.config import Configuration
from tests.support import lifespan

DEFAULTS = (("Authorization", "Bearer sk-proxy-default"), ("X-Team", "from-proxy"))
# The client's own values of both defaults, in another case, and one header of its own.
CLIENT_HEADERS = {
    "authorization": "Bearer sk-client",
    "x-TEAM": "from-client",
    "x-client-only": "kept",
}
ECHO = {"x-fake-scenario": "echo"}
STREAMED = {"x-fake-script": json.dumps({"stream": True, "chunks": ["Hel", "lo", " there"]})}
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
def proxy_app(fake_upstream: FakeUpstreamServer) -> Iterator[ProxyApp]:
    """The module-level app, configured for the fake upstream; its overrides cleared after.

    The app is one object for the whole process, so an override left on it would configure
    every later test: the assertion makes a leak fail the next test that uses this fixture.
    """
    assert app.dependency_overrides == {}, "a previous test left dependency overrides"
    configuration = Configuration(upstream_urls=(fake_upstream.base_url,), default_headers=DEFAULTS)
    app.dependency_overrides[get_configuration] = lambda: configuration
    yield app
    app.dependency_overrides.clear()


def values(headers: Iterable[Iterable[str]], name: str) -> list[str]:
    """Every value of `name` (in any case) among `[name, value]` pairs."""
    return [value for key, value in headers if key.lower() == name]


def assert_merged(headers: Iterable[Iterable[str]]) -> None:
    """What the upstream received: each default once, winning over the client's own value."""
    pairs = [tuple(pair) for pair in headers]
    assert values(pairs, "authorization") == ["Bearer sk-proxy-default"]
    assert values(pairs, "x-team") == ["from-proxy"]
    assert values(pairs, "x-client-only") == ["kept"]


def content_deltas(lines: Iterable[str]) -> list[str]:
    """The content of each chat-completion chunk of an SSE body, and `[DONE]` at its end."""
    deltas = []
    for line in lines:
        if not line.startswith("data: "):
            continue
        data = line.removeprefix("data: ")
        if data == "[DONE]":
            deltas.append(data)
            continue
        for choice in json.loads(data)["choices"]:
            if content := choice["delta"].get("content"):
                deltas.append(content)
    return deltas


def received_headers(fake_upstream: FakeUpstreamServer) -> list[list[str]]:
    (entry,) = fake_upstream.journal()
    headers: list[list[str]] = entry["headers"]
    return headers


def test_test_client_forwards_with_the_defaults_winning(proxy_app: ProxyApp) -> None:
    with TestClient(proxy_app) as client:
        response = client.post("/v1/chat/completions", json=CHAT, headers=CLIENT_HEADERS | ECHO)
    assert response.status_code == 200
    echoed = response.json()
    assert echoed["path"] == "/v1/chat/completions"
    assert_merged(echoed["headers"])


def test_test_client_streams_the_chunks(
    proxy_app: ProxyApp, fake_upstream: FakeUpstreamServer
) -> None:
    with (
        TestClient(proxy_app) as client,
        client.stream(
            "POST",
            "/v1/chat/completions",
            json=CHAT | {"stream": True},
            headers=CLIENT_HEADERS | STREAMED,
        ) as response,
    ):
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        deltas = content_deltas(response.iter_lines())
    assert deltas == ["Hel", "lo", " there", "[DONE]"]
    assert_merged(received_headers(fake_upstream))


@pytest.fixture
async def asgi_client(proxy_app: ProxyApp) -> AsyncIterator[httpx.AsyncClient]:
    """httpx over `ASGITransport`, which runs no lifespan: the test runs it around the client."""
    async with lifespan(proxy_app):
        transport = httpx.ASGITransport(app=proxy_app)
        async with httpx.AsyncClient(transport=transport, base_url="http://proxy") as client:
            yield client


async def test_asgi_transport_forwards_with_the_defaults_winning(
    asgi_client: httpx.AsyncClient,
) -> None:
    response = await asgi_client.post(
        "/v1/chat/completions", json=CHAT, headers=CLIENT_HEADERS | ECHO
    )
    assert response.status_code == 200
    assert_merged(response.json()["headers"])


async def test_asgi_transport_streams_the_chunks(
    asgi_client: httpx.AsyncClient, fake_upstream: FakeUpstreamServer
) -> None:
    async with asgi_client.stream(
        "POST",
        "/v1/chat/completions",
        json=CHAT | {"stream": True},
        headers=CLIENT_HEADERS | STREAMED,
    ) as response:
        assert response.status_code == 200
        deltas = content_deltas([line async for line in response.aiter_lines()])
    assert deltas == ["Hel", "lo", " there", "[DONE]"]
    assert_merged(received_headers(fake_upstream))


def test_the_override_is_what_configures_the_app(fake_upstream: FakeUpstreamServer) -> None:
    """The start-up takes the upstream from the override (here one that refuses connections)."""
    unreachable = Configuration(upstream_urls=("http://127.0.0.1:9/v1",), connect_timeout=2.0)
    app.dependency_overrides[get_configuration] = lambda: unreachable
    try:
        with TestClient(app) as client:
            response = client.post("/v1/chat/completions", json=CHAT, headers=ECHO)
    finally:
        app.dependency_overrides.clear()
    assert response.status_code == 502
    assert response.json()["error"]["code"] == "upstream_unreachable"


def test_the_app_is_ready_only_inside_its_lifespan(proxy_app: ProxyApp) -> None:
    with TestClient(proxy_app) as client:
        assert client.get("/readyz").status_code == 200
    assert proxy_app.forwarder is None  # nothing of one test's start-up is left for the next


def test_a_client_without_the_hardened_protocol_is_warned_of_once(
    proxy_app: ProxyApp, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="llmproxy"), TestClient(proxy_app) as client:
        client.get("/healthz")
        client.get("/readyz")
    assert [r.getMessage() for r in caplog.records].count(UNHARDENED_WARNING) == 1
    assert "`llmproxy serve`" in UNHARDENED_WARNING
