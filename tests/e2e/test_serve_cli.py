"""`python -m llmproxy serve`, configured only by environment variables, with the real SDK."""

from __future__ import annotations

import json
import signal
import subprocess
from collections.abc import Iterator
from typing import TYPE_CHECKING

import openai
import pytest

from tests.support import llmproxy_environment, serve_subprocess

if TYPE_CHECKING:
    from fake_upstream.server import FakeUpstreamServer

UPSTREAM_KEY = "sk-cli-upstream-SECRET"


@pytest.fixture
def served_proxy(fake_upstream: FakeUpstreamServer) -> Iterator[str]:
    env = llmproxy_environment(
        LLMPROXY_UPSTREAM_URL=fake_upstream.base_url,
        LLMPROXY_UPSTREAM_API_KEY=UPSTREAM_KEY,
        LLMPROXY_DEFAULT_HEADERS=json.dumps({"OpenAI-Organization": "org-cli"}),
        LLMPROXY_CONNECT_TIMEOUT="5",
        LLMPROXY_READ_TIMEOUT="30",
    )
    with serve_subprocess(env, output=subprocess.PIPE) as (process, url):
        yield url
        process.terminate()
        output, _ = process.communicate(timeout=15)
        # uvicorn shuts down gracefully, then re-raises SIGTERM so the exit status tells why.
        assert process.returncode in (0, -signal.SIGTERM), output
        assert UPSTREAM_KEY.encode() not in output


def test_serve_from_environment_streams_through_the_official_sdk(
    served_proxy: str, fake_upstream: FakeUpstreamServer
) -> None:
    client = openai.OpenAI(base_url=f"{served_proxy}/v1", api_key="sk-client", max_retries=0)
    with client:
        stream = client.chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Hello from fake upstream!"
    assert chunks[-1].usage is not None
    assert chunks[-1].choices == []

    (entry,) = fake_upstream.journal()
    headers = {name.lower(): value for name, value in entry["headers"]}
    assert headers["authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert headers["openai-organization"] == "org-cli"
    assert entry["path"] == "/v1/chat/completions"
