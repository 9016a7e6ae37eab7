"""Token usage read from answers as they pass (DESIGN §11, issue 13): for any body the upstream
may send, split at any chunk boundary, the taps report exactly the usage the body reports.

The expected usage always comes from `json.loads` of the whole body (or of each SSE event's
data) and `reference_usage` below, written from the OpenAI API reference, never from the taps.
"""

from __future__ import annotations

import itertools
import json
import re
import zlib
from collections.abc import Sequence
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from llmproxy.access_log import (
    CLIENT_DISCONNECT,
    COMPLETE,
    NOT_REPORTED,
    PROXY_ERROR,
    UPSTREAM_ERROR,
    USAGE_KNOWN,
    USAGE_UNKNOWN,
    RequestRecord,
    format_json,
    format_text,
)
from llmproxy.usage import (
    JsonUsageTap,
    SseUsageTap,
    Usage,
    UsageTap,
    record_usage,
    tap_for,
    usage_due,
    usage_from_object,
    usage_of_payload,
)

Tokens = tuple[str | None, int, int, int, int]
Json = dict[str, Any]

# ---------------------------------------------------------------------------------------------
# The reference: what a body reports, read with json.loads and the API reference's field names.


def _detail(usage: Json, details: str, name: str) -> int:
    value = usage.get(details)
    return int(value.get(name, 0)) if isinstance(value, dict) else 0


def reference_usage(usage: Json, model: str | None) -> Tokens:
    """(model, input, output, cached input, reasoning) of one `usage` object."""
    if "prompt_tokens" in usage:  # chat, completions, embeddings
        return (
            model,
            usage["prompt_tokens"],
            usage.get("completion_tokens", 0),
            _detail(usage, "prompt_tokens_details", "cached_tokens"),
            _detail(usage, "completion_tokens_details", "reasoning_tokens"),
        )
    return (  # the Responses API
        model,
        usage["input_tokens"],
        usage["output_tokens"],
        _detail(usage, "input_tokens_details", "cached_tokens"),
        _detail(usage, "output_tokens_details", "reasoning_tokens"),
    )


def reference_of_body(body: bytes) -> Tokens | None:
    document = json.loads(body)
    usage = document.get("usage")
    return reference_usage(usage, document.get("model")) if isinstance(usage, dict) else None


def sse_payloads(stream: bytes) -> list[Any]:
    """The JSON of every event's data (WHATWG HTML §9.2.6: fields joined by LF, one leading
    space dropped), `[DONE]` and comments left out."""
    payloads = []
    for event in re.split(rb"\r\n\r\n|\n\n", stream):
        lines = [line for line in re.split(rb"\r\n|\n", event) if line.startswith(b"data:")]
        data = b"\n".join(line[5:].removeprefix(b" ") for line in lines)
        if data and data != b"[DONE]":
            payloads.append(json.loads(data))
    return payloads


def reference_of_stream(stream: bytes) -> Tokens | None:
    """The usage of the last event that reports one: a chat/completions usage chunk, or the
    `response` of a Responses stream's terminal event."""
    found = None
    for payload in sse_payloads(stream):
        if payload.get("type") in ("response.completed", "response.incomplete", "response.failed"):
            response = payload["response"]
            if isinstance(response.get("usage"), dict):
                found = reference_usage(response["usage"], response["model"])
        elif isinstance(payload.get("usage"), dict):
            found = reference_usage(payload["usage"], payload.get("model"))
    return found


def fed(tap: UsageTap, chunks: Sequence[bytes]) -> Tokens | None:
    for chunk in chunks:
        tap.feed(chunk)
    usage = tap.usage()
    return None if usage is None else tuple(usage)  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------
# Strategies

COUNTS = st.integers(min_value=0, max_value=2_000_000)
# Content that looks like what the taps search for: JSON escapes it, so it must not be found.
TRICKY_TEXT = [
    "usage",
    '"usage": {"prompt_tokens": 999999, "completion_tokens": 999999}',
    '{"usage":{"input_tokens":7,"output_tokens":7}}',
    '"model": "not-the-model"',
    "data: {}\n\n",
    "\r\n\r\n",
    "naïve café, 日本語, 🙂",
    "\\",
    '\\"',
]
CONTENT = st.one_of(st.sampled_from(TRICKY_TEXT), st.text(max_size=60))
# Model names: ASCII, with the quote JSON escapes (`gpt-"x` is sent as `"gpt-\"x"`).
MODELS = st.one_of(
    st.sampled_from(["gpt-4o-mini", "o3-2025-04-16", "ft:gpt-4o:org:x:1", 'gpt-"quoted"', 'x"']),
    st.text(
        st.characters(min_codepoint=0x20, max_codepoint=0x7E, exclude_characters="\\"),
        min_size=1,
        max_size=30,
    ),
)
# How the body is laid out: compact (as streams are), spaced, and indented by two spaces (as
# OpenAI's real non-streamed bodies are); ASCII-escaped or not.
LAYOUTS: st.SearchStrategy[dict[str, Any]] = st.sampled_from(
    [
        {"separators": (",", ":")},
        {"separators": (", ", ": ")},
        {"indent": 2},
        {"indent": 2, "ensure_ascii": False},
        {"separators": (",", ":"), "ensure_ascii": False},
    ]
)


@st.composite
def details(draw: st.DrawFn, name: str, extra: Json) -> Json | None:
    """A details object: absent, null, without the count, or with it (and other counts)."""
    shape = draw(st.sampled_from(["absent", "null", "without", "with"]))
    if shape == "absent":
        return None
    if shape == "null":
        return {"null": True}
    found = dict(extra)
    if shape == "with":
        found[name] = draw(COUNTS)
    return found


def _put(usage: Json, key: str, value: Json | None) -> None:
    if value is not None:
        usage[key] = None if value.get("null") else value


@st.composite
def chat_usage(draw: st.DrawFn) -> Json:
    prompt, completion = draw(COUNTS), draw(COUNTS)
    usage: Json = {"prompt_tokens": prompt, "completion_tokens": completion}
    usage["total_tokens"] = prompt + completion
    _put(usage, "prompt_tokens_details", draw(details("cached_tokens", {"audio_tokens": 0})))
    _put(
        usage,
        "completion_tokens_details",
        draw(details("reasoning_tokens", {"audio_tokens": 0, "accepted_prediction_tokens": 0})),
    )
    return usage


@st.composite
def responses_usage(draw: st.DrawFn) -> Json:
    usage: Json = {"input_tokens": draw(COUNTS)}
    _put(usage, "input_tokens_details", draw(details("cached_tokens", {})))
    usage["output_tokens"] = draw(COUNTS)
    _put(usage, "output_tokens_details", draw(details("reasoning_tokens", {})))
    usage["total_tokens"] = usage["input_tokens"] + usage["output_tokens"]
    return usage


def chat_completion(model: str, content: str, usage: Json | None) -> Json:
    body: Json = {
        "id": "chatcmpl-abc",
        "object": "chat.completion",
        "created": 1_700_000_000,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content, "refusal": None},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
    }
    if usage is not None:
        body["usage"] = usage
    # OpenAI sends these after the usage now: the usage is not always the body's last field.
    body["service_tier"] = "default"
    body["system_fingerprint"] = "fp_0123"
    return body


def text_completion(model: str, content: str, usage: Json | None) -> Json:
    body: Json = {
        "id": "cmpl-abc",
        "object": "text_completion",
        "created": 1_700_000_000,
        "model": model,
        "choices": [{"text": content, "index": 0, "logprobs": None, "finish_reason": "stop"}],
    }
    if usage is not None:
        body["usage"] = usage
    return body


def embeddings(model: str, inputs: int, dimensions: int, usage: Json | None) -> Json:
    """An embeddings list: the model is named after the data, at the end of the body."""
    data = [
        {
            "object": "embedding",
            "index": i,
            "embedding": [0.0123456789 * (j - i) for j in range(dimensions)],
        }
        for i in range(inputs)
    ]
    body: Json = {"object": "list", "data": data, "model": model}
    if usage is not None:
        body["usage"] = {
            "prompt_tokens": usage["prompt_tokens"],
            "total_tokens": usage["prompt_tokens"],
        }
    return body


def response_object(
    model: str,
    content: str,
    usage: Json | None,
    status: str = "completed",
    instructions: Any = None,
) -> Json:
    """A Responses `response` in the real API's key order (usage near the end, not last)."""
    return {
        "id": "resp_abc",
        "object": "response",
        "created_at": 1_700_000_000,
        "status": status,
        "error": None,
        "incomplete_details": None,
        "instructions": instructions,
        "max_output_tokens": None,
        "model": model,
        "output": [
            {
                "type": "message",
                "id": "msg_abc",
                "status": status,
                "role": "assistant",
                "content": [{"type": "output_text", "text": content, "annotations": []}],
            }
        ],
        "parallel_tool_calls": True,
        "tools": [],
        "usage": usage,
        "user": None,
        "metadata": {"note": "usage", "usage": "x"},
    }


@st.composite
def json_bodies(draw: st.DrawFn) -> bytes:
    """A non-streamed answer of one of the four endpoints that report usage."""
    kind = draw(st.sampled_from(["chat", "completions", "embeddings", "responses"]))
    model, content = draw(MODELS), draw(CONTENT)
    if kind == "responses":
        body = response_object(model, content, draw(responses_usage()))
    elif kind == "embeddings":
        body = embeddings(
            model, draw(st.integers(1, 3)), draw(st.integers(1, 8)), draw(chat_usage())
        )
    elif kind == "chat":
        body = chat_completion(model, content, draw(chat_usage()))
    else:
        body = text_completion(model, content, draw(chat_usage()))
    return json.dumps(body, **draw(LAYOUTS)).encode()


@st.composite
def split(draw: st.DrawFn, data: bytes) -> list[bytes]:
    """`data` cut at arbitrary places: anywhere at random, or into pieces of a few bytes."""
    if len(data) > 1 and draw(st.booleans()):
        size = draw(st.integers(1, 7))
        return [data[i : i + size] for i in range(0, len(data), size)]
    cuts = sorted(set(draw(st.lists(st.integers(1, max(1, len(data) - 1)), max_size=12))))
    edges = [0, *cuts, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(edges) if b > a]


# ---------------------------------------------------------------------------------------------
# Non-streamed JSON


@given(st.data())
def test_a_json_body_split_anywhere_reports_exactly_its_usage(data: st.DataObject) -> None:
    body = data.draw(json_bodies())
    expected = reference_of_body(body)
    assert expected is not None
    assert fed(JsonUsageTap(), data.draw(split(body))) == expected


@given(st.data())
def test_a_json_body_without_usage_reports_none(data: st.DataObject) -> None:
    model, content = data.draw(MODELS), data.draw(CONTENT)
    body = data.draw(
        st.sampled_from(
            [
                chat_completion(model, content, None),
                text_completion(model, content, None),
                embeddings(model, 1, 4, None),
                response_object(model, content, None),  # `"usage": null`
                {"error": {"message": content, "type": "invalid_request_error", "code": None}},
            ]
        )
    )
    encoded = json.dumps(body, **data.draw(LAYOUTS)).encode()
    assert reference_of_body(encoded) is None
    assert fed(JsonUsageTap(), data.draw(split(encoded))) is None


@pytest.mark.parametrize(
    "model",
    [
        "org/model-name",  # sent as `org\/model-name` by encoders that escape solidus (PHP, Java)
        "caf\u00e9-model",  # `caf\u00e9-model` by any json.dumps(ensure_ascii=True)
        "back\\slash",  # `back\\slash`
        "tab\tmodel",  # `tab\tmodel`
    ],
)
def test_the_model_name_is_json_unescaped(model: str) -> None:
    # The model is a JSON string like any other: what the log and the metric label show must
    # be the name the body means, not its escaped spelling.
    escaped = json.dumps(model).replace("/", "\\/")
    for layout in (
        '{"id":"x","model":%s,"usage":{"prompt_tokens":3,"completion_tokens":4}}',
        '{\n  "id": "x",\n  "model": %s,\n  "usage": {\n    "prompt_tokens": 3,\n'
        '    "completion_tokens": 4\n  }\n}',
    ):
        body = (layout % escaped).encode()
        assert json.loads(body)["model"] == model
        assert fed(JsonUsageTap(), [body]) == (model, 3, 4, 0, 0)


@pytest.mark.parametrize("chunk_size", [1, 1000, 4096, 16 * 1024, 16 * 1024 + 1, 65536, 1 << 20])
def test_embeddings_over_16_kib_with_the_model_last_report_usage_and_model(
    chunk_size: int,
) -> None:
    body = json.dumps(
        embeddings("text-embedding-3-large", 3, 1536, {"prompt_tokens": 4321}), indent=2
    ).encode()
    assert len(body) > 4 * 16 * 1024
    chunks = [body[i : i + chunk_size] for i in range(0, len(body), chunk_size)]
    assert fed(JsonUsageTap(), chunks) == ("text-embedding-3-large", 4321, 0, 0, 0)


@given(st.data())
def test_a_large_body_split_anywhere_reports_its_usage_and_model(data: st.DataObject) -> None:
    kind = data.draw(st.sampled_from(["embeddings", "chat", "responses"]))
    model = data.draw(MODELS)
    long_text = data.draw(st.sampled_from(["x", "é", "usage ", "日本"])) * data.draw(
        st.integers(17 * 1024, 40 * 1024)
    )
    if kind == "embeddings":
        body = embeddings(model, 2, data.draw(st.integers(800, 1600)), data.draw(chat_usage()))
    elif kind == "chat":
        body = chat_completion(model, long_text, data.draw(chat_usage()))
    else:
        body = response_object(model, long_text, data.draw(responses_usage()))
    encoded = json.dumps(body, **data.draw(LAYOUTS)).encode()
    assert len(encoded) > 16 * 1024
    expected = reference_of_body(encoded)
    assert fed(JsonUsageTap(), data.draw(split(encoded))) == expected


def test_a_responses_body_with_long_instructions_and_long_output_reports_its_model() -> None:
    # The Responses API echoes `instructions` before `model`, and the output follows it: with a
    # long system prompt and a long answer the model is more than 16 KiB from either end.
    body = json.dumps(
        response_object(
            "gpt-4.1-2025-04-14",
            "answer " * 4000,
            {"input_tokens": 9000, "output_tokens": 4000},
            instructions="You are a careful assistant. " * 1000,
        ),
        indent=2,
    ).encode()
    assert fed(JsonUsageTap(), [body]) == ("gpt-4.1-2025-04-14", 9000, 4000, 0, 0)


# ---------------------------------------------------------------------------------------------
# Streams (SSE)

FRAMINGS = st.sampled_from(
    [
        (b"\n", b"data: "),
        (b"\n", b"data:"),
        (b"\r\n", b"data: "),
        (b"\r\n", b"data:"),
    ]
)


def sse(events: Sequence[tuple[str | None, Any]], newline: bytes, prefix: bytes) -> bytes:
    """Events as an SSE body: `event:` line if named, the data (JSON, or a literal), a blank."""
    out = []
    for name, payload in events:
        if isinstance(payload, str) and payload.startswith(":"):  # a comment line
            out.append(payload.encode() + newline + newline)
            continue
        data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
        head = b"event: " + name.encode() + newline if name else b""
        out.append(head + prefix + data.encode() + newline + newline)
    return b"".join(out)


@st.composite
def chat_streams(draw: st.DrawFn, include_usage: bool) -> bytes:
    """A streamed chat or completions answer; with `include_usage`, `"usage": null` on each
    chunk and the usage chunk before `[DONE]` (as OpenAI sends them)."""
    chat = draw(st.booleans())
    model = draw(MODELS)
    pieces = draw(st.lists(CONTENT, max_size=5))
    base: Json = {
        "id": "chatcmpl-abc" if chat else "cmpl-abc",
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": 1_700_000_000,
        "model": model,
    }
    if chat:
        base["system_fingerprint"] = "fp_0123"

    def chunk(choices: list[Json]) -> Json:
        payload = {**base, "choices": choices}
        if include_usage:
            payload["usage"] = None
        return payload

    def choice(text: str | None, finish: str | None) -> Json:
        if chat:
            delta = {} if text is None else {"content": text}
            return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return {"text": text or "", "index": 0, "logprobs": None, "finish_reason": finish}

    events: list[tuple[str | None, Any]] = []
    if chat:
        events.append((None, chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}}])))
    events += [(None, chunk([choice(piece, None)])) for piece in pieces]
    events.append((None, chunk([choice(None, "stop")])))
    if include_usage:
        events.append((None, {**base, "choices": [], "usage": draw(chat_usage())}))
    if draw(st.booleans()):
        events.insert(1, (None, ": keep-alive"))  # a comment is not data
    events.append((None, "[DONE]"))
    newline, prefix = draw(FRAMINGS)
    return sse(events, newline, prefix)


RESPONSES_ENDINGS = ["response.completed", "response.incomplete", "response.failed"]


@st.composite
def responses_streams(draw: st.DrawFn, ending: str | None) -> bytes:
    """A Responses stream of named events; `ending` None: cut before its terminal event."""
    model, pieces = draw(MODELS), draw(st.lists(CONTENT, max_size=5))
    status = {"response.incomplete": "incomplete", "response.failed": "failed"}.get(
        ending or "", "completed"
    )
    opening = response_object(model, "", None, status="in_progress")
    opening["output"] = []
    events: list[tuple[str | None, Any]] = [
        (
            "response.created",
            {"type": "response.created", "sequence_number": 0, "response": opening},
        ),
        (
            "response.in_progress",
            {"type": "response.in_progress", "sequence_number": 1, "response": opening},
        ),
    ]
    for number, piece in enumerate(pieces, start=2):
        delta: Json = {
            "type": "response.output_text.delta",
            "sequence_number": number,
            "item_id": "msg_abc",
            "output_index": 0,
            "content_index": 0,
            "delta": piece,
            "logprobs": [],
        }
        events.append(("response.output_text.delta", delta))
    if ending is not None:
        final = response_object(model, "".join(pieces), draw(responses_usage()), status=status)
        events.append((ending, {"type": ending, "sequence_number": len(events), "response": final}))
    newline, prefix = draw(FRAMINGS)
    return sse(events, newline, prefix)


@given(st.data())
def test_a_chat_stream_with_include_usage_split_anywhere_reports_its_usage_chunk(
    data: st.DataObject,
) -> None:
    stream = data.draw(chat_streams(include_usage=True))
    expected = reference_of_stream(stream)
    assert expected is not None
    assert fed(SseUsageTap(), data.draw(split(stream))) == expected


@given(st.data(), st.sampled_from(RESPONSES_ENDINGS))
def test_a_responses_stream_split_anywhere_reports_the_usage_of_its_ending(
    data: st.DataObject, ending: str
) -> None:
    stream = data.draw(responses_streams(ending))
    expected = reference_of_stream(stream)
    assert expected is not None
    assert fed(SseUsageTap(), data.draw(split(stream))) == expected


@given(st.data())
def test_a_stream_that_reports_no_usage_gives_none(data: st.DataObject) -> None:
    stream = data.draw(st.one_of(chat_streams(include_usage=False), responses_streams(None)))
    assert reference_of_stream(stream) is None
    assert fed(SseUsageTap(), data.draw(split(stream))) is None


def test_a_long_response_completed_event_is_read_whole() -> None:
    model = "gpt-4.1"
    final = response_object(model, "word " * 50_000, {"input_tokens": 12, "output_tokens": 50_000})
    stream = sse(
        [
            (
                "response.completed",
                {"type": "response.completed", "sequence_number": 9, "response": final},
            )
        ],
        b"\n",
        b"data: ",
    )
    chunks = [stream[i : i + 4096] for i in range(0, len(stream), 4096)]
    assert fed(SseUsageTap(), chunks) == (model, 12, 50_000, 0, 0)


def test_a_data_field_over_several_lines_is_joined() -> None:
    # WHATWG HTML §9.2.6: each `data:` line of one event is a line of its data.
    stream = (
        b'data: {"id":"c","model":"m","choices":[],\n'
        b'data: "usage":{"prompt_tokens":5,"completion_tokens":6}}\n\n'
        b"data: [DONE]\n\n"
    )
    assert fed(SseUsageTap(), [stream]) == ("m", 5, 6, 0, 0)


def test_a_stream_framed_with_cr_alone_reports_its_usage() -> None:
    # WHATWG HTML §9.2.6: a line ends with CRLF, LF or CR alone; the forwarder itself takes
    # `\r\r` for the end of an event (its keep-alive comments go there).
    stream = (
        b'data: {"id":"c","model":"m","choices":[],"usage":null}\r\r'
        b'data: {"id":"c","model":"m","choices":[],'
        b'"usage":{"prompt_tokens":5,"completion_tokens":6}}\r\r'
        b"data: [DONE]\r\r"
    )
    assert fed(SseUsageTap(), [stream]) == ("m", 5, 6, 0, 0)


# ---------------------------------------------------------------------------------------------
# Compressed answers: OpenAI compresses for clients that accept it (the SDK sends
# `Accept-Encoding: gzip, deflate`); the proxy passes the bytes on compressed, and the tap reads
# them inflated.


def compress(data: bytes, coding: str, events: Sequence[bytes] = ()) -> bytes:
    """`data` as a server sends it with `Content-Encoding: coding`: gzip, zlib-wrapped deflate
    (RFC 9110 §8.4.1.2), or the raw deflate some servers send as "deflate". With `events`, a
    stream compressed as it goes: a sync flush after each event, so each one can be read."""
    wbits = {"gzip": 31, "deflate": 15, "raw-deflate": -15}[coding]
    compressor = zlib.compressobj(6, zlib.DEFLATED, wbits)
    if not events:
        return compressor.compress(data) + compressor.flush()
    out = b"".join(compressor.compress(e) + compressor.flush(zlib.Z_SYNC_FLUSH) for e in events)
    return out + compressor.flush()


CODINGS = st.sampled_from(["gzip", "deflate"])
HEADER_OF = {"gzip": b"gzip", "deflate": b"deflate", "raw-deflate": b"deflate"}


@given(st.data(), CODINGS)
def test_a_compressed_json_body_split_anywhere_reports_its_usage(
    data: st.DataObject, coding: str
) -> None:
    body = data.draw(json_bodies())
    tap = tap_for(True, 200, b"application/json", HEADER_OF[coding])
    assert tap is not None
    assert fed(tap, data.draw(split(compress(body, coding)))) == reference_of_body(body)


@given(st.data(), CODINGS, st.sampled_from([*RESPONSES_ENDINGS, "chat"]))
def test_a_compressed_stream_split_anywhere_reports_its_usage(
    data: st.DataObject, coding: str, kind: str
) -> None:
    stream = data.draw(
        chat_streams(include_usage=True) if kind == "chat" else responses_streams(kind)
    )
    events = re.findall(rb".*?(?:\r\n\r\n|\n\n)", stream, re.DOTALL)
    assert b"".join(events) == stream
    tap = tap_for(True, 200, b"text/event-stream; charset=utf-8", HEADER_OF[coding])
    assert tap is not None
    chunks = data.draw(split(compress(stream, coding, events)))
    assert fed(tap, chunks) == reference_of_stream(stream)


@given(st.data())
def test_raw_deflate_sent_as_deflate_split_anywhere_reports_its_usage(data: st.DataObject) -> None:
    # Servers that send raw deflate for "deflate" exist (the tap tries it when zlib's header
    # is not there); what the tap sees first may be a single byte.
    body = data.draw(json_bodies())
    tap = tap_for(True, 200, b"application/json", b"deflate")
    assert tap is not None
    assert fed(tap, data.draw(split(compress(body, "raw-deflate")))) == reference_of_body(body)


@pytest.mark.parametrize("coding", ["gzip", "deflate", "raw-deflate"])
@pytest.mark.parametrize("first", [1, 2, 3])
def test_a_compressed_body_whose_first_chunk_is_tiny_reports_its_usage(
    coding: str, first: int
) -> None:
    body = json.dumps(chat_completion("gpt-4o", "Hi", {"prompt_tokens": 3, "completion_tokens": 4}))
    data = compress(body.encode(), coding)
    tap = tap_for(True, 200, b"application/json", HEADER_OF[coding])
    assert tap is not None
    chunks = [data[:first]] + [data[i : i + 64] for i in range(first, len(data), 64)]
    assert fed(tap, chunks) == ("gpt-4o", 3, 4, 0, 0)


@pytest.mark.parametrize("encoding", [b"gzip", b"GZIP", b"x-gzip", b" deflate ", b"identity"])
def test_the_codings_the_tap_inflates(encoding: bytes) -> None:
    body = json.dumps({"model": "m", "usage": {"prompt_tokens": 1, "completion_tokens": 2}})
    coding = "deflate" if b"deflate" in encoding else "gzip"
    wire = body.encode() if encoding == b"identity" else compress(body.encode(), coding)
    tap = tap_for(True, 200, b"application/json", encoding)
    assert tap is not None
    assert fed(tap, [wire]) == ("m", 1, 2, 0, 0)


@pytest.mark.parametrize(
    "wire",
    [
        b'{"model": "m", "usage": {"prompt_tokens": 1, "completion_tokens": 2}}',  # not gzip
        compress(b'{"model": "m", "usage": {"prompt_tokens": 1}}', "gzip")[:-30],  # cut short
        b"\x1f\x8b\x08\x00" + bytes(range(256)) * 4,  # a gzip header, then garbage
    ],
    ids=["uncompressed", "truncated", "garbage"],
)
def test_a_body_that_is_not_what_its_coding_says_reports_none(wire: bytes) -> None:
    tap = tap_for(True, 200, b"application/json", b"gzip")
    assert tap is not None
    assert fed(tap, [wire[:7], wire[7:]]) is None


# ---------------------------------------------------------------------------------------------
# The usage objects themselves


@given(chat_usage(), MODELS)
def test_a_chat_usage_object_reads_as_the_reference(usage: Json, model: str) -> None:
    assert tuple(usage_from_object(usage, model) or ()) == reference_usage(usage, model)


@given(responses_usage(), MODELS)
def test_a_responses_usage_object_reads_as_the_reference(usage: Json, model: str) -> None:
    assert tuple(usage_from_object(usage, model) or ()) == reference_usage(usage, model)


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (
            {
                "type": "response.completed",
                "response": {"model": "m", "usage": {"input_tokens": 1, "output_tokens": 2}},
            },
            ("m", 1, 2, 0, 0),
        ),
        (
            {
                "type": "response.incomplete",
                "response": {"model": "m", "usage": {"input_tokens": 3, "output_tokens": 4}},
            },
            ("m", 3, 4, 0, 0),
        ),
        (
            {
                "type": "response.failed",
                "response": {"model": "m", "usage": {"input_tokens": 5, "output_tokens": 6}},
            },
            ("m", 5, 6, 0, 0),
        ),
        ({"type": "response.created", "response": {"model": "m", "usage": None}}, None),
        (
            {
                "id": "c",
                "model": "m",
                "choices": [],
                "usage": {"prompt_tokens": 7, "completion_tokens": 8},
            },
            ("m", 7, 8, 0, 0),
        ),
        ({"id": "c", "model": "m", "choices": [], "usage": None}, None),
        ({"error": {"message": "x"}}, None),
        ([1, 2], None),
    ],
)
def test_usage_of_payload(payload: object, expected: Tokens | None) -> None:
    found = usage_of_payload(payload)
    assert (None if found is None else tuple(found)) == expected


# ---------------------------------------------------------------------------------------------
# Choosing a tap


@pytest.mark.parametrize(
    ("method", "path", "due"),
    [
        ("POST", b"/v1/chat/completions", True),
        ("POST", b"/v1/completions", True),
        ("POST", b"/v1/embeddings", True),
        ("POST", b"/v1/responses", True),
        ("GET", b"/v1/chat/completions", False),
        ("PUT", b"/v1/responses", False),
        ("GET", b"/v1/responses/resp_abc", False),  # a stored response: nothing spent now
        ("POST", b"/v1/responses/resp_abc/cancel", False),
        ("POST", b"/v1/models", False),
        ("POST", b"/v1/audio/speech", False),
        ("POST", b"/v1/chat/completions/x", False),
        ("POST", b"/v2/chat/completions", False),
    ],
)
def test_usage_is_due_for_post_to_the_four_endpoints_only(
    method: str, path: bytes, due: bool
) -> None:
    assert usage_due(method, path) is due


@pytest.mark.parametrize(
    ("due", "status", "content_type", "tap"),
    [
        (True, 200, b"application/json", JsonUsageTap),
        (True, 200, b"application/json; charset=utf-8", JsonUsageTap),
        (True, 201, b"application/json", JsonUsageTap),
        (True, 299, b"application/json", JsonUsageTap),
        (True, 200, b"text/event-stream", SseUsageTap),
        (True, 200, b"text/event-stream; charset=utf-8", SseUsageTap),
        (True, 300, b"application/json", None),
        (True, 400, b"application/json", None),
        (True, 429, b"application/json", None),
        (True, 500, b"text/event-stream", None),
        (True, 199, b"application/json", None),
        (True, 200, b"text/plain", None),
        (True, 200, b"", None),
        (False, 200, b"application/json", None),
        (False, 200, b"text/event-stream", None),
    ],
)
def test_the_tap_is_chosen_by_status_and_content_type(
    due: bool, status: int, content_type: bytes, tap: type | None
) -> None:
    chosen = tap_for(due, status, content_type)
    assert (None if chosen is None else type(chosen)) is tap


@pytest.mark.parametrize(
    ("content_type", "tap"),
    [
        (b"Application/JSON", JsonUsageTap),
        (b"application/JSON; charset=UTF-8", JsonUsageTap),
        (b"Text/Event-Stream", SseUsageTap),
    ],
)
def test_the_content_type_is_compared_case_insensitively(content_type: bytes, tap: type) -> None:
    # RFC 9110 §8.3.1: "The type and subtype tokens are case-insensitive." An upstream that
    # spells them otherwise still reports usage, which must not be billed as unknown.
    chosen = tap_for(True, 200, content_type)
    assert type(chosen) is tap


# ---------------------------------------------------------------------------------------------
# Into the request's record and its log line

USAGE = Usage("gpt-4o-mini", 11, 22, 3, 4)


@pytest.mark.parametrize(
    ("ending", "reason"),
    [
        (COMPLETE, NOT_REPORTED),
        (CLIENT_DISCONNECT, CLIENT_DISCONNECT),
        (UPSTREAM_ERROR, UPSTREAM_ERROR),
        (PROXY_ERROR, NOT_REPORTED),
    ],
)
def test_no_usage_is_unknown_with_the_reason_from_the_ending(ending: str, reason: str) -> None:
    record = RequestRecord("POST", "/v1/chat/completions", key="team-a", ending=ending)
    record_usage(record, None)
    assert record.usage == USAGE_UNKNOWN
    assert record.usage_unknown_reason == reason
    assert record.tokens is None
    line = format_text(record)
    assert line.endswith(f" key=team-a usage=unknown usage_unknown_reason={reason}")
    fields = json.loads(format_json(record))
    assert fields["usage"] == "unknown"
    assert fields["usage_unknown_reason"] == reason
    assert fields["input_tokens"] is None


@pytest.mark.parametrize("ending", [COMPLETE, CLIENT_DISCONNECT, UPSTREAM_ERROR])
def test_known_usage_goes_into_the_record_and_both_log_formats(ending: str) -> None:
    record = RequestRecord("POST", "/v1/chat/completions", key="team-a", ending=ending)
    record_usage(record, USAGE)
    assert record.usage == USAGE_KNOWN
    assert record.usage_unknown_reason is None
    assert record.tokens == USAGE
    line = format_text(record)
    assert line.endswith(
        " key=team-a model=gpt-4o-mini input_tokens=11 output_tokens=22"
        " cached_input_tokens=3 reasoning_tokens=4"
    )
    assert "usage=unknown" not in line
    fields = json.loads(format_json(record))
    assert {
        name: fields[name]
        for name in (
            "key",
            "model",
            "input_tokens",
            "output_tokens",
            "cached_input_tokens",
            "reasoning_tokens",
        )
    } == {
        "key": "team-a",
        "model": "gpt-4o-mini",
        "input_tokens": 11,
        "output_tokens": 22,
        "cached_input_tokens": 3,
        "reasoning_tokens": 4,
    }


def test_a_request_without_due_usage_says_nothing_of_usage() -> None:
    record = RequestRecord("GET", "/v1/models", status=200)
    assert "usage" not in format_text(record)
    assert "tokens" not in format_text(record)
    fields = json.loads(format_json(record))
    assert fields["usage"] is None
    assert fields["model"] is None
