"""Egress through a real forward proxy (issue 14, item 1): proxy.py on loopback between llmproxy
and the fake upstream, for `http://` upstreams in absolute form and `https://` ones through a
`CONNECT` tunnel with trustme certificates; proxy authentication and its refusals; NO_PROXY and
`upstream_proxy=none` going direct. What went through the proxy is read from its access log."""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import trustme
from fastapi import FastAPI

from fake_upstream.app import create_app, journal_of
from llmproxy.config import load_configuration
from llmproxy.egress import PROXY_VARIABLES
from llmproxy.testing import ProxyServer
from tests.forward_proxy import ForwardProxy, start_forward_proxy
from tests.support import free_port, llmproxy_environment, serve_asgi, serve_subprocess

pytestmark = pytest.mark.e2e

USER = "egress-user"
PASSWORD = "p@ss:w/rd%SECRET"  # every character that needs percent-encoding in a URL
USERINFO = "egress-user:p%40ss%3Aw%2Frd%25SECRET"
WRONG_USERINFO = "egress-user:WRONG-p%40ss%3Aw%2Frd%25SECRET"
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}


@dataclass(frozen=True)
class Upstream:
    """A fake upstream as llmproxy is pointed at it, and what it received."""

    base_url: str
    authority: str  # `host:port`, as proxy.py logs it
    app: FastAPI

    def journal(self) -> list[dict[str, Any]]:
        return journal_of(self.app).entries()

    def via_headers(self) -> list[str]:
        """The `Via` header of each request received (proxy.py adds one when it forwards)."""
        return [dict(entry["headers"]).get("via", "") for entry in self.journal()]


@pytest.fixture
def forward_proxy(tmp_path: Path) -> Iterator[ForwardProxy]:
    with start_forward_proxy(tmp_path / "open") as proxy:
        yield proxy


@pytest.fixture
def authenticating_proxy(tmp_path: Path) -> Iterator[ForwardProxy]:
    with start_forward_proxy(tmp_path / "auth", basic_auth=f"{USER}:{PASSWORD}") as proxy:
        yield proxy


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(the upstream's key and chain for 127.0.0.1, the CA that signed it), as PEM files."""
    directory = tmp_path_factory.mktemp("egress-tls")
    ca = trustme.CA()
    key_and_chain = directory / "upstream.pem"
    ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(str(key_and_chain))
    ca_file = directory / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    return key_and_chain, ca_file


@asynccontextmanager
async def serve_fake(scheme: str, certificates: tuple[Path, Path]) -> AsyncIterator[Upstream]:
    """The fake upstream over `http` or `https` (trustme's certificate) on a loopback port."""
    app = create_app()
    options = {"ssl_certfile": str(certificates[0])} if scheme == "https" else {}
    async with serve_asgi(app, **options) as plain_url:
        url = plain_url.replace("http://", f"{scheme}://")
        yield Upstream(f"{url}/v1", plain_url.removeprefix("http://"), app)


def proxy_server(upstream: Upstream, ca_file: Path, **environ: str) -> ProxyServer:
    """llmproxy in this process, configured from `environ` as `llmproxy serve` would be."""
    settings = {
        "LLMPROXY_UPSTREAM_URL": upstream.base_url,
        "LLMPROXY_UPSTREAM_CA_BUNDLE": str(ca_file),
        "LLMPROXY_CONNECT_TIMEOUT": "5",
        "LLMPROXY_READ_TIMEOUT": "10",
    }
    return ProxyServer(load_configuration(settings | environ))


def client() -> httpx.AsyncClient:
    return httpx.AsyncClient(timeout=10, trust_env=False)  # the test's own client goes direct


async def post_chat(url: str, **extra: object) -> httpx.Response:
    async with client() as http:
        return await http.post(f"{url}/v1/chat/completions", json=CHAT | extra)


def proxy_variable(scheme: str) -> str:
    return "HTTPS_PROXY" if scheme == "https" else "HTTP_PROXY"


def assert_streamed_whole(response: httpx.Response) -> None:
    assert response.status_code == 200, response.text
    assert "Hello" in response.text
    assert response.text.rstrip().endswith("data: [DONE]")


def assert_upstream_proxy_error(response: httpx.Response, address: str) -> str:
    """The 502 naming the egress proxy's `host:port`; returns its message."""
    assert response.status_code == 502, response.text
    error = json.loads(response.text)["error"]
    assert error["code"] == "upstream_proxy_error", error
    assert address in error["message"]
    return str(error["message"])


def credentials_in(text: str) -> list[str]:
    """Any form of the proxy's credentials found in `text`."""
    encoded = [
        base64.b64encode(f"{USER}:{p}".encode()).decode() for p in (PASSWORD, f"WRONG-{PASSWORD}")
    ]
    forms = [PASSWORD, USERINFO, WRONG_USERINFO, *encoded]
    return [form for form in forms if form in text]


# --- through the proxy ---------------------------------------------------------------------------


async def test_an_http_upstream_is_reached_through_http_proxy_in_absolute_form(
    forward_proxy: ForwardProxy, certificates: tuple[Path, Path]
) -> None:
    async with serve_fake("http", certificates) as upstream:
        with proxy_server(upstream, certificates[1], HTTP_PROXY=forward_proxy.url()) as proxy:
            first = await post_chat(proxy.url)
            second = await post_chat(proxy.url, stream=False)
            # One connection to the proxy, kept alive between the two requests.
            assert proxy.app.forwarder is not None
            assert proxy.app.forwarder.upstream_client.pool_counts() == (0, 1)
        assert_streamed_whole(first)
        assert second.status_code == 200, second.text
        assert "Hello" in second.json()["choices"][0]["message"]["content"]
        # proxy.py forwarded both over llmproxy's one connection to it (it adds its Via to the
        # first request of a connection only), and logged that connection, which asked for the
        # upstream's URL in absolute form.
        first_via, _ = upstream.via_headers()
        assert "proxy.py" in first_via
    lines = forward_proxy.settled_access_log()
    assert [(line.method, line.target) for line in lines] == [
        ("POST", f"{upstream.authority}/v1/chat/completions")
    ]


async def test_an_https_upstream_streams_through_a_connect_tunnel_with_the_sdk(
    forward_proxy: ForwardProxy, certificates: tuple[Path, Path]
) -> None:
    """`llmproxy serve` as deployed: HTTPS_PROXY in its environment, the private CA through
    upstream_ca_bundle alone, two calls of the official SDK over one tunnel."""
    _, ca_file = certificates
    async with serve_fake("https", certificates) as upstream:
        env = {k: v for k, v in llmproxy_environment().items() if k not in PROXY_VARIABLES}
        env.pop("SSL_CERT_FILE", None)  # the bundle alone, added to the system's store
        env |= {
            "LLMPROXY_UPSTREAM_URL": upstream.base_url,
            "LLMPROXY_UPSTREAM_CA_BUNDLE": str(ca_file),
            "HTTPS_PROXY": forward_proxy.url(),
        }
        with serve_subprocess(env) as (_, proxy_url):
            async with openai.AsyncOpenAI(
                base_url=f"{proxy_url}/v1",
                api_key="sk-client",
                max_retries=0,
                http_client=openai.DefaultAsyncHttpxClient(timeout=10, trust_env=False),
            ) as sdk:
                stream = await sdk.chat.completions.create(
                    model="m", messages=[{"role": "user", "content": "hi"}], stream=True
                )
                text = "".join(
                    [
                        chunk.choices[0].delta.content or ""
                        async for chunk in stream
                        if chunk.choices
                    ]
                )
                again = await sdk.chat.completions.create(
                    model="m", messages=[{"role": "user", "content": "again"}]
                )
        assert "Hello" in text
        assert again.choices[0].message.content
        # The tunnel carried TLS end to end: proxy.py could not add its Via.
        assert upstream.via_headers() == ["", ""]
    # Both calls went through one tunnel, pooled like any connection.
    assert [line.target for line in forward_proxy.connects()] == [upstream.authority]


async def test_tls_through_the_tunnel_is_verified_against_the_upstreams_name(
    forward_proxy: ForwardProxy, tmp_path: Path
) -> None:
    ca = trustme.CA()
    key_and_chain = tmp_path / "other.pem"
    ca.issue_cert("upstream.example").private_key_and_cert_chain_pem.write_to_path(
        str(key_and_chain)
    )
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    async with serve_fake("https", (key_and_chain, ca_file)) as upstream:
        settings = {"HTTPS_PROXY": forward_proxy.url(), "LLMPROXY_MAX_ATTEMPTS": "1"}
        with proxy_server(upstream, ca_file, **settings) as proxy:
            response = await post_chat(proxy.url)
        # A trusted CA, but a certificate for another name: refused, never sent.
        assert response.status_code == 502, response.text
        assert json.loads(response.text)["error"]["code"] == "upstream_unreachable"
        assert upstream.journal() == []
    assert [line.target for line in forward_proxy.connects()] == [upstream.authority]


async def test_the_upstreams_own_407_through_a_tunnel_is_relayed_as_the_upstreams(
    forward_proxy: ForwardProxy, certificates: tuple[Path, Path]
) -> None:
    """Inside a CONNECT tunnel only the upstream can answer (TLS end to end): its 407 is its
    own, not the egress proxy asking for credentials."""
    async with serve_fake("https", certificates) as upstream:
        with proxy_server(upstream, certificates[1], HTTPS_PROXY=forward_proxy.url()) as proxy:
            async with client() as http:
                response = await http.post(
                    f"{proxy.url}/v1/chat/completions",
                    json=CHAT,
                    headers={"x-fake-script": json.dumps({"status": 407})},
                )
        assert len(upstream.journal()) == 1
    assert [line.target for line in forward_proxy.connects()] == [upstream.authority]
    assert response.status_code == 407, response.text
    assert "upstream_proxy_error" not in response.text


# --- proxy authentication -------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["http", "https"])
async def test_credentials_in_the_proxy_url_authenticate_and_are_never_logged(
    authenticating_proxy: ForwardProxy,
    certificates: tuple[Path, Path],
    scheme: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="llmproxy")
    async with serve_fake(scheme, certificates) as upstream:
        url = authenticating_proxy.url(USERINFO)
        with proxy_server(upstream, certificates[1], **{proxy_variable(scheme): url}) as proxy:
            response = await post_chat(proxy.url)
        assert_streamed_whole(response)
        assert len(upstream.journal()) == 1
    methods = [line.method for line in authenticating_proxy.settled_access_log()]
    assert methods == ["CONNECT" if scheme == "https" else "POST"]
    assert caplog.records, "llmproxy logged nothing: the check below would prove nothing"
    assert credentials_in(caplog.text) == []


@pytest.mark.parametrize("userinfo", [None, WRONG_USERINFO])
@pytest.mark.parametrize("scheme", ["http", "https"])
async def test_a_proxy_asking_for_credentials_is_a_502_upstream_proxy_error(
    authenticating_proxy: ForwardProxy,
    certificates: tuple[Path, Path],
    scheme: str,
    userinfo: str | None,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """407 on CONNECT (https) and on the forwarded request (http) alike; the error names the
    proxy's host:port, never what was sent to it."""
    caplog.set_level(logging.DEBUG, logger="llmproxy")
    async with serve_fake(scheme, certificates) as upstream:
        url = authenticating_proxy.url(userinfo)
        with proxy_server(upstream, certificates[1], **{proxy_variable(scheme): url}) as proxy:
            response = await post_chat(proxy.url)
        message = assert_upstream_proxy_error(response, authenticating_proxy.address)
        assert "407" in message
        assert credentials_in(response.text) == []
        assert credentials_in(caplog.text) == []
        assert upstream.journal() == []  # nothing reached the upstream
        # Asked once, not once per attempt: asking a directory-backed proxy again with the
        # same wrong credentials can lock the account.
        if scheme == "https":
            assert len(authenticating_proxy.connects()) == 1


async def test_a_clients_own_proxy_authorization_never_reaches_the_egress_proxy(
    authenticating_proxy: ForwardProxy, certificates: tuple[Path, Path]
) -> None:
    """Proxy-Authorization is hop-by-hop (RFC 9110 §11.7.2): a client cannot use llmproxy to
    spend the egress proxy's credentials it holds itself, nor inject its own."""
    correct = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    async with serve_fake("http", certificates) as upstream:
        settings = {"HTTP_PROXY": authenticating_proxy.url()}
        with proxy_server(upstream, certificates[1], **settings) as proxy:
            async with client() as http:
                response = await http.post(
                    f"{proxy.url}/v1/chat/completions",
                    json=CHAT,
                    headers={"Proxy-Authorization": f"Basic {correct}"},
                )
        assert_upstream_proxy_error(response, authenticating_proxy.address)
        assert upstream.journal() == []


# --- refusals -------------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["http", "https"])
async def test_an_unreachable_proxy_is_a_502_upstream_proxy_error(
    certificates: tuple[Path, Path], scheme: str
) -> None:
    nobody = f"127.0.0.1:{free_port()}"
    async with serve_fake(scheme, certificates) as upstream:
        url = f"http://{USERINFO}@{nobody}"
        with proxy_server(upstream, certificates[1], **{proxy_variable(scheme): url}) as proxy:
            response = await post_chat(proxy.url)
        assert_upstream_proxy_error(response, nobody)
        assert credentials_in(response.text) == []
        assert upstream.journal() == []  # the upstream itself was up all along


@pytest.mark.parametrize("scheme", ["http", "https"])
async def test_a_black_holed_proxy_is_a_502_upstream_proxy_error(
    tmp_path: Path, certificates: tuple[Path, Path], scheme: str
) -> None:
    """A proxy whose host drops the connection attempts is as unreachable as one that refuses
    them: the error names the proxy, not the upstream (which is up all along)."""
    with start_forward_proxy(tmp_path / "stuck", backlog=1) as stuck:
        async with serve_fake(scheme, certificates) as upstream:
            settings = {
                proxy_variable(scheme): stuck.url(),
                "LLMPROXY_CONNECT_TIMEOUT": "0.5",
                "LLMPROXY_MAX_ATTEMPTS": "1",
            }
            with stuck.unreachable(), proxy_server(upstream, certificates[1], **settings) as proxy:
                response = await post_chat(proxy.url)
            assert_upstream_proxy_error(response, stuck.address)
            assert upstream.journal() == []


async def test_a_connect_the_proxy_cannot_open_is_a_502_upstream_proxy_error(
    forward_proxy: ForwardProxy, certificates: tuple[Path, Path]
) -> None:
    """proxy.py answers 502 to a CONNECT towards a port nobody listens on."""
    down = f"https://127.0.0.1:{free_port()}/v1"
    settings = {
        "LLMPROXY_UPSTREAM_URL": down,
        "LLMPROXY_UPSTREAM_CA_BUNDLE": str(certificates[1]),
        "LLMPROXY_MAX_ATTEMPTS": "1",
        "HTTPS_PROXY": forward_proxy.url(),
    }
    with ProxyServer(load_configuration(settings)) as proxy:
        response = await post_chat(proxy.url)
    message = assert_upstream_proxy_error(response, forward_proxy.address)
    assert "502" in message


# --- going direct ---------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["http", "https"])
async def test_no_proxy_matching_the_upstream_goes_direct(
    forward_proxy: ForwardProxy, certificates: tuple[Path, Path], scheme: str
) -> None:
    async with serve_fake(scheme, certificates) as upstream:
        settings = {
            proxy_variable(scheme): forward_proxy.url(),
            "ALL_PROXY": forward_proxy.url(),
            "NO_PROXY": "example.com, 127.0.0.0/8",
        }
        with proxy_server(upstream, certificates[1], **settings) as proxy:
            response = await post_chat(proxy.url)
        assert_streamed_whole(response)
        assert upstream.via_headers() == [""]
    assert forward_proxy.settled_access_log() == []


async def test_upstream_proxy_none_ignores_https_proxy(
    forward_proxy: ForwardProxy, certificates: tuple[Path, Path]
) -> None:
    async with serve_fake("https", certificates) as upstream:
        settings = {
            "HTTPS_PROXY": forward_proxy.url(),
            "https_proxy": forward_proxy.url(),
            "ALL_PROXY": forward_proxy.url(),
            "LLMPROXY_UPSTREAM_PROXY": "none",
        }
        with proxy_server(upstream, certificates[1], **settings) as proxy:
            response = await post_chat(proxy.url)
        assert_streamed_whole(response)
    assert forward_proxy.settled_access_log() == []


async def test_upstream_proxy_wins_over_the_environment(
    forward_proxy: ForwardProxy, certificates: tuple[Path, Path]
) -> None:
    unreachable = f"http://127.0.0.1:{free_port()}"
    async with serve_fake("https", certificates) as upstream:
        settings = {"HTTPS_PROXY": unreachable, "LLMPROXY_UPSTREAM_PROXY": forward_proxy.url()}
        with proxy_server(upstream, certificates[1], **settings) as proxy:
            response = await post_chat(proxy.url)
        assert_streamed_whole(response)
    assert [line.target for line in forward_proxy.connects()] == [upstream.authority]
