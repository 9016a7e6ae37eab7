"""The official `openai` SDK, sync and async, through the real proxy to the real fake upstream.

What a user of the proxy sees: whole answers, streams reassembled exactly, the usage chunk last,
and upstream errors raised as the SDK's own exception classes with the upstream's headers and
request id intact (DESIGN §4.1, §4.2; WIRE.md).
"""

from __future__ import annotations

from typing import Any

import openai
import pytest
from openai.types.chat import ChatCompletionChunk

from fake_upstream.scripts import SCENARIOS
from tests.e2e.fake_client import FakeUpstreamClient

pytestmark = pytest.mark.e2e

DEFAULT_TEXT = "Hello from fake upstream!"
MESSAGES: Any = [{"role": "user", "content": "Say hello"}]
MODEL = "gpt-4o-mini"


def scenario(name: str) -> dict[str, str]:
    return {"x-fake-scenario": name}


def text_of(chunks: list[ChatCompletionChunk]) -> str:
    return "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)


def assert_usage_chunk_last(chunks: list[ChatCompletionChunk]) -> None:
    *others, last = chunks
    assert last.choices == []
    assert last.usage is not None
    assert last.usage.completion_tokens > 0
    assert last.usage.total_tokens == last.usage.prompt_tokens + last.usage.completion_tokens
    assert all(chunk.usage is None for chunk in others)
    assert all(chunk.choices for chunk in others)


# --- synchronous SDK --------------------------------------------------------------------------


def test_sync_non_streaming(sdk: openai.OpenAI, fake: FakeUpstreamClient) -> None:
    completion = sdk.chat.completions.create(model=MODEL, messages=MESSAGES)
    assert completion.choices[0].message.content == DEFAULT_TEXT
    assert completion.choices[0].finish_reason == "stop"
    (entry,) = fake.journal()
    assert completion._request_id == entry["id"]


def test_sync_streaming_reassembles_the_text_exactly(sdk: openai.OpenAI) -> None:
    chunks = list(sdk.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True))
    assert text_of(chunks) == DEFAULT_TEXT
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert len({(chunk.id, chunk.created) for chunk in chunks}) == 1


def test_sync_streaming_scripted_chunks_reassemble_exactly(
    sdk: openai.OpenAI, fake: FakeUpstreamClient
) -> None:
    pieces = ["Ünï", "côdé ", "", "🙂 emoji", " and\nnewlines", ' "quotes" ', "data: [DONE]"]
    fake.queue({"chunks": pieces})
    chunks = list(sdk.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True))
    assert text_of(chunks) == "".join(pieces)


def test_sync_include_usage_chunk_is_present_and_last(sdk: openai.OpenAI) -> None:
    chunks = list(
        sdk.chat.completions.create(
            model=MODEL, messages=MESSAGES, stream=True, stream_options={"include_usage": True}
        )
    )
    assert text_of(chunks) == DEFAULT_TEXT
    assert_usage_chunk_last(chunks)


def test_sync_429_raises_rate_limit_error_with_upstream_headers(
    sdk: openai.OpenAI, fake: FakeUpstreamClient
) -> None:
    with pytest.raises(openai.RateLimitError) as caught:
        sdk.chat.completions.create(
            model=MODEL, messages=MESSAGES, extra_headers=scenario("rate_limited")
        )
    error = caught.value
    (entry,) = fake.journal()
    assert error.status_code == 429
    assert error.response.headers["retry-after"] == "1"
    assert error.response.headers["x-ratelimit-remaining-requests"] == "0"
    assert error.request_id == entry["id"]
    assert error.code == "rate_limit_exceeded"
    assert "Rate limit reached" in error.message


def test_sync_queued_429_keeps_a_scripted_retry_after(
    sdk: openai.OpenAI, fake: FakeUpstreamClient
) -> None:
    fake.queue({"status": 429, "headers": {"retry-after": "17", "retry-after-ms": "17000"}})
    with pytest.raises(openai.RateLimitError) as caught:
        sdk.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True)
    assert caught.value.response.headers["retry-after"] == "17"
    assert caught.value.response.headers["retry-after-ms"] == "17000"
    assert caught.value.request_id == fake.journal()[0]["id"]


def test_sync_500_raises_internal_server_error(
    sdk: openai.OpenAI, fake: FakeUpstreamClient
) -> None:
    with pytest.raises(openai.InternalServerError) as caught:
        sdk.chat.completions.create(
            model=MODEL, messages=MESSAGES, extra_headers=scenario("server_error")
        )
    assert caught.value.status_code == 500
    assert caught.value.request_id == fake.journal()[0]["id"]


def test_sync_error_event_in_stream_raises_api_error(sdk: openai.OpenAI) -> None:
    received: list[ChatCompletionChunk] = []
    stream = sdk.chat.completions.create(
        model=MODEL, messages=MESSAGES, stream=True, extra_headers=scenario("error_in_stream")
    )
    with pytest.raises(openai.APIError) as caught:
        received.extend(stream)
    assert type(caught.value) is openai.APIError  # the in-stream kind, not an HTTP status error
    assert isinstance(caught.value.body, dict)
    assert caught.value.body["type"] == "server_error"
    assert text_of(received) == "Hello from"  # the two chunks before the error


# --- asynchronous SDK -------------------------------------------------------------------------


async def test_async_non_streaming(async_sdk: openai.AsyncOpenAI) -> None:
    completion = await async_sdk.chat.completions.create(model=MODEL, messages=MESSAGES)
    assert completion.choices[0].message.content == DEFAULT_TEXT


async def test_async_streaming_with_usage(async_sdk: openai.AsyncOpenAI) -> None:
    stream = await async_sdk.chat.completions.create(
        model=MODEL, messages=MESSAGES, stream=True, stream_options={"include_usage": True}
    )
    chunks = [chunk async for chunk in stream]
    assert text_of(chunks) == DEFAULT_TEXT
    assert_usage_chunk_last(chunks)


async def test_async_429_raises_rate_limit_error_with_upstream_headers(
    async_sdk: openai.AsyncOpenAI, fake: FakeUpstreamClient
) -> None:
    with pytest.raises(openai.RateLimitError) as caught:
        await async_sdk.chat.completions.create(
            model=MODEL, messages=MESSAGES, extra_headers=scenario("rate_limited")
        )
    assert caught.value.response.headers["retry-after"] == "1"
    assert caught.value.request_id == fake.journal()[0]["id"]


async def test_async_500_raises_internal_server_error(async_sdk: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.InternalServerError):
        await async_sdk.chat.completions.create(
            model=MODEL, messages=MESSAGES, stream=True, extra_headers=scenario("server_error")
        )


async def test_async_error_event_in_stream_raises_api_error(
    async_sdk: openai.AsyncOpenAI,
) -> None:
    stream = await async_sdk.chat.completions.create(
        model=MODEL, messages=MESSAGES, stream=True, extra_headers=scenario("error_in_stream")
    )
    with pytest.raises(openai.APIError) as caught:
        async for _ in stream:
            pass
    assert type(caught.value) is openai.APIError


# --- every well-formed scenario of the fake, parsed by the SDK through the proxy ---------------

# Scenario -> what the SDK makes of it: the text of a whole answer, or the exception it raises.
WELL_FORMED: dict[str, str | type[openai.APIError]] = {
    "slow_headers": DEFAULT_TEXT,
    "slow_stream": DEFAULT_TEXT,
    "crlf_stream": DEFAULT_TEXT,
    "split_event": DEFAULT_TEXT,
    "ping_stream": DEFAULT_TEXT,
    "close_without_done": DEFAULT_TEXT,
    "rate_limited": openai.RateLimitError,
    "insufficient_quota": openai.RateLimitError,
    "server_error": openai.InternalServerError,
    "service_unavailable": openai.InternalServerError,
    "text_500": openai.InternalServerError,
    "error_in_stream": openai.APIError,
}
NOT_PARSED_HERE = {
    "echo": "answers with the request it saw, not a completion (test_headers_e2e.py)",
    "reset_mid_stream": "a broken stream (test_disconnects_e2e.py)",
    "stall_mid_stream": "a broken stream (test_disconnects_e2e.py)",
    "malformed_json": "invalid JSON on purpose (test_streaming_e2e.py)",
}


def test_every_scenario_is_classified() -> None:
    assert set(WELL_FORMED) | set(NOT_PARSED_HERE) == set(SCENARIOS)
    assert not set(WELL_FORMED) & set(NOT_PARSED_HERE)


def answer_to(sdk: openai.OpenAI, name: str) -> tuple[str, str | None]:
    """(text, finish_reason) of the SDK's answer to a scenario, streamed if the scenario is."""
    headers = scenario(name)
    if SCENARIOS[name].get("stream") is True:
        chunks = list(
            sdk.chat.completions.create(
                model=MODEL, messages=MESSAGES, stream=True, extra_headers=headers
            )
        )
        return text_of(chunks), chunks[-1].choices[0].finish_reason
    completion = sdk.chat.completions.create(model=MODEL, messages=MESSAGES, extra_headers=headers)
    return completion.choices[0].message.content or "", completion.choices[0].finish_reason


@pytest.mark.parametrize("name", sorted(WELL_FORMED))
def test_sdk_parses_scenario(sdk: openai.OpenAI, name: str) -> None:
    expected = WELL_FORMED[name]
    if isinstance(expected, type):
        with pytest.raises(expected) as caught:
            answer_to(sdk, name)
        if expected is openai.APIError:
            assert type(caught.value) is openai.APIError
        return
    text, finish_reason = answer_to(sdk, name)
    assert text == expected
    assert finish_reason == (None if name == "close_without_done" else "stop")
