"""The pytest plugins users get: `fake_upstream_server` and `llmproxy_server` in front of it."""

from __future__ import annotations

from typing import TYPE_CHECKING

import openai

if TYPE_CHECKING:
    from fake_upstream.server import FakeUpstreamServer
    from llmproxy.testing import ProxyServer


def test_llmproxy_server_fixture_forwards_to_the_fake_upstream(
    llmproxy_server: ProxyServer, fake_upstream: FakeUpstreamServer
) -> None:
    with openai.OpenAI(base_url=llmproxy_server.base_url, api_key="x", max_retries=0) as client:
        answer = client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
        )
    assert answer.choices[0].message.content == "Hello from fake upstream!"
    (entry,) = fake_upstream.journal()
    assert entry["path"] == "/v1/chat/completions"
