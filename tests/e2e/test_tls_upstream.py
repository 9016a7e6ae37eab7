"""An https upstream, as in production: `llmproxy serve` verifies its certificate against the
system's trust store (here a test CA given through OpenSSL's `SSL_CERT_FILE`) and streams
through it; an upstream whose certificate nobody trusts is a 502, never an unverified call."""

from __future__ import annotations

import json
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
