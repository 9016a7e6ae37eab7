"""The official `openai` SDK against the fake's Responses API and tool calls: what a test author
gets from `responses.create`, `responses.stream`, `responses.retrieve` and
`chat.completions.stream`, for every ending (issue 11, items 1-4)."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import openai
import pytest
from openai.types.responses import ResponseStreamEvent

from fake_upstream import FakeUpstreamServer

MODEL = "gpt-4o-mini"
REPLY = "Hello from fake upstream!"
WEATHER = {"name": "get_weather", "arguments": '{"city":"Paris"}'}
TIME = {"name": "get_time", "arguments": '{"zone":"Europe/Paris","format":"24h"}', "id": "call_t"}
NO_COMPLETED = re.escape("Didn't receive a `response.completed` event.")
TEXT_EVENTS = [
    "response.created",
    "response.in_progress",
    "response.output_item.added",
    "response.content_part.added",
    *["response.output_text.delta"] * 5,
    "response.output_text.done",
    "response.content_part.done",
    "response.output_item.done",
    "response.completed",
]


def script(**fields: Any) -> dict[str, str]:
    return {"x-fake-script": json.dumps(fields)}


@pytest.fixture
def client(fake_upstream: FakeUpstreamServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=fake_upstream.base_url, api_key="sk-test", max_retries=0) as c:
        yield c


@pytest.fixture
async def aclient(fake_upstream: FakeUpstreamServer) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(
        base_url=fake_upstream.base_url, api_key="sk-test", max_retries=0
    ) as c:
        yield c


# --- item 1: non-streamed ---------------------------------------------------------------------


def test_create_gives_the_default_reply(
    client: openai.OpenAI, fake_upstream: FakeUpstreamServer
) -> None:
    response = client.responses.create(model=MODEL, input="Say hello")
    assert response.output_text == REPLY
    assert (response.object, response.status, response.model) == ("response", "completed", MODEL)
    (message,) = response.output
    assert message.type == "message"
    assert [part.type for part in message.content] == ["output_text"]
    assert response.usage is not None
    assert response.usage.output_tokens == 5
    assert response.usage.input_tokens_details.cached_tokens == 0
    assert response.usage.output_tokens_details.reasoning_tokens == 0
    assert response.usage.total_tokens == response.usage.input_tokens + 5
    assert response.id.startswith("resp_")
    assert response._request_id == fake_upstream.journal()[0]["id"]


def test_create_joins_the_scripted_chunks(client: openai.OpenAI) -> None:
    chunks = ["Ünï", "côdé ", "", "🙂", ' "q" ']
    response = client.responses.create(model=MODEL, input="x", extra_headers=script(chunks=chunks))
    assert response.output_text == "".join(chunks)


def test_retrieve_returns_the_same_response(client: openai.OpenAI) -> None:
    created = client.responses.create(model=MODEL, input="x", instructions="Be brief")
    again = client.responses.retrieve(created.id)
    assert again.model_dump() == created.model_dump()
    assert again.instructions == "Be brief"
    with pytest.raises(openai.NotFoundError) as caught:
        client.responses.retrieve("resp_nope")
    assert caught.value.param == "response_id"


def test_scripted_errors_raise_the_sdk_classes(client: openai.OpenAI) -> None:
    with pytest.raises(openai.RateLimitError) as caught:
        client.responses.create(
            model=MODEL, input="x", extra_headers={"x-fake-scenario": "rate_limited"}
        )
    assert caught.value.code == "rate_limit_exceeded"
    with pytest.raises(openai.InternalServerError):
        client.responses.create(
            model=MODEL, input="x", stream=True, extra_headers=script(status=500)
        )


# --- item 2: streamed ------------------------------------------------------------------------


def test_stream_gives_the_final_response(client: openai.OpenAI) -> None:
    chunks = ["One", " two", " three"]
    with client.responses.stream(
        model=MODEL, input="x", extra_headers=script(chunks=chunks)
    ) as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert deltas == chunks
    assert final.output_text == "One two three"
    assert final.status == "completed"
    assert final.usage is not None
    assert final.usage.output_tokens == 3


def test_create_stream_yields_every_event_in_order_numbered_from_zero(
    client: openai.OpenAI,
) -> None:
    with client.responses.create(model=MODEL, input="x", stream=True) as stream:
        events: list[ResponseStreamEvent] = list(stream)
    assert [e.type for e in events] == TEXT_EVENTS
    assert [e.sequence_number for e in events] == list(range(len(TEXT_EVENTS)))
    assert events[-1].type == "response.completed"
    assert events[-1].response.output_text == REPLY


def test_the_wire_names_each_event_by_its_type_and_sends_no_done(
    fake_upstream: FakeUpstreamServer,
) -> None:
    body = httpx.post(
        f"{fake_upstream.base_url}/responses",
        json={"model": MODEL, "input": "x", "stream": True},
        timeout=10,
    )
    assert body.headers["content-type"] == "text/event-stream; charset=utf-8"
    blocks = body.content.split(b"\n\n")
    assert blocks.pop() == b""
    assert len(blocks) == len(TEXT_EVENTS)
    for block, expected in zip(blocks, TEXT_EVENTS, strict=True):
        event_line, data_line = block.split(b"\n")
        assert event_line == b"event: " + expected.encode()
        assert json.loads(data_line.removeprefix(b"data: "))["type"] == expected
    assert b"[DONE]" not in body.content
    # One write per event: the journal's chunk records are the events.
    assert len(fake_upstream.journal()[0]["chunks"]) == len(TEXT_EVENTS)


async def test_async_stream(aclient: openai.AsyncOpenAI) -> None:
    async with aclient.responses.stream(model=MODEL, input="x") as stream:
        types = [event.type async for event in stream]
        final = await stream.get_final_response()
    assert types == TEXT_EVENTS
    assert final.output_text == REPLY


# --- starting_after --------------------------------------------------------------------------


def test_retrieve_stream_replays_the_events_after_n(client: openai.OpenAI) -> None:
    with client.responses.create(model=MODEL, input="x", stream=True) as stream:
        original = [e.model_dump() for e in stream]
    response_id = original[0]["response"]["id"]
    with client.responses.retrieve(response_id, stream=True, starting_after=5) as replay:
        replayed = [e.model_dump() for e in replay]
    assert replayed == original[6:]
    with client.responses.retrieve(response_id, stream=True) as everything:
        assert [e.model_dump() for e in everything] == original


def test_stream_by_id_filters_locally_and_still_finishes(client: openai.OpenAI) -> None:
    created = client.responses.create(model=MODEL, input="x")
    with client.responses.stream(response_id=created.id, starting_after=7) as stream:
        numbers = [e.sequence_number for e in stream]
        final = stream.get_final_response()
    assert numbers == list(range(8, len(TEXT_EVENTS)))
    assert final.output_text == REPLY


def test_a_reset_stream_is_resumed_with_starting_after(
    client: openai.OpenAI, fake_upstream: FakeUpstreamServer
) -> None:
    received: list[ResponseStreamEvent] = []
    stream = client.responses.create(
        model=MODEL, input="x", stream=True, extra_headers=script(ending="reset", after_chunks=2)
    )
    with pytest.raises(openai.APIConnectionError):
        received.extend(stream)
    assert received[-1].type == "response.output_text.delta"
    response_id = received[0].response.id  # type: ignore[union-attr]
    last = received[-1].sequence_number
    with client.responses.retrieve(response_id, stream=True, starting_after=last) as rest:
        remainder = list(rest)
    assert remainder[0].sequence_number == last + 1
    assert remainder[-1].type == "response.completed"
    text = "".join(
        e.delta for e in [*received, *remainder] if e.type == "response.output_text.delta"
    )
    assert text == REPLY
    assert fake_upstream.journal()[1]["query"] == f"starting_after={last}&stream=true"


def test_starting_after_must_be_an_integer(
    fake_upstream: FakeUpstreamServer, client: openai.OpenAI
) -> None:
    created = client.responses.create(model=MODEL, input="x")
    answer = httpx.get(
        f"{fake_upstream.base_url}/responses/{created.id}?stream=true&starting_after=x", timeout=10
    )
    assert answer.status_code == 400
    assert answer.json()["error"]["param"] == "starting_after"


# --- item 3: endings ---------------------------------------------------------------------------


def test_error_event_in_the_production_shape_raises_api_error(client: openai.OpenAI) -> None:
    received: list[ResponseStreamEvent] = []
    with (
        client.responses.stream(
            model=MODEL,
            input="x",
            extra_headers=script(
                ending="error_event", after_chunks=2, error={"code": "overloaded"}
            ),
        ) as stream,
        pytest.raises(openai.APIError) as caught,
    ):
        received.extend(stream)
    assert type(caught.value) is openai.APIError
    assert caught.value.code == "overloaded"
    assert caught.value.type == "server_error"
    assert "Sorry about that" in caught.value.message
    assert [e.sequence_number for e in received] == list(range(6))


def test_error_event_in_the_flat_shape_is_yielded(client: openai.OpenAI) -> None:
    headers = script(ending="error_event", after_chunks=1, error_shape="flat", error={"code": "x"})
    with client.responses.stream(model=MODEL, input="x", extra_headers=headers) as stream:
        events = list(stream)
        with pytest.raises(RuntimeError, match=NO_COMPLETED):
            stream.get_final_response()
    error = events[-1]
    assert error.type == "error"
    assert (error.code, error.param, error.sequence_number) == ("x", None, 5)
    assert "Sorry about that" in error.message


def test_failed_is_yielded_not_raised(client: openai.OpenAI) -> None:
    headers = script(
        ending="failed", after_chunks=2, error={"code": "server_error", "message": "boom"}
    )
    with client.responses.stream(model=MODEL, input="x", extra_headers=headers) as stream:
        events = list(stream)
        with pytest.raises(RuntimeError, match=NO_COMPLETED):
            stream.get_final_response()
    failed = events[-1]
    assert failed.type == "response.failed"
    assert failed.response.status == "failed"
    assert failed.response.error is not None
    assert (failed.response.error.code, failed.response.error.message) == ("server_error", "boom")
    assert failed.response.output_text == "Hello from"


def test_incomplete_is_yielded_with_its_reason_and_usage(client: openai.OpenAI) -> None:
    headers = script(ending="incomplete", after_chunks=3)
    with client.responses.create(model=MODEL, input="x", stream=True, extra_headers=headers) as s:
        events = list(s)
    incomplete = events[-1]
    assert incomplete.type == "response.incomplete"
    response = incomplete.response
    assert response.status == "incomplete"
    assert response.incomplete_details is not None
    assert response.incomplete_details.reason == "max_output_tokens"
    assert response.usage is not None
    assert response.usage.output_tokens == 3
    assert response.output_text == "Hello from fake"
    assert response.output[0].status == "incomplete"  # type: ignore[union-attr]


def test_close_ends_silently_for_create_and_loudly_for_stream(client: openai.OpenAI) -> None:
    headers = script(ending="close", after_chunks=2)
    with client.responses.create(model=MODEL, input="x", stream=True, extra_headers=headers) as s:
        events = list(s)  # no error: a stream without a terminal event just ends
    assert events[-1].type == "response.output_text.delta"
    with (
        client.responses.stream(model=MODEL, input="x", extra_headers=headers) as stream,
        pytest.raises(RuntimeError, match=NO_COMPLETED),
    ):
        stream.get_final_response()


def test_reset_raises_a_connection_error(client: openai.OpenAI) -> None:
    with (
        client.responses.stream(
            model=MODEL, input="x", extra_headers=script(ending="reset", after_chunks=1)
        ) as stream,
        pytest.raises(openai.APIConnectionError),
    ):
        stream.get_final_response()


def test_malformed_json_raises_a_decode_error(client: openai.OpenAI) -> None:
    headers = script(ending="malformed_json", after_chunks=1)
    with (
        client.responses.stream(model=MODEL, input="x", extra_headers=headers) as stream,
        pytest.raises(json.JSONDecodeError),
    ):
        stream.get_final_response()


def test_stall_holds_until_the_client_leaves(
    fake_upstream: FakeUpstreamServer,
) -> None:
    with (
        openai.OpenAI(
            base_url=fake_upstream.base_url,
            api_key="k",
            max_retries=0,
            timeout=httpx.Timeout(10, read=1.0),
        ) as client,
        client.responses.stream(
            model=MODEL, input="x", extra_headers=script(ending="stall", after_chunks=1)
        ) as stream,
        pytest.raises(openai.APITimeoutError),
    ):
        stream.get_final_response()
    (entry,) = fake_upstream.wait_for_journal(lambda j: j[0]["disconnected"], timeout=5)
    assert entry["chunks_before_disconnect"] == 5  # created, in_progress, item, part, 1 delta
    assert entry["completed"] is False


@pytest.mark.parametrize("ending", ["crlf", "split_event", "ping"])
def test_tolerable_framings_still_parse(client: openai.OpenAI, ending: str) -> None:
    with client.responses.stream(model=MODEL, input="x", extra_headers=script(ending=ending)) as s:
        types = [e.type for e in s]
        final = s.get_final_response()
    assert types == TEXT_EVENTS
    assert final.output_text == REPLY


# --- item 4: tool calls and reasoning tokens --------------------------------------------------

CHAT: Any = [{"role": "user", "content": "Weather in Paris?"}]
TOOLS: Any = [
    {
        "type": "function",
        "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {}}},
    }
]


def test_chat_stream_tool_calls_reassemble(client: openai.OpenAI) -> None:
    headers = script(tool_calls=[WEATHER, TIME])
    with client.chat.completions.stream(
        model=MODEL, messages=CHAT, tools=TOOLS, extra_headers=headers
    ) as stream:
        chunks = [e.chunk for e in stream if e.type == "chunk"]
        completion = stream.get_final_completion()
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    calls = choice.message.tool_calls
    assert calls is not None
    assert [(c.function.name, c.function.arguments) for c in calls] == [
        (WEATHER["name"], WEATHER["arguments"]),
        (TIME["name"], TIME["arguments"]),
    ]
    assert calls[1].id == "call_t"
    assert calls[0].id.startswith("call_")
    assert calls[0].id != calls[1].id
    # The wire shape of WIRE.md: a head fragment, then at least two argument fragments.
    fragments = [c.choices[0].delta.tool_calls for c in chunks if c.choices[0].delta.tool_calls]
    first = fragments[0][0]  # type: ignore[index]
    assert (first.index, first.id, first.type) == (0, calls[0].id, "function")
    assert first.function is not None
    assert first.function.arguments == ""
    later = [f[0] for f in fragments[1:] if f[0].index == 0]  # type: ignore[index]
    assert len(later) >= 2
    assert all(f.id is None and f.function is not None and f.function.name is None for f in later)


def test_chat_non_streamed_tool_calls(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model=MODEL, messages=CHAT, extra_headers=script(tool_calls=[WEATHER], reasoning_tokens=9)
    )
    message = completion.choices[0].message
    assert completion.choices[0].finish_reason == "tool_calls"
    assert message.content is None
    assert message.tool_calls is not None
    (call,) = message.tool_calls
    assert call.type == "function"
    assert (call.function.name, call.function.arguments) == (WEATHER["name"], WEATHER["arguments"])
    usage = completion.usage
    assert usage is not None
    assert usage.completion_tokens_details is not None
    assert usage.completion_tokens_details.reasoning_tokens == 9
    assert usage.completion_tokens >= 9


def test_chat_text_and_tool_calls_together(client: openai.OpenAI) -> None:
    headers = script(chunks=["Let me check."], tool_calls=[WEATHER])
    with client.chat.completions.stream(model=MODEL, messages=CHAT, extra_headers=headers) as s:
        completion = s.get_final_completion()
    message = completion.choices[0].message
    assert message.content == "Let me check."
    assert message.tool_calls is not None
    assert len(message.tool_calls) == 1


def test_chat_reasoning_tokens_in_the_usage_chunk(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=MODEL,
        messages=CHAT,
        stream=True,
        stream_options={"include_usage": True},
        extra_headers=script(reasoning_tokens=64),
    )
    last = list(stream)[-1]
    assert last.usage is not None
    assert last.usage.completion_tokens_details is not None
    assert last.usage.completion_tokens_details.reasoning_tokens == 64
    assert last.usage.completion_tokens == 5 + 64


def test_chat_incomplete_finishes_with_length(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=MODEL,
        messages=CHAT,
        stream=True,
        extra_headers=script(ending="incomplete", after_chunks=2),
    )
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "Hello from"
    assert chunks[-1].choices[0].finish_reason == "length"


def test_responses_stream_tool_calls(client: openai.OpenAI) -> None:
    headers = script(tool_calls=[WEATHER, TIME], reasoning_tokens=5)
    with client.responses.stream(model=MODEL, input="x", extra_headers=headers) as stream:
        events = list(stream)
        final = stream.get_final_response()
    calls = [item for item in final.output if item.type == "function_call"]
    assert [(c.name, c.arguments) for c in calls] == [
        (WEATHER["name"], WEATHER["arguments"]),
        (TIME["name"], TIME["arguments"]),
    ]
    assert calls[1].call_id == "call_t"
    assert final.output_text == ""  # tool calls only: no message item
    deltas = [e for e in events if e.type == "response.function_call_arguments.delta"]
    assert len([d for d in deltas if d.output_index == 0]) >= 2
    assert deltas[-1].snapshot == TIME["arguments"]  # type: ignore[union-attr]
    dones = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert [d.arguments for d in dones] == [WEATHER["arguments"], TIME["arguments"]]
    assert final.usage is not None
    assert final.usage.output_tokens_details.reasoning_tokens == 5


def test_responses_create_tool_calls(client: openai.OpenAI) -> None:
    response = client.responses.create(
        model=MODEL, input="x", extra_headers=script(tool_calls=[WEATHER], chunks=["Checking."])
    )
    message, call = response.output
    assert message.type == "message"
    assert call.type == "function_call"
    assert (call.name, call.arguments, call.status) == (
        WEATHER["name"],
        WEATHER["arguments"],
        "completed",
    )
    assert response.output_text == "Checking."
