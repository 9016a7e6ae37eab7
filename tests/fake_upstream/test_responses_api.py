"""The Responses API's events and objects as pure functions: numbering, order, every ending, and
the SDK's own stream accumulator fed with them (no server)."""

from __future__ import annotations

import json
from typing import Any, cast

import pytest
from hypothesis import given
from hypothesis import strategies as st
from openai._models import construct_type
from openai._types import omit
from openai.lib.streaming.responses._responses import ResponseStreamState
from openai.types.responses import ResponseStreamEvent

from fake_upstream import responses_api
from fake_upstream.plan import Pause, Reset, Stall, Write, plan_named_stream, stream_bytes
from fake_upstream.scripts import ENDINGS, Script, parse_script
from fake_upstream.wire import FunctionCall, split_arguments

WEATHER = FunctionCall("call_1", "get_weather", '{"city":"Paris"}')
TEXT_ORDER = [
    "response.created",
    "response.in_progress",
    "response.output_item.added",
    "response.content_part.added",
    "response.output_text.delta",
    "response.output_text.delta",
    "response.output_text.done",
    "response.content_part.done",
    "response.output_item.done",
    "response.completed",
]


def spec(
    chunks: tuple[str, ...] = ("Hi", " there"),
    tool_calls: tuple[FunctionCall, ...] = (),
    reasoning_tokens: int = 0,
) -> responses_api.ResponseSpec:
    return responses_api.ResponseSpec(
        id="resp_golden",
        created_at=1_700_000_000,
        model="gpt-4o-mini",
        chunks=chunks,
        tool_calls=tool_calls,
        input_tokens=3,
        reasoning_tokens=reasoning_tokens,
        request={"model": "gpt-4o-mini", "input": "Hey"},
    )


def feed_sdk(events: list[dict[str, Any]]) -> ResponseStreamState[Any]:
    """Run events through the SDK's `responses.stream()` accumulator, which raises on anything
    out of order (an item's delta before the item, a changed id, an unfinished item)."""
    state: ResponseStreamState[Any] = ResponseStreamState(input_tools=omit, text_format=omit)
    for event in events:
        state.handle_event(cast(Any, construct_type(type_=ResponseStreamEvent, value=event)))
    return state


def test_text_stream_order_and_numbering() -> None:
    events = responses_api.stream_events(spec(), ending="done", after_chunks=None)
    assert [e["type"] for e in events] == TEXT_ORDER
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert all(next(iter(e)) == "type" for e in events)  # type first, as the API sends it
    created, completed = events[0]["response"], events[-1]["response"]
    assert (created["status"], created["output"], created["usage"]) == ("in_progress", [], None)
    assert completed == responses_api.final_response(spec())
    assert completed["output"][0]["content"][0]["text"] == "Hi there"
    assert completed["usage"] == {
        "input_tokens": 3,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": 2,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": 5,
    }
    final = feed_sdk(events)._completed_response
    assert final is not None
    assert final.output_text == "Hi there"


def test_reasoning_tokens_count_in_the_output_tokens() -> None:
    usage = responses_api.final_response(spec(reasoning_tokens=40))["usage"]
    assert usage["output_tokens_details"] == {"reasoning_tokens": 40}
    assert usage["output_tokens"] == 42
    assert usage["total_tokens"] == 45


def test_tool_call_stream() -> None:
    events = responses_api.stream_events(spec((), (WEATHER,)), ending="done", after_chunks=None)
    types = [e["type"] for e in events]
    deltas = [e for e in events if e["type"] == "response.function_call_arguments.delta"]
    assert types[2] == "response.output_item.added"
    assert events[2]["item"] == {
        "type": "function_call",
        "id": "fc_golden_0",
        "call_id": "call_1",
        "name": "get_weather",
        "arguments": "",
        "status": "in_progress",
    }
    assert len(deltas) >= 2
    assert "".join(d["delta"] for d in deltas) == WEATHER.arguments
    done = next(e for e in events if e["type"] == "response.function_call_arguments.done")
    assert (done["name"], done["arguments"]) == ("get_weather", WEATHER.arguments)
    assert "response.output_text.delta" not in types  # no text scripted: no message item
    final = feed_sdk(events)._completed_response
    assert final is not None
    (call,) = final.output
    assert call.type == "function_call"
    assert (call.call_id, call.name, call.arguments) == ("call_1", "get_weather", WEATHER.arguments)


@pytest.mark.parametrize("arguments", ["", "x", "ab", '{"city":"Paris"}', "é" * 40])
def test_arguments_split_into_at_least_two_pieces(arguments: str) -> None:
    pieces = split_arguments(arguments)
    assert len(pieces) >= 2
    assert "".join(pieces) == arguments


def test_error_event_shapes() -> None:
    nested = responses_api.stream_events(spec(), ending="error_event", after_chunks=1)
    flat = responses_api.stream_events(
        spec(), ending="error_event", after_chunks=1, error={"code": "x"}, error_shape="flat"
    )
    message = responses_api.DEFAULT_ERROR_MESSAGE
    assert json.dumps(nested[-1]) == json.dumps(
        {
            "type": "error",
            "sequence_number": 5,
            "error": {
                "type": "server_error",
                "code": "server_error",
                "message": message,
                "param": None,
            },
        }
    )
    assert json.dumps(flat[-1]) == json.dumps(
        {"type": "error", "code": "x", "message": message, "param": None, "sequence_number": 5}
    )
    assert [e["type"] for e in nested[:-1]] == TEXT_ORDER[:5]


def test_failed_keeps_the_items_as_far_as_they_got() -> None:
    events = responses_api.stream_events(
        spec(("a", "b", "c")), ending="failed", after_chunks=2, error={"code": "boom"}
    )
    last = events[-1]
    assert [e["type"] for e in events[:-1]] == TEXT_ORDER[:6]
    assert last["type"] == "response.failed"
    response = last["response"]
    assert response["status"] == "failed"
    assert response["error"] == {"code": "boom", "message": responses_api.DEFAULT_ERROR_MESSAGE}
    assert response["output"][0]["content"][0]["text"] == "ab"
    assert response["output"][0]["status"] == "in_progress"


def test_incomplete_closes_the_open_item_as_incomplete() -> None:
    events = responses_api.stream_events(
        spec(("a", "b", "c"), (WEATHER,)), ending="incomplete", after_chunks=2
    )
    types = [e["type"] for e in events]
    assert types[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.incomplete",
    ]
    assert "response.function_call_arguments.delta" not in types  # never reached
    response = events[-1]["response"]
    assert response["status"] == "incomplete"
    assert response["incomplete_details"] == {"reason": "max_output_tokens"}
    assert response["usage"]["output_tokens"] == 2
    (message,) = response["output"]
    assert (message["status"], message["content"][0]["text"]) == ("incomplete", "ab")
    feed_sdk(events)


def test_incomplete_inside_tool_arguments() -> None:
    events = responses_api.stream_events(spec((), (WEATHER,)), ending="incomplete", after_chunks=1)
    done = next(e for e in events if e["type"] == "response.function_call_arguments.done")
    assert done["arguments"] == split_arguments(WEATHER.arguments)[0]
    (call,) = events[-1]["response"]["output"]
    assert call["status"] == "incomplete"
    feed_sdk(events)


calls = st.builds(
    FunctionCall,
    call_id=st.from_regex(r"call_[a-z0-9]{1,8}", fullmatch=True),
    name=st.from_regex(r"[a-z_]{1,12}", fullmatch=True),
    arguments=st.text(max_size=30),
)


@given(
    chunks=st.lists(st.text(max_size=12), max_size=6).map(tuple),
    tool_calls=st.lists(calls, max_size=3, unique_by=lambda c: c.call_id).map(tuple),
    ending=st.sampled_from(ENDINGS),
    after_chunks=st.none() | st.integers(min_value=0, max_value=12),
)
def test_every_ending_numbers_from_zero_and_satisfies_the_sdk(
    chunks: tuple[str, ...],
    tool_calls: tuple[FunctionCall, ...],
    ending: str,
    after_chunks: int | None,
) -> None:
    the_spec = spec(chunks, tool_calls)
    events = responses_api.stream_events(the_spec, ending=ending, after_chunks=after_chunks)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert events[0]["type"] == "response.created"
    expected_last = {
        "error_event": "error",
        "failed": "response.failed",
        "incomplete": "response.incomplete",
    }.get(ending, "response.completed")
    assert events[-1]["type"] == expected_last
    if ending == "error_event":
        events = events[:-1]  # the SDK raises on it; what came before must still be valid
    state = feed_sdk(events)
    if expected_last == "response.completed":
        final = state._completed_response
        assert final is not None
        assert final.output_text == "".join(chunks)
        got = [(o.call_id, o.arguments) for o in final.output if o.type == "function_call"]
        assert got == [(c.call_id, c.arguments) for c in tool_calls]
    # The plan frames them one event per write: `event:` equal to the JSON's type, no [DONE].
    script = Script(ending=ending, after_chunks=after_chunks)  # type: ignore[arg-type]
    data = stream_bytes(plan_named_stream(script, events)).replace(b"\r\n", b"\n")
    assert b"[DONE]" not in data
    for block in data.split(b"\n\n"):
        if block.startswith(b"event: "):
            name, payload = block.split(b"\n", 1)
            if payload != b"data: {not json":
                assert json.loads(payload.removeprefix(b"data: "))["type"] == name[7:].decode()


# --- framing and transport endings ------------------------------------------------------------


def framed(ending: str, after_chunks: int | None = None, **fields: Any) -> list[Any]:
    script = parse_script(
        {"ending": ending, **fields}
        if after_chunks is None
        else {"ending": ending, "after_chunks": after_chunks, **fields}
    )
    events = responses_api.stream_events(
        spec(("a", "b", "c")), ending=script.ending, after_chunks=script.after_chunks
    )
    return plan_named_stream(script, events)


def test_each_event_is_one_write_named_by_its_type() -> None:
    steps = framed("done")
    assert all(isinstance(step, Write) for step in steps)
    first = cast(Write, steps[0]).data
    assert first.startswith(b'event: response.created\ndata: {"type":"response.created",')
    assert first.endswith(b"}\n\n")
    assert stream_bytes(steps).count(b"\n\n") == len(steps) == 11  # 2 + 2 + 3 deltas + 3 + 1


@pytest.mark.parametrize(("ending", "last"), [("reset", Reset()), ("stall", Stall())])
def test_transport_endings_cut_after_n_deltas(ending: str, last: object) -> None:
    steps = framed(ending, after_chunks=1)
    assert steps[-1] == last
    data = stream_bytes(steps)
    assert data.count(b"event: response.output_text.delta\n") == 1
    assert b"response.completed" not in data


def test_close_and_malformed_json() -> None:
    closed = stream_bytes(framed("close", after_chunks=2))
    assert closed.endswith(b'"delta":"b","logprobs":[]}\n\n')
    malformed = stream_bytes(framed("malformed_json", after_chunks=0))
    assert malformed.endswith(b"event: response.output_text.delta\ndata: {not json\n\n")
    assert malformed.count(b"event: ") == 3


def test_crlf_ping_split_and_delays() -> None:
    plain = stream_bytes(framed("done"))
    crlf = stream_bytes(framed("crlf"))
    assert crlf.replace(b"\r\n", b"\n") == plain
    ping = stream_bytes(framed("ping"))
    assert ping.count(b": ping\n\n") == 4  # before each of 3 deltas and before the last event
    assert ping.replace(b": ping\n\n", b"") == plain
    split = framed("split_event")
    pause = next(i for i, step in enumerate(split) if isinstance(step, Pause))
    assert cast(Write, split[pause - 1]).data.startswith(b"event: response.output_text.delta")
    assert stream_bytes(split) == plain
    slow = framed("done", delay_per_chunk=0.1)
    assert [type(s).__name__ for s in slow].count("Pause") == 3
