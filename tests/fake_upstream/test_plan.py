"""Response plans as pure functions: golden bytes and the shape of every ending."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from fake_upstream import wire
from fake_upstream.plan import (
    Pause,
    Reset,
    Stall,
    Step,
    Write,
    plan_body,
    plan_stream,
    stream_bytes,
)
from fake_upstream.scripts import Script, parse_script

# The exact bytes OpenAI would send for a two-chunk reply with include_usage (WIRE.md).
GOLDEN_STREAM = (
    b'data: {"id":"chatcmpl-golden","object":"chat.completion.chunk","created":1700000000,'
    b'"model":"gpt-4o-mini","system_fingerprint":"fp_fake_upstream","choices":[{"index":0,'
    b'"delta":{"role":"assistant","content":"","refusal":null},"logprobs":null,'
    b'"finish_reason":null}],"usage":null}\n\n'
    b'data: {"id":"chatcmpl-golden","object":"chat.completion.chunk","created":1700000000,'
    b'"model":"gpt-4o-mini","system_fingerprint":"fp_fake_upstream","choices":[{"index":0,'
    b'"delta":{"content":"Hi"},"logprobs":null,"finish_reason":null}],"usage":null}\n\n'
    b'data: {"id":"chatcmpl-golden","object":"chat.completion.chunk","created":1700000000,'
    b'"model":"gpt-4o-mini","system_fingerprint":"fp_fake_upstream","choices":[{"index":0,'
    b'"delta":{"content":" th\xc3\xa9re"},"logprobs":null,"finish_reason":null}],"usage":null}\n\n'
    b'data: {"id":"chatcmpl-golden","object":"chat.completion.chunk","created":1700000000,'
    b'"model":"gpt-4o-mini","system_fingerprint":"fp_fake_upstream","choices":[{"index":0,'
    b'"delta":{},"logprobs":null,"finish_reason":"stop"}],"usage":null}\n\n'
    b'data: {"id":"chatcmpl-golden","object":"chat.completion.chunk","created":1700000000,'
    b'"model":"gpt-4o-mini","system_fingerprint":"fp_fake_upstream","choices":[],'
    b'"usage":{"prompt_tokens":1,"completion_tokens":2,"total_tokens":3}}\n\n'
    b"data: [DONE]\n\n"
)
GOLDEN_SCRIPT: dict[str, Any] = {
    "id": "chatcmpl-golden",
    "created": 1700000000,
    "chunks": ["Hi", " th\u00e9re"],
}
GOLDEN_REQUEST: dict[str, Any] = {
    "model": "gpt-4o-mini",
    "messages": [{"role": "user", "content": "Hey"}],
    "stream": True,
    "stream_options": {"include_usage": True},
}


def chat_plan(script: Script, chunks: list[str], include_usage: bool = False) -> list[Step]:
    head, tail = wire.chat_chunk_events(
        id="chatcmpl-golden",
        created=1700000000,
        model="gpt-4o-mini",
        chunks=chunks,
        finish_reason="stop",
        include_usage=include_usage,
        usage=wire.usage(1, len(chunks)),
    )
    return plan_stream(script, preamble=head[:1], content=head[1:], tail=tail)


def events(data: bytes) -> list[str]:
    """The `data:` payloads of an LF-framed stream, comments skipped."""
    out = []
    for block in data.decode().split("\n\n"):
        if block.startswith("data: "):
            out.append(block.removeprefix("data: "))
    return out


def test_golden_stream_plan() -> None:
    steps = chat_plan(parse_script(GOLDEN_SCRIPT), ["Hi", " th\u00e9re"], include_usage=True)
    assert stream_bytes(steps) == GOLDEN_STREAM
    # One write per event, so the journal's chunk records are events.
    assert all(isinstance(step, Write) for step in steps)
    assert len(steps) == 6


@settings(max_examples=50, deadline=None)
@given(chunks=st.lists(st.text(max_size=20), max_size=8), usage=st.booleans())
def test_any_chunks_reassemble_exactly(chunks: list[str], usage: bool) -> None:
    payloads = events(stream_bytes(chat_plan(Script(), chunks, usage)))
    assert payloads[-1] == "[DONE]"
    decoded = [json.loads(p) for p in payloads[:-1]]
    assert len({(d["id"], d["created"]) for d in decoded}) == 1
    assert decoded[0]["choices"][0]["delta"] == {
        "role": "assistant",
        "content": "",
        "refusal": None,
    }
    content = [d["choices"][0]["delta"].get("content", "") for d in decoded if d["choices"]]
    assert "".join(content) == "".join(chunks)
    assert ("usage" in decoded[-1] and decoded[-1]["choices"] == []) is usage


def test_interrupting_endings_cut_after_n_chunks() -> None:
    chunks = ["a", "b", "c"]
    for ending, last in [("reset", Reset()), ("stall", Stall())]:
        steps = chat_plan(Script(ending=ending, after_chunks=1), chunks)  # type: ignore[arg-type]
        assert steps[-1] == last
        assert len([s for s in steps if isinstance(s, Write)]) == 2  # role + "a"
    closed = stream_bytes(chat_plan(Script(ending="close"), chunks))
    assert b"[DONE]" not in closed
    assert b'"finish_reason":"stop"' not in closed
    assert closed.count(b"data: ") == 4
    errored = events(stream_bytes(chat_plan(Script(ending="error_event", after_chunks=0), chunks)))
    assert json.loads(errored[-1])["error"]["type"] == "server_error"
    assert len(errored) == 2


def test_framing_variants() -> None:
    chunks = ["a", "b"]
    crlf = stream_bytes(chat_plan(Script(ending="crlf"), chunks))
    assert crlf.endswith(b"data: [DONE]\r\n\r\n")
    assert b"\n\n" not in crlf.replace(b"\r\n\r\n", b"")
    assert crlf.replace(b"\r\n", b"\n") == stream_bytes(chat_plan(Script(), chunks))

    ping = stream_bytes(chat_plan(Script(ending="ping"), chunks))
    assert ping.count(b": ping\n\n") == 3
    assert ping.replace(b": ping\n\n", b"") == stream_bytes(chat_plan(Script(), chunks))

    split = chat_plan(Script(ending="split_event"), chunks)
    assert isinstance(split[2], Pause)
    assert not cast_write(split[1]).data.endswith(b"\n\n")
    assert stream_bytes(split) == stream_bytes(chat_plan(Script(), chunks))

    malformed = stream_bytes(chat_plan(Script(ending="malformed_json", after_chunks=1), chunks))
    assert malformed.endswith(b"data: {not json\n\ndata: [DONE]\n\n")


def cast_write(step: Step) -> Write:
    assert isinstance(step, Write)
    return step


def test_delay_per_chunk_precedes_each_content_event() -> None:
    steps = chat_plan(Script(delay_per_chunk=0.25), ["a", "b"])
    kinds = [type(step).__name__ for step in steps]
    assert kinds == ["Write", "Pause", "Write", "Pause", "Write", "Write", "Write"]


def test_non_stream_endings_send_half_the_body() -> None:
    body = b"0123456789"
    assert plan_body(body, Script()) == [Write(body)]
    assert plan_body(body, Script(ending="reset")) == [Write(b"01234"), Reset()]
    assert plan_body(body, Script(ending="ping")) == [Write(body)]
