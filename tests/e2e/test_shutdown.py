"""Graceful shutdown (issue 5): on SIGTERM in-flight streams finish up to the drain timeout, and a
stream still running then ends with the interrupted-stream error event, never a fake [DONE].
WebSocket sessions (issue 12) drain the same way and are closed with 1001 at the deadline."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

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


# --- WebSocket sessions -------------------------------------------------------------------------

DRAIN_SECONDS = 2.0
DEADLINE = 10.0


@pytest.fixture
def served_with_short_drain(
    fake_upstream: FakeUpstreamServer,
) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    env = llmproxy_environment(LLMPROXY_UPSTREAM_URL=fake_upstream.base_url)
    with serve_subprocess(
        env, "--log-level", "warning", "--drain-timeout", str(DRAIN_SECONDS)
    ) as served_process:
        yield served_process


async def next_event(ws: ClientConnection) -> dict[str, Any]:
    async with asyncio.timeout(DEADLINE):
        event: dict[str, Any] = json.loads(await ws.recv())
    return event


async def until_refused(url: str) -> None:
    """Wait until the server no longer accepts connections: its drain has begun."""
    parts = urlsplit(url)
    async with asyncio.timeout(DEADLINE):
        while True:
            try:
                _, writer = await asyncio.open_connection(parts.hostname, parts.port)
            except ConnectionRefusedError:
                return
            writer.close()  # accepted before the signal was handled: try again
            await writer.wait_closed()
            await asyncio.sleep(0.02)  # polling for the listener's end, with a deadline


async def test_a_websocket_session_drains_then_closes_with_1001_at_the_deadline(
    served_with_short_drain: tuple[subprocess.Popen[bytes], str],
    fake_upstream: FakeUpstreamServer,
) -> None:
    process, url = served_with_short_drain
    ws_url = url.replace("http://", "ws://", 1) + "/v1/realtime?model=gpt-realtime"
    fake_upstream.queue({"chunks": ["still", " here"]})
    async with connect(ws_url, open_timeout=DEADLINE) as ws:
        assert (await next_event(ws))["type"] == "session.created"
        process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        await until_refused(url)

        # A new session during the drain is refused; the open one goes on being relayed.
        with pytest.raises((OSError, InvalidStatus)) as refused:
            async with connect(ws_url, open_timeout=DEADLINE):
                pass
        if isinstance(refused.value, InvalidStatus):
            assert refused.value.response.status_code == 503
        await ws.send(json.dumps({"type": "response.create"}))
        events = [await next_event(ws)]
        while events[-1]["type"] != "response.done":
            events.append(await next_event(ws))
        assert [e["delta"] for e in events if e["type"] == "response.output_text.delta"] == [
            "still",
            " here",
        ]

        with pytest.raises(ConnectionClosed) as closed:
            async with asyncio.timeout(DRAIN_SECONDS + DEADLINE):
                await ws.recv()
        elapsed = time.monotonic() - signalled
    assert closed.value.rcvd is not None, closed.value  # a close frame, not a lost connection
    assert closed.value.rcvd.code == 1001
    assert DRAIN_SECONDS <= elapsed < DRAIN_SECONDS + 3.0
    (entry,) = await asyncio.to_thread(
        fake_upstream.wait_for_journal, lambda journal: journal[0]["disconnected"], DEADLINE
    )
    assert entry["websocket"]["client_close"]["code"] == 1001  # the proxy's close, upstream
    assert await asyncio.to_thread(process.wait, 15) in (0, -signal.SIGTERM)
