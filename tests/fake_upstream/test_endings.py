"""Every stream ending as a client sees it on the wire (raw httpx and raw sockets), and the
journal's account of it. No sleeps: waits are on the journal or on bytes, with deadlines."""

from __future__ import annotations

import itertools
import json
import socket
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from fake_upstream import FakeUpstreamServer
from fake_upstream.journal import JournalSnapshot

from .test_plan import GOLDEN_REQUEST, GOLDEN_SCRIPT, GOLDEN_STREAM

CHAT = "/chat/completions"
STREAM_REQUEST: dict[str, Any] = {
    "model": "gpt-4o-mini",
    "messages": [{"role": "user", "content": "Hi"}],
    "stream": True,
}


@pytest.fixture
def http(fake_upstream: FakeUpstreamServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=fake_upstream.base_url, timeout=10) as client:
        yield client


def script(**fields: Any) -> dict[str, str]:
    return {"x-fake-script": json.dumps(fields)}


def data_events(body: bytes) -> list[str]:
    return [b[len("data: ") :] for b in body.decode().split("\n\n") if b.startswith("data: ")]


def first(journal: JournalSnapshot) -> dict[str, Any]:
    assert len(journal) == 1, journal
    return journal[0]


def read_until(stream: Iterator[bytes], count: int) -> bytes:
    """Read raw bytes until `count` complete events have arrived (the server sends no more
    until we act, so reading further would block)."""
    received = b""
    while received.count(b"\n\n") < count:
        received += next(stream)
    return received


def drain(chunks: Iterator[bytes]) -> tuple[bytes, Exception | None]:
    """Everything readable, and the error that ended the reading (None for a clean end)."""
    received = b""
    try:
        for chunk in chunks:
            received += chunk
    except (httpx.ReadError, httpx.RemoteProtocolError, ConnectionResetError) as exc:
        return received, exc
    return received, None


def test_golden_bytes_over_the_wire(http: httpx.Client) -> None:
    response = http.post(CHAT, json=GOLDEN_REQUEST, headers=script(**GOLDEN_SCRIPT))
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/event-stream; charset=utf-8"
    assert response.content == GOLDEN_STREAM


def test_response_headers_look_like_openai(
    http: httpx.Client, fake_upstream: FakeUpstreamServer
) -> None:
    response = http.post(CHAT, json={"model": "m", "messages": []})
    assert response.headers["x-request-id"] == fake_upstream.journal()[0]["id"]
    assert response.headers["openai-version"] == "2020-10-01"
    for name in ("limit", "remaining", "reset"):
        for kind in ("requests", "tokens"):
            assert f"x-ratelimit-{name}-{kind}" in response.headers


def test_done_is_journaled_event_by_event(
    http: httpx.Client, fake_upstream: FakeUpstreamServer
) -> None:
    response = http.post(CHAT, json=STREAM_REQUEST)
    entry = first(fake_upstream.journal())
    assert entry["completed"] is True
    assert entry["disconnected"] is False
    # role + 5 content + finish + [DONE], one write each
    assert [c["size"] for c in entry["chunks"]] == [
        len(e) + len("data: \n\n") for e in data_events(response.content)
    ]
    times = [c["written_at"] for c in entry["chunks"]]
    assert times == sorted(times)
    assert entry["received_at"] <= entry["headers_sent_at"] <= times[0]


def test_reset_after_n_chunks(http: httpx.Client, fake_upstream: FakeUpstreamServer) -> None:
    with http.stream(
        "POST", CHAT, json=STREAM_REQUEST, headers=script(ending="reset", after_chunks=2)
    ) as response:
        received, error = drain(response.iter_raw())
    assert isinstance(error, httpx.ReadError | httpx.RemoteProtocolError), error
    events = [json.loads(e) for e in data_events(received)]
    assert [e["choices"][0]["delta"].get("content") for e in events] == ["", "Hello", " from"]
    entry = first(fake_upstream.journal())
    assert entry["completed"] is True  # the script ran to its end...
    assert entry["disconnected"] is False  # ...and the client did not leave first


def test_reset_is_a_tcp_rst(fake_upstream: FakeUpstreamServer) -> None:
    """Over a raw socket the ending is ECONNRESET, not an orderly FIN."""
    body = json.dumps(STREAM_REQUEST).encode()
    request = (
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        b'x-fake-script: {"ending": "reset", "after_chunks": 0}\r\n'
        b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )
    host, port = fake_upstream.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(request)
        received, error = drain(iter(lambda: sock.recv(65536), b""))
    assert isinstance(error, ConnectionResetError), error
    assert received.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b'"role":"assistant"' in received


def test_stall_holds_until_the_client_leaves(
    http: httpx.Client, fake_upstream: FakeUpstreamServer
) -> None:
    with http.stream(
        "POST", CHAT, json=STREAM_REQUEST, headers=script(ending="stall", after_chunks=1)
    ) as response:
        received = read_until(response.iter_raw(), 2)
        # The server is now stalled: nothing more is written while we hold on.
        assert first(fake_upstream.journal())["completed"] is False
        left_at = time.time()
    assert data_events(received)[-1].count('"content":"Hello"') == 1
    entry = first(fake_upstream.wait_for_journal(lambda j: j[0]["disconnected"], timeout=5))
    assert entry["chunks_before_disconnect"] == 2
    assert entry["completed"] is False
    assert entry["disconnected_at"] - left_at < 0.5


def test_close_ends_cleanly_without_done(
    http: httpx.Client, fake_upstream: FakeUpstreamServer
) -> None:
    response = http.post(CHAT, json=STREAM_REQUEST, headers=script(ending="close", after_chunks=3))
    events = data_events(response.content)
    assert len(events) == 4
    assert "[DONE]" not in events
    assert first(fake_upstream.journal())["completed"] is True


def test_error_event_then_end(http: httpx.Client) -> None:
    response = http.post(
        CHAT, json=STREAM_REQUEST, headers=script(ending="error_event", error={"code": "x"})
    )
    events = data_events(response.content)
    assert response.status_code == 200
    assert json.loads(events[-1]) == {
        "error": {
            "message": "The server had an error while processing your request. Sorry about that!",
            "type": "server_error",
            "param": None,
            "code": "x",
        }
    }


def test_malformed_json(http: httpx.Client) -> None:
    response = http.post(
        CHAT, json=STREAM_REQUEST, headers=script(ending="malformed_json", after_chunks=1)
    )
    assert response.content.endswith(
        b'"finish_reason":null}]}\n\ndata: {not json\n\ndata: [DONE]\n\n'
    )


def test_crlf_framing(http: httpx.Client) -> None:
    response = http.post(CHAT, json=STREAM_REQUEST, headers=script(ending="crlf"))
    assert response.content.count(b"\r\n\r\n") == 8
    assert b"\n\n" not in response.content.replace(b"\r\n\r\n", b"")


def test_ping_comments(http: httpx.Client) -> None:
    response = http.post(CHAT, json=STREAM_REQUEST, headers=script(ending="ping"))
    assert response.content.startswith(b"data: ")
    assert response.content.count(b"\n\n: ping\n\ndata: ") == 6


def test_split_event_is_two_writes_with_a_pause(
    http: httpx.Client, fake_upstream: FakeUpstreamServer
) -> None:
    normal = http.post(CHAT, json=STREAM_REQUEST, headers=script(id="c", created=1)).content
    split = http.post(
        CHAT, json=STREAM_REQUEST, headers=script(id="c", created=1, ending="split_event")
    ).content
    assert split == normal
    chunks = fake_upstream.journal()[1]["chunks"]
    sizes = [c["size"] for c in chunks]
    event_sizes = [len(e) + len("data: \n\n") for e in data_events(normal)]
    assert sizes[0] == event_sizes[0]
    assert sizes[1] + sizes[2] == event_sizes[1]
    # 50 ms pause; event loops may wake a timer a clock tick early, hence the margin.
    assert chunks[2]["written_at"] - chunks[1]["written_at"] >= 0.04


def test_delay_per_chunk_spaces_the_writes(
    http: httpx.Client, fake_upstream: FakeUpstreamServer
) -> None:
    http.post(
        CHAT, json=STREAM_REQUEST, headers=script(chunks=["a", "b", "c"], delay_per_chunk=0.1)
    )
    times = [c["written_at"] for c in first(fake_upstream.journal())["chunks"]]
    gaps = [later - earlier for earlier, later in itertools.pairwise(times[:4])]
    # role delta, then each content chunk 100 ms after the previous write (minus timer slack)
    assert all(gap >= 0.08 for gap in gaps), gaps


def test_client_leaving_mid_stream_is_journaled(
    http: httpx.Client, fake_upstream: FakeUpstreamServer
) -> None:
    with http.stream(
        "POST", CHAT, json=STREAM_REQUEST, headers=script(delay_per_chunk=0.5)
    ) as response:
        read_until(response.iter_raw(), 2)
        left_at = time.time()
    entry = first(fake_upstream.wait_for_journal(lambda j: j[0]["disconnected"], timeout=5))
    assert entry["completed"] is False
    assert entry["chunks_before_disconnect"] == 2
    assert entry["disconnected_at"] - left_at < 0.4  # well before the next chunk was due


def test_client_leaving_before_headers_is_journaled(fake_upstream: FakeUpstreamServer) -> None:
    host, port = fake_upstream.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(
            b"GET /v1/models HTTP/1.1\r\nhost: x\r\n"
            b'x-fake-script: {"delay_before_headers": 30}\r\n\r\n'
        )
        fake_upstream.wait_for_journal(lambda j: len(j) == 1)
        left_at = time.time()
    entry = first(fake_upstream.wait_for_journal(lambda j: j[0]["disconnected"], timeout=5))
    assert entry["status"] is None  # headers never went out
    assert entry["chunks_before_disconnect"] == 0
    assert entry["disconnected_at"] - left_at < 0.5


def test_non_stream_reset_truncates_the_body(http: httpx.Client) -> None:
    with pytest.raises((httpx.ReadError, httpx.RemoteProtocolError)):
        http.get("/models", headers=script(ending="reset"))
    with pytest.raises(httpx.RemoteProtocolError):
        http.get("/models", headers=script(ending="close"))


def test_a_client_leaving_a_stream_logs_no_error_in_the_fake(fake_upstream: Any) -> None:
    """Regression: a disconnect cancelled the play before its result was assigned."""
    import logging

    records: list[logging.LogRecord] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Collect(level=logging.ERROR)
    uvicorn_errors = logging.getLogger("uvicorn.error")
    uvicorn_errors.addHandler(handler)
    try:
        script = '{"stream": true, "ending": "stall", "after_chunks": 1}'
        with httpx.stream(
            "POST",
            f"{fake_upstream.base_url}/chat/completions",
            json={"model": "m", "messages": [], "stream": True},
            headers={"x-fake-script": script},
            timeout=10,
        ) as response:
            next(response.iter_raw())
        fake_upstream.wait_for_journal(lambda j: j[0]["disconnected"], timeout=5)
        # The error, when there was one, was logged as the app's task ended: give that task
        # the chance to end by making one more request and waiting for its journal entry.
        httpx.get(f"{fake_upstream.base_url}/models", timeout=10)
        fake_upstream.wait_for_journal(lambda j: len(j) == 2 and j[1]["completed"], timeout=5)
    finally:
        uvicorn_errors.removeHandler(handler)
    assert [r.getMessage() for r in records] == []
