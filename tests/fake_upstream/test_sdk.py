"""The official `openai` SDK, sync and async, pointed straight at the fake: every well-formed
scenario must parse as it would against the real API."""

from __future__ import annotations

import json

import openai
import pytest

from fake_upstream import FakeUpstreamServer

MESSAGES: list[openai.types.chat.ChatCompletionMessageParam] = [
    {"role": "user", "content": "Say hello"}
]
REPLY = "Hello from fake upstream!"


def scenario(name: str) -> dict[str, str]:
    return {"x-fake-scenario": name}


@pytest.fixture
def client(fake_upstream: FakeUpstreamServer) -> openai.OpenAI:
    with openai.OpenAI(base_url=fake_upstream.base_url, api_key="sk-test", max_retries=0) as c:
        yield c  # type: ignore[misc]


@pytest.fixture
async def aclient(fake_upstream: FakeUpstreamServer) -> openai.AsyncOpenAI:
    async with openai.AsyncOpenAI(
        base_url=fake_upstream.base_url, api_key="sk-test", max_retries=0
    ) as c:
        yield c  # type: ignore[misc]


# --- sync ---


def test_non_streaming(client: openai.OpenAI, fake_upstream: FakeUpstreamServer) -> None:
    completion = client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert completion.choices[0].message.content == REPLY
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None
    assert completion.usage.completion_tokens == 5
    assert completion._request_id == fake_upstream.journal()[0]["id"]


def test_streaming_reassembles_exactly(client: openai.OpenAI) -> None:
    chunks = ["Ein ", "Fluss ", "fließt", " 🌊", ""]
    stream = client.chat.completions.create(
        model="gpt-4o-mini",
        messages=MESSAGES,
        stream=True,
        extra_headers={"x-fake-script": f'{{"chunks": {list_json(chunks)}}}'},
    )
    with stream:
        received = list(stream)
    assert len({(c.id, c.created) for c in received}) == 1
    assert received[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in received) == "".join(chunks)
    assert received[-1].choices[0].finish_reason == "stop"
    assert all(c.usage is None for c in received)


def list_json(items: list[str]) -> str:
    return json.dumps(items)


def test_include_usage_chunk(client: openai.OpenAI) -> None:
    with client.chat.completions.create(
        model="gpt-4o-mini",
        messages=MESSAGES,
        stream=True,
        stream_options={"include_usage": True},
    ) as stream:
        received = list(stream)
    last = received[-1]
    assert last.choices == []
    assert last.usage is not None
    assert last.usage.total_tokens == last.usage.prompt_tokens + 5
    assert all(c.usage is None for c in received[:-1])


def test_rate_limited(client: openai.OpenAI, fake_upstream: FakeUpstreamServer) -> None:
    with pytest.raises(openai.RateLimitError) as caught:
        client.chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, extra_headers=scenario("rate_limited")
        )
    error = caught.value
    assert error.status_code == 429
    assert error.code == "rate_limit_exceeded"
    assert error.response.headers["retry-after"] == "1"
    assert error.response.headers["x-ratelimit-remaining-requests"] == "0"
    assert error.request_id == fake_upstream.journal()[0]["id"]


def test_server_error(client: openai.OpenAI) -> None:
    with pytest.raises(openai.InternalServerError) as caught:
        client.chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, extra_headers=scenario("server_error")
        )
    assert caught.value.status_code == 500
    assert caught.value.type == "server_error"


def test_text_500(client: openai.OpenAI) -> None:
    with pytest.raises(openai.InternalServerError) as caught:
        client.chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, extra_headers=scenario("text_500")
        )
    assert caught.value.response.text == "Internal Server Error"
    assert caught.value.response.headers["content-type"].startswith("text/plain")


def test_error_in_stream(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="gpt-4o-mini",
        messages=MESSAGES,
        stream=True,
        extra_headers=scenario("error_in_stream"),
    )
    received: list[openai.types.chat.ChatCompletionChunk] = []
    with stream, pytest.raises(openai.APIError, match="Sorry about that"):
        received.extend(stream)  # keeps the chunks that arrived before the error
    assert "".join(c.choices[0].delta.content or "" for c in received) == "Hello from"


@pytest.mark.parametrize("name", ["crlf_stream", "split_event", "ping_stream"])
def test_tolerable_framings_still_parse(client: openai.OpenAI, name: str) -> None:
    with client.chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, stream=True, extra_headers=scenario(name)
    ) as stream:
        text = "".join(c.choices[0].delta.content or "" for c in stream)
    assert text == REPLY


def test_legacy_completions(client: openai.OpenAI) -> None:
    completion = client.completions.create(model="gpt-3.5-turbo-instruct", prompt="Say hello")
    assert completion.choices[0].text == REPLY
    with client.completions.create(
        model="gpt-3.5-turbo-instruct",
        prompt="Say hello",
        stream=True,
        stream_options={"include_usage": True},
    ) as stream:
        received = list(stream)
    assert "".join(c.choices[0].text for c in received if c.choices) == REPLY
    assert received[-1].usage is not None


def test_embeddings_and_models(client: openai.OpenAI) -> None:
    base64_default = client.embeddings.create(model="text-embedding-3-small", input=["a", "b"])
    floats = client.embeddings.create(
        model="text-embedding-3-small", input=["a", "b"], encoding_format="float"
    )
    assert len(base64_default.data) == 2
    assert base64_default.data[0].embedding == pytest.approx(floats.data[0].embedding, abs=1e-6)
    assert base64_default.data[0].embedding != base64_default.data[1].embedding
    assert "gpt-4o-mini" in [model.id for model in client.models.list()]


# --- async ---


async def test_async_non_streaming(aclient: openai.AsyncOpenAI) -> None:
    completion = await aclient.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert completion.choices[0].message.content == REPLY


async def test_async_streaming_with_usage(aclient: openai.AsyncOpenAI) -> None:
    stream = await aclient.chat.completions.create(
        model="gpt-4o-mini",
        messages=MESSAGES,
        stream=True,
        stream_options={"include_usage": True},
    )
    async with stream:
        received = [chunk async for chunk in stream]
    assert "".join(c.choices[0].delta.content or "" for c in received if c.choices) == REPLY
    assert received[-1].usage is not None


async def test_async_errors(aclient: openai.AsyncOpenAI, fake_upstream: FakeUpstreamServer) -> None:
    with pytest.raises(openai.RateLimitError) as caught:
        await aclient.chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, extra_headers=scenario("rate_limited")
        )
    assert caught.value.response.headers["retry-after"] == "1"
    assert caught.value.request_id == fake_upstream.journal()[0]["id"]
    with pytest.raises(openai.InternalServerError):
        await aclient.chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, extra_headers=scenario("server_error")
        )
    stream = await aclient.chat.completions.create(
        model="gpt-4o-mini",
        messages=MESSAGES,
        stream=True,
        extra_headers=scenario("error_in_stream"),
    )
    async with stream:
        with pytest.raises(openai.APIError, match="Sorry about that"):
            async for _ in stream:
                pass
