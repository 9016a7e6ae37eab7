"""An https upstream, as in production: `llmproxy serve` verifies its certificate against the
system's trust store (here a test CA given through OpenSSL's `SSL_CERT_FILE`) and streams
through it; an upstream whose certificate nobody trusts is a 502, never an unverified call."""

from __future__ import annotations

import json
import ssl
from pathlib import Path

import httpx
import pytest
import trustme

from fake_upstream.app import create_app
from tests.support import llmproxy_environment, serve_asgi, serve_subprocess

pytestmark = pytest.mark.e2e

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}


async def test_https_upstream_with_a_trusted_certificate_streams_through(tmp_path: Path) -> None:
    ca = trustme.CA()
    certificate = ca.issue_cert("127.0.0.1")
    key_and_chain = tmp_path / "upstream.pem"
    certificate.private_key_and_cert_chain_pem.write_to_path(str(key_and_chain))
    trusted = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(trusted))

    upstream = serve_asgi(create_app(), ssl_certfile=str(key_and_chain))
    async with upstream as plain_url:
        upstream_url = plain_url.replace("http://", "https://") + "/v1"
        for trust, expected in ((str(trusted), 200), (None, 502)):
            env = llmproxy_environment(LLMPROXY_UPSTREAM_URL=upstream_url)
            if trust is not None:
                env["SSL_CERT_FILE"] = trust
            else:
                env.pop("SSL_CERT_FILE", None)  # the system's store: it does not know this CA
            with serve_subprocess(env) as (_, proxy_url):
                async with httpx.AsyncClient(timeout=10) as client:
                    response = await client.post(f"{proxy_url}/v1/chat/completions", json=CHAT)
            assert response.status_code == expected, response.text
            if expected == 200:
                assert response.text.rstrip().endswith("data: [DONE]")
                assert "Hello" in response.text
            else:
                assert json.loads(response.text)["error"]["code"] == "upstream_unreachable"


def _write_upstream_certificate(tmp_path: Path) -> tuple[trustme.CA, Path, Path]:
    """(the CA, the upstream's key and chain, the CA's certificate), written as PEM files."""
    ca = trustme.CA()
    key_and_chain = tmp_path / "upstream.pem"
    ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(str(key_and_chain))
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    return ca, key_and_chain, ca_file


async def _post_through(env: dict[str, str]) -> httpx.Response:
    with serve_subprocess(env) as (_, proxy_url):
        async with httpx.AsyncClient(timeout=10) as client:
            return await client.post(f"{proxy_url}/v1/chat/completions", json=CHAT)


async def test_a_private_ca_is_trusted_through_upstream_ca_bundle(tmp_path: Path) -> None:
    _, key_and_chain, ca_file = _write_upstream_certificate(tmp_path)
    async with serve_asgi(create_app(), ssl_certfile=str(key_and_chain)) as plain_url:
        env = llmproxy_environment(
            LLMPROXY_UPSTREAM_URL=plain_url.replace("http://", "https://") + "/v1",
            LLMPROXY_UPSTREAM_CA_BUNDLE=str(ca_file),
        )
        env.pop("SSL_CERT_FILE", None)  # the bundle alone, added to the system's store
        response = await _post_through(env)
    assert response.status_code == 200, response.text
    assert response.text.rstrip().endswith("data: [DONE]")


async def test_an_upstream_that_requires_a_client_certificate_gets_the_configured_one(
    tmp_path: Path,
) -> None:
    _, key_and_chain, ca_file = _write_upstream_certificate(tmp_path)
    client_ca = trustme.CA()
    client = client_ca.issue_cert("llmproxy.client.test")
    client_cert, client_key = tmp_path / "client.pem", tmp_path / "client.key"
    client.cert_chain_pems[0].write_to_path(str(client_cert))
    client.private_key_pem.write_to_path(str(client_key))
    client_ca_file = tmp_path / "client-ca.pem"
    client_ca.cert_pem.write_to_path(str(client_ca_file))
    upstream = serve_asgi(
        create_app(),
        ssl_certfile=str(key_and_chain),
        ssl_ca_certs=str(client_ca_file),
        ssl_cert_reqs=ssl.CERT_REQUIRED,
    )
    async with upstream as plain_url:
        base = llmproxy_environment(
            LLMPROXY_UPSTREAM_URL=plain_url.replace("http://", "https://") + "/v1",
            LLMPROXY_UPSTREAM_CA_BUNDLE=str(ca_file),
        )
        with_certificate = await _post_through(
            {
                **base,
                "LLMPROXY_UPSTREAM_CLIENT_CERT": str(client_cert),
                "LLMPROXY_UPSTREAM_CLIENT_KEY": str(client_key),
            }
        )
        without = await _post_through(base)
    assert with_certificate.status_code == 200, with_certificate.text
    assert with_certificate.text.rstrip().endswith("data: [DONE]")
    # Refused by the upstream's handshake; under TLS 1.3 the client learns it only when it
    # reads, so the connection closes before any answer.
    assert without.status_code == 502
    code = json.loads(without.text)["error"]["code"]
    assert code in ("upstream_unreachable", "upstream_connection_closed")
