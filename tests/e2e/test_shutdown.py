"""Graceful shutdown (issue 5): on SIGTERM in-flight streams finish up to the drain timeout, and a
stream still running then ends with the interrupted-stream error event, never a fake [DONE]."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

import httpx
import pytest

from tests.support import llmproxy_environment, serve_subprocess

if TYPE_CHECKING:
    from fake_upstream.server import FakeUpstreamServer

CHAT = {"model": "gpt-4o-mini", "stream": True, "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
def served(fake_upstream: FakeUpstreamServer) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    env = llmproxy_environment(
        LLMPROXY_UPSTREAM_URL=fake_upstream.base_url, LLMPROXY_DRAIN_TIMEOUT="1.5"
    )
    with serve_subprocess(env, "--log-level", "warning") as served_process:
        yield served_process


def stream_events(url: str, script: dict[str, object], on_first: object) -> list[str]:
    events: list[str] = []
    with httpx.stream(
        "POST",
        f"{url}/v1/chat/completions",
        json=CHAT,
        headers={"x-fake-script": json.dumps(script)},
        timeout=30,
    ) as response:
        for line in response.iter_lines():
            if line:
                events.append(line)
                if len(events) == 1:
                    on_first()  # type: ignore[operator]
    return events


def test_a_stream_longer_than_the_drain_ends_with_the_error_event(
    served: tuple[subprocess.Popen[bytes], str],
) -> None:
    process, url = served
    script = {"chunks": ["x"] * 40, "delay_per_chunk": 0.2}  # 8 s: longer than the 1.5 s drain
    started = time.monotonic()
    events = stream_events(url, script, lambda: process.send_signal(signal.SIGTERM))
    elapsed = time.monotonic() - started
    assert events[-1].startswith("data: {")
    assert json.loads(events[-1].removeprefix("data: "))["error"]["code"] == (
        "upstream_stream_interrupted"
    )
    assert "data: [DONE]" not in events
    assert 1.0 < elapsed < 6.0  # it ran on through the drain, and no longer
    assert process.wait(timeout=15) in (0, -signal.SIGTERM)


def test_a_stream_shorter_than_the_drain_completes(
    served: tuple[subprocess.Popen[bytes], str],
) -> None:
    process, url = served
    script = {"chunks": ["a", "b", "c"], "delay_per_chunk": 0.2}  # 0.6 s: inside the drain
    events = stream_events(url, script, lambda: process.send_signal(signal.SIGTERM))
    assert events[-1] == "data: [DONE]"
    assert process.wait(timeout=15) in (0, -signal.SIGTERM)
