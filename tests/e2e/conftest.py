"""End-to-end fixtures: the real proxy in front of the real fake upstream, over loopback.

By default both are started here (the fake by the `fake_upstream` pytest plugin). With
`--proxy-url` / `--fake-upstream-url` the same tests run against an already running proxy
whose upstream is a running fake upstream (contract mode, DESIGN §8.4).
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest
import redis

from llmproxy.config import Configuration
from llmproxy.testing import ProxyServer
from tests.e2e.fake_client import FakeUpstreamClient
from tests.e2e.secrets_guard import SecretsGuard
from tests.redis_server import RedisServer

UPSTREAM_SECRET = "sk-e2e-upstream-SECRET-value"
E2E_DEFAULT_HEADERS = {
    "Authorization": f"Bearer {UPSTREAM_SECRET}",
    "OpenAI-Organization": "org-e2e-default",
    "X-Proxy-Default": "from-proxy",
}
CLIENT_KEY = "sk-client-side-key"


@dataclass(frozen=True)
class Target:
    """What the end-to-end tests talk to."""

    proxy_url: str
    fake: FakeUpstreamClient
    default_headers: dict[str, str]
    self_hosted: bool

    @property
    def proxy_base_url(self) -> str:
        return f"{self.proxy_url}/v1"


GUARD = SecretsGuard([UPSTREAM_SECRET, *E2E_DEFAULT_HEADERS.values()])


def start_proxy(upstream_base_url: str, **settings: object) -> ProxyServer:
    """A real llmproxy server in front of `upstream_base_url` (not yet started); everything it
    sends is checked for secrets."""
    settings.setdefault("upstream_urls", (upstream_base_url,))
    configuration = Configuration(**settings)  # type: ignore[arg-type]
    return ProxyServer(configuration, wrap_app=GUARD.wrap)


@pytest.fixture(scope="session", autouse=True)
def secrets_never_leave() -> Iterator[SecretsGuard]:
    """Across the whole end-to-end session: no secret in any response or log record."""
    root = logging.getLogger()
    proxy_logger = logging.getLogger("llmproxy")
    level = proxy_logger.level
    proxy_logger.setLevel(logging.INFO)  # so the per-request lines exist to be checked
    root.addHandler(GUARD)
    yield GUARD
    root.removeHandler(GUARD)
    proxy_logger.setLevel(level)
    assert GUARD.violations == [], GUARD.violations
    if GUARD.responses_checked > 10:
        # Requests were proxied, so their log lines must have been seen too: a guard that
        # watched no log record would prove nothing about the logs.
        assert GUARD.records_checked > 0


@pytest.fixture(scope="session")
def target(request: pytest.FixtureRequest) -> Iterator[Target]:
    proxy_url = request.config.getoption("--proxy-url")
    if proxy_url:
        fake_url = request.config.getoption("--fake-upstream-url")
        if not fake_url:
            pytest.fail("--proxy-url needs --fake-upstream-url (the proxy's upstream)")
        defaults = json.loads(request.config.getoption("--proxy-default-headers") or "{}")
        fake = FakeUpstreamClient(fake_url)
        yield Target(proxy_url.rstrip("/"), fake, defaults, self_hosted=False)
        fake.close()
        return
    fake_server = request.getfixturevalue("fake_upstream_server")
    fake = FakeUpstreamClient(fake_server.url)
    with start_proxy(
        fake.base_url,
        default_headers=tuple(E2E_DEFAULT_HEADERS.items()),
        read_timeout=10.0,
    ) as proxy:
        yield Target(proxy.url, fake, E2E_DEFAULT_HEADERS, self_hosted=True)
    fake.close()


@pytest.fixture
def fake(target: Target) -> FakeUpstreamClient:
    """The fake upstream behind the proxy, with an empty journal and queue."""
    target.fake.clear()
    return target.fake


@pytest.fixture
def self_hosted(target: Target) -> Target:
    """Skip in contract mode: the test needs to configure the proxy itself."""
    if not target.self_hosted:
        pytest.skip("needs a proxy started by the suite")
    return target


@pytest.fixture
def sdk(target: Target, fake: FakeUpstreamClient) -> Iterator[openai.OpenAI]:
    """The official synchronous SDK pointed at the proxy, with its own retries off."""
    with openai.OpenAI(base_url=target.proxy_base_url, api_key=CLIENT_KEY, max_retries=0) as client:
        yield client


@pytest.fixture
async def async_sdk(target: Target, fake: FakeUpstreamClient) -> AsyncIterator[openai.AsyncOpenAI]:
    """The official asynchronous SDK pointed at the proxy, with its own retries off."""
    async with openai.AsyncOpenAI(
        base_url=target.proxy_base_url, api_key=CLIENT_KEY, max_retries=0
    ) as client:
        yield client


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A real Redis for the shared-limit tests (tests/redis_server.py), empty for each test."""
    with RedisServer(tmp_path) as server:
        yield server


@pytest.fixture
def redis_client(redis_server: RedisServer) -> Iterator[redis.Redis]:
    """A redis-py client of `redis_server`, to look at the limiter's state."""
    client = redis.Redis.from_url(redis_server.url, socket_timeout=5.0)
    yield client
    client.close()
