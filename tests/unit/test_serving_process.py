"""What `llmproxy serve` does to its own process beyond the app: collector tuning, signals."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import httpx
import pytest

from llmproxy.cli import GC_YOUNG_THRESHOLD
from llmproxy.config import Configuration
from llmproxy.protocol import DisconnectSignal, _WritesJoinedPerTurn
from llmproxy.testing import ProxyServer
from tests.support import free_port


def test_served_app_freezes_start_up_objects_and_raises_the_young_threshold() -> None:
    # In a child process: the collector settings are process-wide.
    program = (
        "import gc, json; from llmproxy.cli import create_served_app; create_served_app();"
        "print(json.dumps([gc.get_threshold(), gc.get_freeze_count()]))"
    )
    done = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=60, check=True
    )
    (young, _, _), frozen = json.loads(done.stdout)
    assert young == GC_YOUNG_THRESHOLD > 700
    assert frozen > 10_000  # the modules and classes loaded at start-up


def test_disconnect_signal_calls_its_callback_once_and_stays_gone() -> None:
    calls: list[str] = []
    signal = DisconnectSignal()
    assert not signal.gone
    signal.callback = lambda: calls.append("left")
    signal.fire()
    signal.fire()
    assert calls == ["left"]
    assert signal.gone


def test_disconnect_signal_without_a_callback_only_records_the_loss() -> None:
    signal = DisconnectSignal()
    signal.fire()
    assert signal.gone


class RecordingTransport:
    """Stands in for a socket transport: records writes and whether it was closed."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def get_extra_info(self, name: str) -> str:
        return f"info:{name}"


async def test_writes_within_one_loop_turn_go_out_as_one() -> None:
    transport = RecordingTransport()
    joined = _WritesJoinedPerTurn(transport, asyncio.get_running_loop())
    joined.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n")
    joined.write(b"")
    joined.write(b"ok")
    assert transport.writes == []  # nothing until the turn ends
    await asyncio.sleep(0)  # one turn of the loop
    assert transport.writes == [b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"]
    joined.write(b"next turn")
    await asyncio.sleep(0)
    assert transport.writes[1:] == [b"next turn"]


async def test_close_writes_what_is_pending_first_and_nothing_goes_to_a_closed_socket() -> None:
    transport = RecordingTransport()
    joined = _WritesJoinedPerTurn(transport, asyncio.get_running_loop())
    joined.write(b"last bytes")
    joined.close()
    assert transport.writes == [b"last bytes"]
    assert transport.closed
    joined.write(b"too late")
    await asyncio.sleep(0)
    assert transport.writes == [b"last bytes"]
    assert joined.get_extra_info("peername") == "info:peername"


def test_the_served_protocol_joins_a_response_head_with_its_body(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    flushed: list[bytes] = []
    flush = _WritesJoinedPerTurn._flush

    def recording_flush(self: _WritesJoinedPerTurn) -> None:
        if self._pending:
            flushed.append(b"".join(self._pending))
        flush(self)

    monkeypatch.setattr(_WritesJoinedPerTurn, "_flush", recording_flush)
    nothing_there = f"http://127.0.0.1:{free_port()}/v1"
    with ProxyServer(Configuration(upstream_urls=(nothing_there,))) as proxy:
        response = httpx.get(f"{proxy.url}/v1/models", timeout=10)  # the proxy's own 502
    assert response.status_code == 502
    (written,) = [data for data in flushed if data.startswith(b"HTTP/1.1 502")]
    assert written.endswith(response.content)  # the head and the whole body in one write
