"""When a side goes away: the client before or during the body, the upstream mid-stream
(DESIGN §4.3, §4.4; issue 4, item 1 and 2).

The fake upstream's journal says when the proxy closed its upstream request and after how many
chunks; the client's own clock says when it left. Both are `time.time()` on this machine.
"""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
import openai
import pytest

from tests.e2e.conftest import Target, start_proxy
from tests.e2e.fake_client import FakeUpstreamClient, Journal
from tests.e2e.sse_events import CHAT_PATH, TimedEvent, chat_request, content_of, iter_timed_events

pytestmark = pytest.mark.e2e

CANCEL_WITHIN = 1.0  # DESIGN §4.3: the upstream request is closed within one second
JOURNAL_DEADLINE = 5.0
INTERRUPTED = "upstream_stream_interrupted"


def scripted(script: dict[str, Any]) -> dict[str, str]:
    return {"x-fake-script": json.dumps(script)}


def disconnected(journal: Journal) -> bool:
    return len(journal) == 1 and journal[0]["disconnected"]


def stream_events(url: str, script: dict[str, Any]) -> tuple[int, list[TimedEvent]]:
    """Read a whole streamed response from `url`; (status, events with arrival times)."""
    with (
        httpx.Client(timeout=10.0) as client,
        client.stream(
            "POST", f"{url}{CHAT_PATH}", json=chat_request(), headers=scripted(script)
        ) as response,
    ):
        return response.status_code, list(iter_timed_events(response))


# --- the client leaves ----------------------------------------------------------------------


def test_client_leaving_before_headers_cancels_the_upstream_request(
    target: Target, fake: FakeUpstreamClient
) -> None:
    started_at = time.time()
    with (
        httpx.Client(timeout=httpx.Timeout(10.0, read=0.3)) as client,
        pytest.raises(httpx.ReadTimeout),
    ):
        client.post(
            f"{target.proxy_url}{CHAT_PATH}",
            json=chat_request(),
            headers=scripted({"stream": True, "delay_before_headers": 30}),
        )
    left_at = time.time()
    (entry,) = fake.wait_for_journal(disconnected, JOURNAL_DEADLINE)
    assert started_at + 0.3 <= entry["disconnected_at"] <= left_at + CANCEL_WITHIN
    assert entry["status"] is None  # the fake never got to send its headers
    assert entry["chunks_before_disconnect"] == 0


def test_client_leaving_mid_body_cancels_the_upstream_request(
    target: Target, fake: FakeUpstreamClient
) -> None:
    script = {"stream": True, "chunks": ["tick"] * 20, "delay_per_chunk": 0.25}
    received = []
    with httpx.Client(timeout=10.0) as client:
        with client.stream(
            "POST", f"{target.proxy_url}{CHAT_PATH}", json=chat_request(), headers=scripted(script)
        ) as response:
            assert response.status_code == 200
            for event in iter_timed_events(response):
                received.append(event)
                if len(received) == 2:  # the role delta and the first content chunk
                    # Taken before `break`: closing the event generator may already close the
                    # connection, and the proxy reacts within a fraction of a millisecond.
                    closing_at = time.time()
                    break
        # Leaving the block closes the half-read response, and with it the connection.
        left_at = time.time()
    (entry,) = fake.wait_for_journal(disconnected, JOURNAL_DEADLINE)
    assert closing_at <= entry["disconnected_at"] <= left_at + CANCEL_WITHIN
    assert 2 <= entry["chunks_before_disconnect"] <= 4  # of 22
    assert not entry["completed"]


async def test_async_sdk_closing_a_stream_cancels_the_upstream_request(
    async_sdk: openai.AsyncOpenAI, fake: FakeUpstreamClient
) -> None:
    script = {"stream": True, "chunks": ["tick"] * 20, "delay_per_chunk": 0.25}
    stream = await async_sdk.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "count"}],
        stream=True,
        extra_headers=scripted(script),
    )
    async for chunk in stream:
        if chunk.choices[0].delta.content:
            closing_at = time.time()  # before `break`, as above
            break
    await stream.close()
    left_at = time.time()
    (entry,) = fake.wait_for_journal(disconnected, JOURNAL_DEADLINE)
    assert closing_at <= entry["disconnected_at"] <= left_at + CANCEL_WITHIN
    assert 2 <= entry["chunks_before_disconnect"] <= 4  # of 22


# --- the upstream fails mid-stream ----------------------------------------------------------


def assert_ends_with_the_interruption_event(events: list[TimedEvent], content: str) -> None:
    *before, last = events
    payloads = [event.data for event in before]
    assert "[DONE]" not in payloads
    assert "[DONE]" not in last.data
    assert content_of(payloads) == content
    error = last.json()["error"]
    assert error["code"] == INTERRUPTED
    assert error["param"] is None
    assert isinstance(error["message"], str)
    assert isinstance(error["type"], str)


def test_reset_after_three_chunks_gives_three_chunks_then_the_error_event(
    target: Target, fake: FakeUpstreamClient
) -> None:
    script = {"stream": True, "ending": "reset", "after_chunks": 3}
    status, events = stream_events(target.proxy_url, script)
    assert status == 200
    assert len(events) == 1 + 3 + 1  # role delta, three content chunks, the error event
    assert_ends_with_the_interruption_event(events, "Hello from fake")
    (entry,) = fake.journal()
    assert len(entry["chunks"]) == 4


def test_sdk_raises_api_error_on_a_reset_stream_instead_of_a_short_answer(
    sdk: openai.OpenAI,
) -> None:
    script = {"stream": True, "ending": "reset", "after_chunks": 3}
    stream = sdk.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "hi"}],
        stream=True,
        extra_headers=scripted(script),
    )
    received: list[str] = []
    with pytest.raises(openai.APIError) as caught:
        received.extend(chunk.choices[0].delta.content or "" for chunk in stream)
    assert type(caught.value) is openai.APIError
    assert caught.value.code == INTERRUPTED
    assert "".join(received) == "Hello from fake"


@pytest.mark.parametrize("ending", ["reset", "close"])
def test_non_stream_body_cut_short_aborts_the_client_connection(
    target: Target, fake: FakeUpstreamClient, ending: str
) -> None:
    # The fake announces the whole JSON body's Content-Length, sends half, then cuts.
    with httpx.Client(timeout=10.0) as client, pytest.raises(httpx.RemoteProtocolError):
        client.post(
            f"{target.proxy_url}{CHAT_PATH}",
            json=chat_request(stream=False),
            headers=scripted({"ending": ending}),
        )


def test_stall_mid_stream_past_the_read_timeout_gives_the_error_event(
    self_hosted: Target, fake: FakeUpstreamClient
) -> None:
    script = {"stream": True, "ending": "stall", "after_chunks": 2}
    with start_proxy(fake.base_url, read_timeout=0.5) as proxy:
        status, events = stream_events(proxy.url, script)
        (entry,) = fake.wait_for_journal(disconnected, JOURNAL_DEADLINE)
    assert status == 200
    assert len(events) == 1 + 2 + 1
    assert_ends_with_the_interruption_event(events, "Hello from")
    silence = events[-1].arrived_at - events[-2].arrived_at
    assert 0.45 <= silence < 5.0
    # The proxy gave up on the stalled upstream request as well.
    assert entry["chunks_before_disconnect"] == 3
    assert entry["disconnected_at"] <= events[-1].arrived_at + CANCEL_WITHIN


def test_stall_before_headers_past_the_read_timeout_gives_504(
    self_hosted: Target, fake: FakeUpstreamClient
) -> None:
    with start_proxy(fake.base_url, read_timeout=0.5) as proxy, httpx.Client() as client:
        started = time.monotonic()
        response = client.post(
            f"{proxy.url}{CHAT_PATH}",
            json=chat_request(),
            headers=scripted({"stream": True, "delay_before_headers": 30}),
            timeout=10.0,
        )
        elapsed = time.monotonic() - started
        (entry,) = fake.wait_for_journal(disconnected, JOURNAL_DEADLINE)
    assert response.status_code == 504
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert error["code"] == "upstream_timeout"
    assert error["param"] is None
    assert 0.45 <= elapsed < 5.0
    assert entry["status"] is None
