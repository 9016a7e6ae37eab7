"""Opt-in usage injection (DESIGN §11, issue 13 item 3), as pure functions.

`request_with_usage`: a streamed request that did not ask for usage gets
`stream_options.include_usage: true` (re-encoded as compact JSON, everything else kept); any
other body is left alone (None), and nothing a client can send makes it raise or produce a body
that is not strict JSON in UTF-8.

`UsageChunkRemover`: fed the stream the upstream sends when asked for usage (every chunk with
`"usage": null`, then the usage-only chunk), cut into reads anywhere, it gives back exactly the
bytes the upstream sends when not asked. The expected bytes are built here from the same chunk
objects encoded twice, once with and once without what `include_usage` adds, never by the
remover; a stream without a `"usage"` passes byte for byte.
"""

from __future__ import annotations

import itertools
import json
import zlib
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from llmproxy.cli import build_parser, given_flags
from llmproxy.config import ConfigurationError, load_configuration
from llmproxy.usage import USAGE_PATHS
from llmproxy.usage_injection import (
    INJECTED_PATHS,
    CodingError,
    InflatingUsageChunkRemover,
    UsageChunkRemover,
    remover_for,
    request_with_usage,
)
from tests.unit.test_usage import CONTENT, chat_usage, split

Json = dict[str, Any]
COMPACT = {"separators": (",", ":"), "ensure_ascii": False}


def compact(obj: object) -> bytes:
    return json.dumps(obj, **COMPACT).encode()  # type: ignore[arg-type]


def _no_constants(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


def strict_json(body: bytes) -> object:
    """RFC 8259 JSON in UTF-8: no NaN/Infinity, no lone surrogates (they cannot be UTF-8)."""
    return json.loads(body.decode("utf-8"), parse_constant=_no_constants)


def removed(chunks: Iterable[bytes]) -> bytes:
    """What the remover lets through of a stream arriving as `chunks` (then its end)."""
    remover = UsageChunkRemover()
    out = b"".join(remover.feed(chunk) for chunk in chunks)
    return out + remover.flush()


# ---------------------------------------------------------------------------------------------
# The settings


def test_the_paths_are_the_two_streamed_apis_that_take_include_usage() -> None:
    assert frozenset({b"/v1/chat/completions", b"/v1/completions"}) == INJECTED_PATHS
    assert INJECTED_PATHS <= USAGE_PATHS
    assert b"/v1/responses" not in INJECTED_PATHS  # reports its usage without being asked


def test_off_by_default_and_on_from_the_variable_the_file_and_the_flag(tmp_path: Path) -> None:
    assert load_configuration({}).usage_injection is False
    assert load_configuration({"LLMPROXY_USAGE_INJECTION": "true"}).usage_injection is True
    assert load_configuration({"LLMPROXY_USAGE_INJECTION": "off"}).usage_injection is False
    config_file = tmp_path / "llmproxy.toml"
    config_file.write_text("usage_injection = true\n")
    assert load_configuration({}, config_file=str(config_file)).usage_injection is True
    flags = given_flags(build_parser().parse_args(["serve", "--usage-injection", "false"]))
    assert flags == {"usage_injection": "false"}
    # The flag beats the variable, which beats the file.
    overridden = load_configuration(
        {"LLMPROXY_USAGE_INJECTION": "true"}, flags=flags, config_file=str(config_file)
    )
    assert overridden.usage_injection is False


@pytest.mark.parametrize("value", ["maybe", "2", "truee"])
def test_a_value_that_is_not_a_boolean_names_the_variable(value: str) -> None:
    with pytest.raises(ConfigurationError) as raised:
        load_configuration({"LLMPROXY_USAGE_INJECTION": value})
    assert raised.value.setting == "LLMPROXY_USAGE_INJECTION"


# ---------------------------------------------------------------------------------------------
# request_with_usage

JSON_LEAVES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=False, allow_infinity=False),
    st.one_of(
        st.sampled_from(["usage", '"stream": false', "include_usage", "日本語 🙂"]), st.text()
    ),
)
JSON_VALUES = st.recursive(
    JSON_LEAVES,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
# How the client laid its body out: the SDK's `, `/`: `, compact, indented, ASCII-escaped.
REQUEST_LAYOUTS: st.SearchStrategy[Json] = st.sampled_from(
    [
        {},
        {"separators": (",", ":")},
        {"indent": 2, "ensure_ascii": False},
        {"separators": (", ", ": "), "ensure_ascii": False},
    ]
)
RESERVED = {"model", "messages", "stream", "stream_options"}


@st.composite
def requests_without_usage(draw: st.DrawFn) -> tuple[Json, Json]:
    """(a streamed request that did not ask for usage, that request asking for it)."""
    request: Json = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hi"}]}
    extra = draw(
        st.dictionaries(st.text(max_size=10).filter(lambda k: k not in RESERVED), JSON_VALUES)
    )
    request.update(extra)
    request["stream"] = True
    # Other stream options (`include_obfuscation`) are kept; `include_usage` is absent, false or
    # anything that is not `true`.
    options = draw(
        st.sampled_from(
            ["absent", "null", "empty", "false", "other-option", "not-true", "false+other"]
        )
    )
    expected_options: Json
    if options == "absent":
        expected_options = {"include_usage": True}
    elif options == "null":
        request["stream_options"] = None
        expected_options = {"include_usage": True}
    elif options == "empty":
        request["stream_options"] = {}
        expected_options = {"include_usage": True}
    elif options == "false":
        request["stream_options"] = {"include_usage": False}
        expected_options = {"include_usage": True}
    elif options == "other-option":
        request["stream_options"] = {"include_obfuscation": False}
        expected_options = {"include_obfuscation": False, "include_usage": True}
    elif options == "not-true":
        value: object = draw(st.sampled_from([None, "true", 1, 0, [], {}]))
        request["stream_options"] = {"include_usage": value}
        expected_options = {"include_usage": True}
    else:
        request["stream_options"] = {"include_usage": False, "include_obfuscation": True}
        expected_options = {"include_usage": True, "include_obfuscation": True}
    # The rest of the body stays in its order; stream_options stays where it was, or comes last.
    expected = {key: value for key, value in request.items() if key != "stream_options"}
    if "stream_options" in request:
        expected = {
            key: (expected_options if key == "stream_options" else value)
            for key, value in request.items()
        }
    else:
        expected["stream_options"] = expected_options
    return request, expected


@given(requests_without_usage(), REQUEST_LAYOUTS)
def test_a_stream_that_did_not_ask_for_usage_is_sent_asking_for_it(
    pair: tuple[Json, Json], layout: Json
) -> None:
    request, expected = pair
    body = json.dumps(request, **layout).encode()
    asking = request_with_usage(body)
    assert asking is not None
    assert strict_json(asking) == expected
    assert asking == compact(expected)  # re-encoded compact, non-ASCII as UTF-8, order kept


@given(
    st.dictionaries(st.text(max_size=10), JSON_VALUES, max_size=4),
    st.sampled_from([{}, {"include_obfuscation": False}]),
    REQUEST_LAYOUTS,
)
def test_a_stream_that_asked_for_usage_is_left_alone(
    extra: Json, other_options: Json, layout: Json
) -> None:
    request = {**extra, "stream": True, "stream_options": {**other_options, "include_usage": True}}
    assert request_with_usage(json.dumps(request, **layout).encode()) is None


@given(
    st.dictionaries(st.text(max_size=10), JSON_VALUES, max_size=4),
    st.sampled_from(["absent", False, None, "true", 1, 1.0, [True], {"stream": True}]),
)
def test_a_request_that_is_not_a_stream_is_left_alone(extra: Json, stream: object) -> None:
    request = {key: value for key, value in extra.items() if key != "stream"}
    if stream != "absent":
        request["stream"] = stream
    assert request_with_usage(json.dumps(request).encode()) is None


@given(JSON_VALUES.filter(lambda value: not isinstance(value, dict)))
def test_a_body_that_is_not_a_json_object_is_left_alone(value: object) -> None:
    assert request_with_usage(json.dumps(value).encode()) is None


@pytest.mark.parametrize("options", ['"yes"', "true", "1", "[]", '[{"include_usage": true}]'])
def test_stream_options_that_are_not_an_object_are_left_alone(options: str) -> None:
    body = f'{{"model": "m", "stream": true, "stream_options": {options}}}'.encode()
    assert request_with_usage(body) is None


VALID = b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Hi"}],"stream":true}'


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b" ",
        b"{",
        b'{"stream": true',
        b'{"stream": true,}',
        b"{'stream': true}",
        b'{"stream": tru}',
        b'{"stream": true} {"stream": true}',
        b'{"stream": true, "messages": "\xff\xfe"}',  # not UTF-8
        b"\x00\x01\x02",
        b"model=gpt-4o&stream=true",  # a form, not JSON
    ],
)
def test_a_body_that_is_not_json_is_left_alone(body: bytes) -> None:
    assert request_with_usage(body) is None


@given(st.integers(min_value=0, max_value=len(VALID) - 1))
def test_every_truncation_of_a_valid_body_is_left_alone(end: int) -> None:
    assert request_with_usage(VALID[:end]) is None


@given(st.binary(max_size=200))
def test_any_bytes_give_none_or_strict_json_asking_for_usage(body: bytes) -> None:
    asking = request_with_usage(body)
    if asking is not None:
        request = strict_json(asking)
        assert isinstance(request, dict)
        assert request["stream_options"]["include_usage"] is True


def nested(depth: int) -> bytes:
    return b'{"model": "m", "stream": true, "x": ' + b"[" * depth + b"]" * depth + b"}"


# Bodies a client can send that Python's json module reads but must not be re-encoded from:
# nesting deeper than the interpreter's recursion limit (json.loads raises RecursionError, not
# ValueError), a lone surrogate escape (decoded to a str that cannot be encoded as UTF-8), a
# number too large for a float (read as inf, written back as `Infinity`, which is not JSON) and
# the non-JSON constants Python accepts. The upstream must answer them as it would.
ODD_BODIES = {
    "nested-100000": nested(100_000),
    "lone-surrogate": b'{"model": "m", "stream": true, "messages": [{"content": "\\ud800"}]}',
    "lone-low-surrogate": b'{"model": "m", "stream": true, "user": "a\\udc00b"}',
    "float-overflow": b'{"model": "m", "stream": true, "temperature": 1e400}',
    "negative-overflow": b'{"model": "m", "stream": true, "top_p": -1e999}',
    "nan": b'{"model": "m", "stream": true, "temperature": NaN}',
    "infinity": b'{"model": "m", "stream": true, "temperature": Infinity}',
    "huge-integer": b'{"model": "m", "stream": true, "seed": ' + b"9" * 5000 + b"}",
}


@pytest.mark.parametrize("name", sorted(ODD_BODIES))
def test_odd_bodies_never_raise_and_never_become_non_json(name: str) -> None:
    body = ODD_BODIES[name]
    asking = request_with_usage(body)  # must not raise: that would be a 500 for the client
    if asking is not None:
        request = strict_json(asking)
        assert isinstance(request, dict)
        assert request["stream_options"] == {"include_usage": True}


def test_a_surrogate_pair_escape_is_one_character_and_is_kept() -> None:
    body = b'{"model": "m", "stream": true, "user": "\\ud83d\\ude42"}'
    asking = request_with_usage(body)
    assert asking is not None
    assert strict_json(asking) == {
        "model": "m",
        "stream": True,
        "user": "🙂",
        "stream_options": {"include_usage": True},
    }
    assert "🙂".encode() in asking


def test_nesting_python_reads_is_still_injected() -> None:
    asking = request_with_usage(nested(200))
    assert asking is not None
    assert strict_json(asking) == {
        "model": "m",
        "stream": True,
        "x": json.loads(b"[" * 200 + b"]" * 200),
        "stream_options": {"include_usage": True},
    }


def test_a_huge_body_is_rewritten_whole() -> None:
    content = "word " * 1_000_000 + "日本語"  # 5 MB of prompt
    request = {"model": "m", "messages": [{"role": "user", "content": content}], "stream": True}
    asking = request_with_usage(json.dumps(request).encode())
    assert asking is not None
    assert asking == compact({**request, "stream_options": {"include_usage": True}})


# ---------------------------------------------------------------------------------------------
# UsageChunkRemover: the streams the upstream sends, asked for usage and not


def encode(obj: Json, layout: Json, usage_at: int | None) -> str:
    """`obj` as JSON, with `"usage": null` inserted as its `usage_at`-th key if given."""
    if usage_at is not None:
        items = list(obj.items())
        items.insert(usage_at, ("usage", None))
        obj = dict(items)
    return json.dumps(obj, **layout)


def event(data: str, eol: str) -> bytes:
    return f"data: {data}{eol}{eol}".encode()


def chat_chunk(reply_id: str, delta: Json, finish: str | None) -> Json:
    return {
        "id": reply_id,
        "object": "chat.completion.chunk",
        "created": 1_700_000_000,
        "model": "gpt-4o-mini-2024-07-18",
        "system_fingerprint": "fp_0",
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
    }


def text_chunk(reply_id: str, text: str, finish: str | None) -> Json:
    return {
        "id": reply_id,
        "object": "text_completion",
        "created": 1_700_000_000,
        "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}],
        "model": "gpt-3.5-turbo-instruct",
        "system_fingerprint": "fp_0",
    }


def chat_chunks(contents: Sequence[str], tool_arguments: Sequence[str]) -> list[Json]:
    chunks = [chat_chunk("chatcmpl-1", {"role": "assistant", "content": "", "refusal": None}, None)]
    chunks += [chat_chunk("chatcmpl-1", {"content": text}, None) for text in contents]
    if tool_arguments:
        call = {"index": 0, "id": "call_1", "type": "function"}
        first = {**call, "function": {"name": "get_weather", "arguments": ""}}
        chunks.append(chat_chunk("chatcmpl-1", {"tool_calls": [first]}, None))
        chunks += [
            chat_chunk(
                "chatcmpl-1", {"tool_calls": [{"index": 0, "function": {"arguments": a}}]}, None
            )
            for a in tool_arguments
        ]
    chunks.append(chat_chunk("chatcmpl-1", {}, "tool_calls" if tool_arguments else "stop"))
    return chunks


# The layouts an upstream streams in: OpenAI's compact UTF-8, compact ASCII, and `, `/`: `
# (Python's default, as some compatible servers write). With `, ` the added key is not the first
# (see the test of that case below).
STREAM_LAYOUTS: st.SearchStrategy[Json] = st.sampled_from(
    [
        {"separators": (",", ":"), "ensure_ascii": False},
        {"separators": (",", ":")},
        {"separators": (", ", ": "), "ensure_ascii": False},
    ]
)


@st.composite
def streams(draw: st.DrawFn) -> tuple[bytes, bytes]:
    """(the stream as the upstream sends it when asked for usage, the one it sends when not)."""
    eol = draw(st.sampled_from(["\n", "\r\n", "\r"]))  # the three line ends SSE allows
    layout = draw(STREAM_LAYOUTS)
    contents = draw(st.lists(CONTENT, max_size=5))
    if draw(st.booleans()):
        chunks = chat_chunks(
            contents, draw(st.lists(st.sampled_from(['{"ci', 'ty": "', 'Paris"}']), max_size=3))
        )
    else:
        chunks = [text_chunk("cmpl-1", text, None) for text in contents]
        chunks.append(text_chunk("cmpl-1", "", "length"))
    pings = draw(st.booleans())  # `: ping` comments between the events, as some servers send
    spaced = layout["separators"][0] == ", "
    asked: list[bytes] = []
    plain: list[bytes] = []
    for chunk in chunks:
        at = draw(st.integers(1 if spaced else 0, len(chunk)))
        if pings:
            asked.append(f": ping{eol}{eol}".encode())
            plain.append(f": ping{eol}{eol}".encode())
        asked.append(event(encode(chunk, layout, at), eol))
        plain.append(event(json.dumps(chunk, **layout), eol))
    usage_chunk = {**chunks[-1], "choices": [], "usage": draw(chat_usage())}
    asked.append(event(json.dumps(usage_chunk, **layout), eol))
    if draw(st.booleans()):  # [DONE], or a stream that ends after its last chunk
        asked.append(event("[DONE]", eol))
        plain.append(event("[DONE]", eol))
    return b"".join(asked), b"".join(plain)


@given(st.data())
def test_the_asked_stream_cut_anywhere_becomes_exactly_the_stream_not_asked(
    data: st.DataObject,
) -> None:
    asked, plain = data.draw(streams())
    assert removed(data.draw(split(asked))) == plain


@given(streams())
def test_the_asked_stream_cut_at_every_single_point_becomes_the_stream_not_asked(
    pair: tuple[bytes, bytes],
) -> None:
    asked, plain = pair
    for cut in range(len(asked) + 1):
        assert removed([asked[:cut], asked[cut:]]) == plain, cut


@given(streams())
def test_the_asked_stream_byte_by_byte_becomes_the_stream_not_asked(
    pair: tuple[bytes, bytes],
) -> None:
    asked, plain = pair
    assert removed(asked[i : i + 1] for i in range(len(asked))) == plain


@given(st.data())
def test_a_stream_not_asked_passes_byte_for_byte(data: st.DataObject) -> None:
    _, plain = data.draw(streams())
    assert removed(data.draw(split(plain))) == plain


@given(st.data())
def test_bytes_without_a_usage_key_pass_byte_for_byte(data: st.DataObject) -> None:
    # Whatever they are (CR-only line ends, comments, a last event without its blank line,
    # binary): nothing is added, dropped or reordered.
    pieces = st.sampled_from(
        [b"data: {}", b"\n", b"\r\n", b"\r", b": ping", b"event: x", b"data: [DONE]", b"usage"]
    )
    stream = b"".join(data.draw(st.lists(st.one_of(pieces, st.binary(max_size=8)), max_size=30)))
    if b'"usage"' in stream:
        return
    assert removed(data.draw(split(stream))) == stream


USAGE = {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12}
USAGE_ONLY = compact({**chat_chunk("chatcmpl-1", {}, None), "choices": [], "usage": USAGE}).decode()


@pytest.mark.parametrize("eol", ["\n", "\r\n"])
def test_the_usage_chunk_split_inside_its_usage_key_is_dropped(eol: str) -> None:
    stream = event(USAGE_ONLY, eol) + event("[DONE]", eol)
    cut = stream.index(b'"usage"') + 3
    remover = UsageChunkRemover()
    assert remover.feed(stream[:cut]) == b""  # held: the event is not complete
    assert remover.feed(stream[cut:]) == event("[DONE]", eol)
    assert remover.flush() == b""


@pytest.mark.parametrize("eol", ["\n", "\r\n"])
def test_an_event_is_held_until_its_blank_line_then_given_whole(eol: str) -> None:
    first = chat_chunk("chatcmpl-1", {"content": "Hi"}, None)
    data = event(encode(first, COMPACT, len(first)), eol)
    remover = UsageChunkRemover()
    assert remover.feed(data[: -len(eol)]) == b""  # one line end: not yet the event's end
    assert remover.feed(data[-len(eol) :]) == event(compact(first).decode(), eol)


@pytest.mark.parametrize("eol", ["\n", "\r\n", "\r"])
def test_an_event_goes_on_as_soon_as_its_blank_line_is_complete(eol: str) -> None:
    # Not held for the next read (the stream may pause for seconds between tokens): a CR-only
    # stream's events end with CR CR, which a following LF would not change into anything else.
    remover = UsageChunkRemover()
    chunk = chat_chunk("chatcmpl-1", {"content": "Hi"}, None)
    sent = event(encode(chunk, COMPACT, len(chunk)), eol)
    assert remover.feed(sent) == event(compact(chunk).decode(), eol)
    assert remover.feed(event(USAGE_ONLY, eol)) == b""
    assert remover.feed(event("[DONE]", eol)) == event("[DONE]", eol)
    assert remover.flush() == b""


@pytest.mark.parametrize("dropped", [True, False])
def test_the_lf_of_a_crlf_cut_after_its_cr_goes_the_way_of_its_event(dropped: bool) -> None:
    first = event(USAGE_ONLY if dropped else '{"choices":[{"delta":{}}]}', "\r\n")
    done = event("[DONE]", "\r\n")
    remover = UsageChunkRemover()
    out = remover.feed(first[:-1])  # up to the CR of the blank line: the event is complete
    out += remover.feed(first[-1:] + done)
    assert out + remover.flush() == (b"" if dropped else first) + done


def test_a_cr_inside_a_crlf_is_not_taken_for_a_blank_line() -> None:
    # `data: a\r\ndata: b`: one CRLF line end, not a CR line end followed by an LF one.
    stream = b'data: {"choices":[],\r\ndata: "usage":{"prompt_tokens":1}}\r\n\r\n'
    for cut in range(len(stream) + 1):
        assert removed([stream[:cut], stream[cut:] + event("[DONE]", "\r\n")]) == event(
            "[DONE]", "\r\n"
        ), cut


def test_the_usage_chunk_in_several_data_lines_is_dropped() -> None:
    # SSE lets one event's data span lines; a client joins them with LF (JSON whitespace).
    text = json.dumps({"id": "c", "choices": [], "usage": USAGE}, indent=2)
    lines = "".join(f"data: {line}\n" for line in text.splitlines())
    stream = (lines + "\n").encode() + event("[DONE]", "\n")
    assert removed([stream]) == event("[DONE]", "\n")


@pytest.mark.parametrize(
    "data",
    [
        USAGE_ONLY,
        '{"id":"c","object":"chat.completion.chunk","choices":[],"usage":{}}',
        '{"choices": [], "usage": {"prompt_tokens": 1}}',
    ],
)
@pytest.mark.parametrize("prefix", ["data: ", "data:", "event: chunk\ndata: ", "id: 7\ndata: "])
def test_every_form_of_the_usage_only_chunk_is_dropped(data: str, prefix: str) -> None:
    kept = event("[DONE]", "\n")
    assert removed([f"{prefix}{data}\n\n".encode() + kept]) == kept


@pytest.mark.parametrize(
    ("sent", "expected"),
    [
        # Choices and usage in one chunk (some compatible servers): not the usage-only chunk.
        (
            '{"id":"c","choices":[{"index":0,"delta":{}}],"usage":{"prompt_tokens":1}}',
            '{"id":"c","choices":[{"index":0,"delta":{}}],"usage":{"prompt_tokens":1}}',
        ),
        # No choices but no usage object either: only the null goes.
        ('{"id":"c","choices":[],"usage":null}', '{"id":"c","choices":[]}'),
        # The first key, the middle one, the only one.
        ('{"usage":null,"id":"c","choices":[]}', '{"id":"c","choices":[]}'),
        ('{"id":"c","usage":null,"choices":[]}', '{"id":"c","choices":[]}'),
        ('{"usage":null}', "{}"),
        ('{"id": "c", "usage" : null, "choices": []}', '{"id": "c", "choices": []}'),
        # An error event, a non-JSON event: passed as they are.
        ('{"error":{"message":"boom","type":"server_error"}}', None),
        ('{not json "usage" {"prompt_tokens": 1}', None),
        ('{"choices":[],"usage":{"prompt_tokens":1}', None),  # truncated: not a chunk
        ('[{"choices":[],"usage":{"prompt_tokens":1}}]', None),  # a list, not a chunk
        # Text that only looks like it: JSON escapes the quotes, so nothing is touched.
        ('{"choices":[{"delta":{"content":"\\"usage\\":null, \\"choices\\":[]"}}]}', None),
        ('{"choices":[{"delta":{"content":"usage: null"}}]}', None),
    ],
)
def test_other_events_keep_everything_but_a_null_usage(sent: str, expected: str | None) -> None:
    stream = event(sent, "\n") + event("[DONE]", "\n")
    assert removed([stream]) == event(expected or sent, "\n") + event("[DONE]", "\n")


def test_a_null_usage_as_the_first_of_spaced_keys_leaves_the_same_json() -> None:
    chunk = chat_chunk("chatcmpl-1", {"content": "Hi"}, None)
    sent = event(encode(chunk, {"separators": (", ", ": ")}, 0), "\n")
    out = removed([sent])
    assert out.startswith(b"data: {")
    assert out.endswith(b"}\n\n")
    assert json.loads(out[len(b"data: ") :]) == chunk


@pytest.mark.parametrize("rest", [b"data: [DONE]", b"data: [DONE]\n", b'data: {"choices":[]'])
def test_what_follows_the_last_blank_line_is_given_back_at_the_end(rest: bytes) -> None:
    first = event('{"choices":[{"delta":{"content":"a"}}]}', "\n")
    remover = UsageChunkRemover()
    assert remover.feed(first + rest) == first
    assert remover.flush() == rest
    assert remover.flush() == b""


def test_a_usage_chunk_among_many_events_in_one_read_is_the_only_one_dropped() -> None:
    contents = ["a", "b", "c"]
    asked = b"".join(
        event(encode(chunk, COMPACT, len(chunk)), "\n") for chunk in chat_chunks(contents, [])
    )
    plain = b"".join(event(compact(chunk).decode(), "\n") for chunk in chat_chunks(contents, []))
    done = event("[DONE]", "\n")
    assert removed([asked + event(USAGE_ONLY, "\n") + done]) == plain + done
    assert removed([asked, event(USAGE_ONLY, "\n"), done]) == plain + done


def test_each_remover_keeps_its_own_partial_event() -> None:
    one, two = UsageChunkRemover(), UsageChunkRemover()
    assert one.feed(b'data: {"a":') == b""
    assert two.feed(b"data: [DONE]\n\n") == b"data: [DONE]\n\n"
    assert one.feed(b"1}\n\n") == b'data: {"a":1}\n\n'


@given(st.data())
def test_the_same_events_give_the_same_output_however_they_are_cut(data: st.DataObject) -> None:
    # Any mixture of kept, dropped and rewritten events: the cut never changes the answer.
    events = [
        event(USAGE_ONLY, "\n"),
        event('{"id":"c","choices":[],"usage":null}', "\r\n"),
        event('{"choices":[{"delta":{"content":"x"}}],"usage":null}', "\n"),
        event("[DONE]", "\r\n"),
        b": ping\n\n",
        b"data: {not json\n\n",
        event('{"choices":[],"usage":{"prompt_tokens":1}}', "\r\n"),
    ]
    stream = b"".join(data.draw(st.lists(st.sampled_from(events), max_size=12)))
    whole = removed([stream])
    assert removed(data.draw(split(stream))) == whole
    pieces = data.draw(split(stream))
    assert removed(itertools.chain(pieces, [b""])) == whole  # an empty read changes nothing


# ---------------------------------------------------------------------------------------------
# A coded stream: inflated, then cleaned (the client gets it decoded)


def deflated(data: bytes, wbits: int) -> bytes:
    compressor = zlib.compressobj(wbits=wbits)
    return compressor.compress(data) + compressor.flush()


@given(st.data(), st.sampled_from([31, 15, -15]))  # gzip, zlib ("deflate"), raw deflate
def test_a_compressed_stream_cut_anywhere_becomes_the_plain_stream_not_asked(
    data: st.DataObject, wbits: int
) -> None:
    asked, plain = data.draw(streams())
    encoding = b"gzip" if wbits == 31 else b"deflate"
    remover = remover_for(encoding)
    assert isinstance(remover, InflatingUsageChunkRemover)
    chunks = data.draw(split(deflated(asked, wbits)))
    out = b"".join(remover.feed(chunk) for chunk in chunks) + remover.flush()
    assert out == plain


def test_a_stream_that_does_not_inflate_is_a_coding_error() -> None:
    remover = InflatingUsageChunkRemover()
    with pytest.raises(CodingError):
        remover.feed(b"\x1f\x8b" + b"not gzip at all" * 4)


@pytest.mark.parametrize(
    ("encoding", "kind"),
    [
        (None, UsageChunkRemover),
        (b"identity", UsageChunkRemover),
        (b" GZIP", InflatingUsageChunkRemover),
        (b"x-gzip", InflatingUsageChunkRemover),
        (b"deflate", InflatingUsageChunkRemover),
        (b"br", type(None)),  # not decoded: passed on as it came
        (b"zstd", type(None)),
        (b"gzip, br", type(None)),
    ],
)
def test_the_remover_follows_the_coding(encoding: bytes | None, kind: type) -> None:
    assert type(remover_for(encoding)) is kind
