"""The Responses API through the real proxy to the real fake upstream (issue 11): named-event
streams byte for byte, `starting_after` on the query, tool calls, and what the SDK makes of the
proxy's own interruption event and of a client that leaves (DESIGN §4.2-§4.4)."""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
import openai
import pytest
from openai.types.responses import ResponseStreamEvent

from tests.e2e.conftest import Target, start_proxy
from tests.e2e.fake_client import FakeUpstreamClient, Journal
from tests.e2e.sse_events import TimedEvent, iter_timed_events, split_events

pytestmark = pytest.mark.e2e

RESPONSES_PATH = "/v1/responses"
MODEL = "gpt-4o-mini"
REPLY = "Hello from fake upstream!"
INTERRUPTED = "upstream_stream_interrupted"
CANCEL_WITHIN = 1.0  # DESIGN §4.3
# Fixed id and created_at, so two runs of a script send the same bytes.
PINNED = {"id": "resp_golden", "created": 1_700_000_000, "stream": True}
WEATHER = {"name": "get_weather", "arguments": '{"city":"Paris"}', "id": "call_w"}


def scripted(script: dict[str, Any]) -> dict[str, str]:
    return {"x-fake-script": json.dumps(script)}


def post(url: str, script: dict[str, Any]) -> httpx.Response:
    with httpx.Client(timeout=10.0) as client:
        return client.post(
            f"{url}{RESPONSES_PATH}",
            json={"model": MODEL, "input": "Say hello", "stream": True},
            headers=scripted(script),
        )


# --- bytes ------------------------------------------------------------------------------------

# ending (plus fields) -> bytes that must be in the stream: proof the fake sent the oddity.
ENDINGS: dict[str, tuple[dict[str, Any], bytes]] = {
    "done": ({}, b"event: response.completed\ndata: "),
    "tool_calls": (
        {"tool_calls": [WEATHER]},
        b"event: response.function_call_arguments.delta\n",
    ),
    "error_event": (
        {"ending": "error_event", "after_chunks": 2},
        b'"error":{"type":"server_error"',
    ),
    "error_event_flat": (
        {"ending": "error_event", "after_chunks": 2, "error_shape": "flat"},
        b'event: error\ndata: {"type":"error","code":"server_error"',
    ),
    "failed": ({"ending": "failed", "after_chunks": 1}, b"event: response.failed\n"),
    "incomplete": ({"ending": "incomplete", "after_chunks": 1}, b'"reason":"max_output_tokens"'),
    "close": ({"ending": "close", "after_chunks": 2}, b'"delta":" from","logprobs":[]}\n\n'),
    "malformed_json": ({"ending": "malformed_json", "after_chunks": 1}, b"data: {not json\n\n"),
    "crlf": ({"ending": "crlf"}, b"\r\nevent: response.completed\r\n"),
    "split_event": ({"ending": "split_event"}, b"event: response.completed\n"),
    "ping": ({"ending": "ping"}, b": ping\n\nevent: response.output_text.delta\n"),
}


@pytest.mark.parametrize("name", sorted(ENDINGS))
def test_responses_streams_pass_through_byte_identical(
    target: Target, fake: FakeUpstreamClient, name: str
) -> None:
    fields, marker = ENDINGS[name]
    script = {**PINNED, **fields}
    direct = post(fake.url, script)
    proxied = post(target.proxy_url, script)
    assert marker in direct.content
    assert proxied.status_code == direct.status_code == 200
    assert proxied.headers["content-type"] == "text/event-stream; charset=utf-8"
    assert proxied.content == direct.content
    assert b"[DONE]" not in proxied.content
    if name == "split_event":
        # Proof that the fake really wrote one event in two halves to the proxy.
        assert len(fake.journal()[-1]["chunks"]) == len(split_events(proxied.content)) + 1


# --- the SDK through the proxy ----------------------------------------------------------------


def test_sdk_create_and_stream_through_the_proxy(
    sdk: openai.OpenAI, fake: FakeUpstreamClient
) -> None:
    response = sdk.responses.create(model=MODEL, input="Say hello")
    assert response.output_text == REPLY
    assert response._request_id == fake.journal()[0]["id"]
    with sdk.responses.stream(model=MODEL, input="Say hello") as stream:
        numbers = [event.sequence_number for event in stream]
        final = stream.get_final_response()
    assert numbers == list(range(13))
    assert final.output_text == REPLY


async def test_async_sdk_tool_calls_through_the_proxy(async_sdk: openai.AsyncOpenAI) -> None:
    headers = scripted({"tool_calls": [WEATHER]})
    async with async_sdk.responses.stream(model=MODEL, input="x", extra_headers=headers) as stream:
        final = await stream.get_final_response()
    (call,) = final.output
    assert call.type == "function_call"
    assert (call.call_id, call.arguments) == ("call_w", WEATHER["arguments"])
    async with async_sdk.chat.completions.stream(
        model=MODEL, messages=[{"role": "user", "content": "x"}], extra_headers=headers
    ) as chat:
        completion = await chat.get_final_completion()
    calls = completion.choices[0].message.tool_calls
    assert calls is not None
    assert [c.function.arguments for c in calls] == [WEATHER["arguments"]]


def test_starting_after_reaches_the_upstream_through_the_proxy(
    sdk: openai.OpenAI, fake: FakeUpstreamClient
) -> None:
    with sdk.responses.create(model=MODEL, input="x", stream=True) as stream:
        original = [event.model_dump() for event in stream]
    response_id = original[0]["response"]["id"]
    with sdk.responses.retrieve(response_id, stream=True, starting_after=8) as replay:
        replayed = [event.model_dump() for event in replay]
    assert replayed == original[9:]
    retrieve = fake.journal()[1]
    assert retrieve["method"] == "GET"
    assert retrieve["path"] == f"{RESPONSES_PATH}/{response_id}"
    assert retrieve["query"] == "starting_after=8&stream=true"


# --- the upstream fails mid-stream -------------------------------------------------------------


def test_reset_mid_responses_stream_ends_in_the_interruption_event(
    target: Target, fake: FakeUpstreamClient
) -> None:
    body = post(target.proxy_url, {"stream": True, "ending": "reset", "after_chunks": 2}).content
    *events, last = split_events(body)
    assert [TimedEvent(e, 0.0).json()["sequence_number"] for e in events] == list(range(6))
    # DESIGN §4.4: the chat-style error event, with no `event:` line, and nothing invented.
    assert last.startswith(b"data: {")
    assert json.loads(last.removeprefix(b"data: "))["error"]["code"] == INTERRUPTED
    assert b"response.completed" not in body
    assert len(fake.journal()[0]["chunks"]) == 6


def test_sdk_raises_api_error_on_an_interrupted_responses_stream(sdk: openai.OpenAI) -> None:
    """How the SDK surfaces it: `APIError` (the event's JSON has a truthy `error`), raised by
    both `responses.stream` and `responses.create(stream=True)`, after the events before it."""
    headers = scripted({"ending": "reset", "after_chunks": 3})
    received: list[ResponseStreamEvent] = []
    with (
        sdk.responses.stream(model=MODEL, input="x", extra_headers=headers) as stream,
        pytest.raises(openai.APIError) as caught,
    ):
        received.extend(stream)
    assert type(caught.value) is openai.APIError
    assert caught.value.code == INTERRUPTED
    text = "".join(e.delta for e in received if e.type == "response.output_text.delta")
    assert text == "Hello from fake"
    raw = sdk.responses.create(model=MODEL, input="x", stream=True, extra_headers=headers)
    with raw, pytest.raises(openai.APIError) as caught_raw:
        list(raw)
    assert caught_raw.value.code == INTERRUPTED


def test_stall_mid_responses_stream_past_the_read_timeout(
    self_hosted: Target, fake: FakeUpstreamClient
) -> None:
    script = {"stream": True, "ending": "stall", "after_chunks": 1}
    with start_proxy(fake.base_url, read_timeout=0.5) as proxy:
        with (
            openai.OpenAI(base_url=f"{proxy.url}/v1", api_key="k", max_retries=0) as client,
            client.responses.stream(
                model=MODEL, input="x", extra_headers=scripted(script)
            ) as stream,
            pytest.raises(openai.APIError) as caught,
        ):
            stream.get_final_response()
        (entry,) = fake.wait_for_journal(disconnected, 5.0)
    assert caught.value.code == INTERRUPTED
    assert entry["chunks_before_disconnect"] == 5


# --- the client leaves --------------------------------------------------------------------------


def disconnected(journal: Journal) -> bool:
    return len(journal) == 1 and journal[0]["disconnected"]


def test_client_leaving_a_responses_stream_cancels_the_upstream_request(
    target: Target, fake: FakeUpstreamClient
) -> None:
    script = {"stream": True, "chunks": ["tick"] * 20, "delay_per_chunk": 0.25}
    received: list[TimedEvent] = []
    with httpx.Client(timeout=10.0) as client:
        with client.stream(
            "POST",
            f"{target.proxy_url}{RESPONSES_PATH}",
            json={"model": MODEL, "input": "count", "stream": True},
            headers=scripted(script),
        ) as response:
            assert response.status_code == 200
            for event in iter_timed_events(response):
                received.append(event)
                if event.raw.startswith(b"event: response.output_text.delta"):
                    closing_at = time.time()  # before `break`: the proxy reacts at once
                    break
        left_at = time.time()
    (entry,) = fake.wait_for_journal(disconnected, 5.0)
    assert closing_at <= entry["disconnected_at"] <= left_at + CANCEL_WITHIN
    assert 5 <= entry["chunks_before_disconnect"] <= 7  # of 26
    assert not entry["completed"]


async def test_async_sdk_closing_a_responses_stream_cancels_the_upstream_request(
    async_sdk: openai.AsyncOpenAI, fake: FakeUpstreamClient
) -> None:
    script = {"chunks": ["tick"] * 20, "delay_per_chunk": 0.25}
    async with async_sdk.responses.stream(
        model=MODEL, input="x", extra_headers=scripted(script)
    ) as stream:
        async for event in stream:
            if event.type == "response.output_text.delta":
                closing_at = time.time()
                break
    left_at = time.time()
    (entry,) = fake.wait_for_journal(disconnected, 5.0)
    assert closing_at <= entry["disconnected_at"] <= left_at + CANCEL_WITHIN
    assert 5 <= entry["chunks_before_disconnect"] <= 7
