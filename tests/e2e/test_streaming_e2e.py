"""Streams through the real proxy: nothing held back, nothing changed (DESIGN §4.2).

Timing is compared with the fake upstream's journal (`written_at` of each chunk, wall clock,
same machine), and bytes with what the fake sends to a client that talks to it directly.
"""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
import openai
import pytest

from tests.e2e.conftest import Target
from tests.e2e.fake_client import FakeUpstreamClient
from tests.e2e.sse_events import (
    CHAT_PATH,
    TimedEvent,
    chat_request,
    content_of,
    data_events,
    iter_timed_events,
)

pytestmark = pytest.mark.e2e

SLOW_CHUNKS = ["one", " two", " three", " four"]
SLOW_SCRIPT = {"stream": True, "chunks": SLOW_CHUNKS, "delay_per_chunk": 0.3}
# Fixed id and created, so two runs of the script send the same bytes.
PINNED = {"id": "chatcmpl-golden", "created": 1_700_000_000}


def scripted(script: dict[str, Any]) -> dict[str, str]:
    return {"x-fake-script": json.dumps(script)}


def assert_each_event_arrived_before_the_next_was_written(
    arrivals: list[float], entry: dict[str, Any]
) -> None:
    written = [chunk["written_at"] for chunk in entry["chunks"]]
    # Writes 0..4 are the role delta and the four content chunks, each content chunk 0.3 s
    # after the one before; a buffering proxy delivers them together after the last write.
    for index in range(len(SLOW_CHUNKS)):
        assert arrivals[index] < written[index + 1], (
            f"event {index} arrived {arrivals[index] - written[index + 1]:.3f} s after "
            f"event {index + 1} was written; writes: {written}, arrivals: {arrivals}"
        )


def test_each_chunk_arrives_before_the_next_is_written(
    target: Target, fake: FakeUpstreamClient
) -> None:
    events: list[TimedEvent] = []
    with (
        httpx.Client(timeout=10.0) as client,
        client.stream(
            "POST",
            f"{target.proxy_url}{CHAT_PATH}",
            json=chat_request(),
            headers=scripted(SLOW_SCRIPT),
        ) as response,
    ):
        assert response.status_code == 200
        events.extend(iter_timed_events(response))
    (entry,) = fake.wait_for_journal(lambda j: len(j) == 1 and j[0]["completed"])
    assert len(events) == len(entry["chunks"])
    for event, chunk in zip(events, entry["chunks"], strict=True):
        assert event.arrived_at >= chunk["written_at"] - 0.05  # the clocks agree
    assert content_of([event.data for event in events]) == "".join(SLOW_CHUNKS)
    assert_each_event_arrived_before_the_next_was_written(
        [event.arrived_at for event in events], entry
    )


async def test_sdk_receives_each_chunk_before_the_next_is_written(
    async_sdk: openai.AsyncOpenAI, fake: FakeUpstreamClient
) -> None:
    stream = await async_sdk.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "slowly"}],
        stream=True,
        extra_headers=scripted(SLOW_SCRIPT),
    )
    arrivals = []
    text = ""
    async for chunk in stream:
        arrivals.append(time.time())
        text += chunk.choices[0].delta.content or ""
    assert text == "".join(SLOW_CHUNKS)
    (entry,) = fake.wait_for_journal(lambda j: len(j) == 1 and j[0]["completed"])
    assert_each_event_arrived_before_the_next_was_written(arrivals, entry)


# --- bytes ------------------------------------------------------------------------------------

GOLDEN_SCRIPT = {"stream": True, "chunks": ["Hi", " there"], "model": "gpt-golden", **PINNED}


def golden_event(delta: str, finish: str = "null", usage: str = "null") -> bytes:
    return (
        b'data: {"id":"chatcmpl-golden","object":"chat.completion.chunk","created":1700000000,'
        b'"model":"gpt-golden","system_fingerprint":"fp_fake_upstream","choices":[{"index":0,'
        b'"delta":'
        + delta.encode()
        + b',"logprobs":null,"finish_reason":'
        + finish.encode()
        + b'}],"usage":'
        + usage.encode()
        + b"}\n\n"
    )


GOLDEN_STREAM = b"".join(
    [
        golden_event('{"role":"assistant","content":"","refusal":null}'),
        golden_event('{"content":"Hi"}'),
        golden_event('{"content":" there"}'),
        golden_event("{}", finish='"stop"'),
        b'data: {"id":"chatcmpl-golden","object":"chat.completion.chunk","created":1700000000,'
        b'"model":"gpt-golden","system_fingerprint":"fp_fake_upstream","choices":[],'
        b'"usage":{"prompt_tokens":2,"completion_tokens":2,"total_tokens":4}}\n\n',
        b"data: [DONE]\n\n",
    ]
)


def fetch(url: str, script: dict[str, Any], **request: Any) -> httpx.Response:
    with httpx.Client(timeout=10.0) as client:
        return client.post(
            f"{url}{CHAT_PATH}", json=chat_request(**request), headers=scripted(script)
        )


def test_golden_stream_bytes_direct_and_through_the_proxy(
    target: Target, fake: FakeUpstreamClient
) -> None:
    direct = fetch(fake.url, GOLDEN_SCRIPT, include_usage=True)
    proxied = fetch(target.proxy_url, GOLDEN_SCRIPT, include_usage=True)
    assert direct.content == GOLDEN_STREAM
    assert proxied.content == GOLDEN_STREAM
    for response in (direct, proxied):
        assert response.status_code == 200
        assert response.headers["content-type"] == "text/event-stream; charset=utf-8"
        assert response.headers["cache-control"] == "no-cache"
    first, second = fake.journal()
    assert direct.headers["x-request-id"] == first["id"]
    assert proxied.headers["x-request-id"] == second["id"]


# ending -> bytes that must be in the stream (proof that the fake really sent the oddity).
MALFORMED_ENDINGS = {
    "crlf": b"\r\n\r\ndata: [DONE]\r\n\r\n",
    "split_event": b"data: [DONE]\n\n",
    "ping": b": ping\n\ndata: ",
    "malformed_json": b"data: {not json\n\n",
    "close": b'"content":"!"},"logprobs":null,"finish_reason":null}]}\n\n',
}


@pytest.mark.parametrize("ending", sorted(MALFORMED_ENDINGS))
def test_odd_streams_pass_through_byte_identical(
    target: Target, fake: FakeUpstreamClient, ending: str
) -> None:
    script = {"stream": True, "ending": ending, **PINNED}
    direct = fetch(fake.url, script)
    proxied = fetch(target.proxy_url, script)
    assert MALFORMED_ENDINGS[ending] in direct.content
    assert proxied.status_code == direct.status_code == 200
    assert proxied.content == direct.content
    if ending == "close":
        assert b"[DONE]" not in proxied.content
        assert data_events(proxied.content)[-1].startswith("{")
    if ending == "split_event":
        # Proof that the fake really wrote one event in two halves to the proxy.
        assert len(fake.journal()[-1]["chunks"]) == len(data_events(proxied.content)) + 1
