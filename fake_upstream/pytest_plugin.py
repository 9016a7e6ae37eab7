"""pytest fixtures that run the fake upstream as a real server (registered as the `pytest11`
entry point `fake_upstream`, so installing the package makes them available everywhere).

- `fake_upstream_server` (session): one `FakeUpstreamServer` on a free loopback port.
- `fake_upstream` (function): the same server with its journal and script queue emptied, and
  any fixtures or cassettes a previous test loaded dropped.

Plain synchronous fixtures: they need no pytest-asyncio and work from sync and async tests.
The server is imported inside the fixtures so that loading this plugin costs nothing.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from fake_upstream.server import FakeUpstreamServer


@pytest.fixture(scope="session")
def fake_upstream_server() -> Iterator[FakeUpstreamServer]:
    """A fake upstream shared by the whole session; prefer `fake_upstream` in tests."""
    from fake_upstream.server import FakeUpstreamServer

    with FakeUpstreamServer() as server:
        yield server


@pytest.fixture
def fake_upstream(fake_upstream_server: FakeUpstreamServer) -> FakeUpstreamServer:
    """The session's fake upstream, with an empty journal and script queue, no fixtures and no
    cassettes.

    `.url`, `.base_url` (`.url + "/v1"`), `.journal()`, `.queue(*scripts)`, `.clear()`,
    `.wait_for_journal(predicate, timeout=5.0)`, `.load_fixtures(path, strict=None)`,
    `.use_cassettes(directory, mode="replay" | "record" | "once", upstream=URL)`.
    """
    fake_upstream_server.reset()
    return fake_upstream_server
