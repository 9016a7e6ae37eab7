"""pytest fixtures: the proxy as a real server in front of the fake upstream.

Registered as the `pytest11` entry point `llmproxy`. `llmproxy_server` asks for the
`fake_upstream_server` fixture by name (from the `fake_upstream` plugin), so neither package
imports the other. Imports happen inside the fixtures, so loading the plugin costs nothing.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from llmproxy.testing import ProxyServer


@pytest.fixture(scope="session")
def llmproxy_server(fake_upstream_server: Any) -> Iterator[ProxyServer]:
    """llmproxy on a free loopback port, forwarding to the session's fake upstream.

    `.url`, `.base_url` (`.url + "/v1"`: give it to the OpenAI SDK as `base_url`), `.app`.
    """
    from llmproxy.config import Configuration
    from llmproxy.testing import ProxyServer

    configuration = Configuration(upstream_urls=(fake_upstream_server.base_url,))
    with ProxyServer(configuration) as server:
        yield server
