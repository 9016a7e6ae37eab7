"""Token usage read from answers as they pass (DESIGN §11), never changing a byte.

Pure and incremental: a tap is fed the body's chunks exactly as they go to the client and
says, at the end, what the answer reported. It looks only where usage can be:

* a JSON body (chat, completions, embeddings, responses): the last `"usage": {` of the body's
  tail and the first `"model"` of its head (or tail: embeddings name the model last);
* an SSE body: only complete events that contain `"usage": {` — the usage chunk of streamed
  chat and completions, and `response.completed` / `.incomplete` / `.failed` of the Responses
  API (the `"usage": null` of every other chat chunk is skipped without parsing);
* a Realtime session: `response.done` events, and the model of `session.created`/`.updated`.

Chat and completions count `prompt_tokens`/`completion_tokens`; the Responses API and Realtime
count `input_tokens`/`output_tokens`. Both are read into one `Usage`.
"""

from __future__ import annotations

import json
import re
import zlib
from typing import NamedTuple

from llmproxy.access_log import (
    CLIENT_DISCONNECT,
    NOT_REPORTED,
    UPSTREAM_ERROR,
    USAGE_KNOWN,
    USAGE_UNKNOWN,
    RequestRecord,
    SessionRecord,
)

# How much of a JSON body's end is kept to look in: a top-level usage is there.
_TAIL_BYTES = 16 * 1024
# The longest SSE event held while it is incomplete (a `response.completed` repeats the whole
# output); one longer is not looked into, and the usage stays unknown.
MAX_EVENT_BYTES = 8 * 1024 * 1024

_USAGE_OBJECT = re.compile(rb'"usage"\s*:\s*\{')
_MODEL_ESCAPED = re.compile(rb'"model"\s*:\s*"((?:[^"\\]|\\.)*)"')
# A `"model"` field that the end of the data may have cut short.
_MODEL_PARTIAL = re.compile(rb'"model"\s*(?::\s*(?:"(?:[^"\\]|\\.)*\\?)?)?')
_RESPONSES_ENDINGS = frozenset({"response.completed", "response.incomplete", "response.failed"})
_DECODER = json.JSONDecoder()
# The endpoints whose answers report token usage (POST).
USAGE_PATHS = frozenset(
    {b"/v1/chat/completions", b"/v1/completions", b"/v1/embeddings", b"/v1/responses"}
)


class Usage(NamedTuple):
    """What one answer reported it used."""

    model: str | None
    input_tokens: int
    output_tokens: int
    cached_input_tokens: int = 0
    reasoning_tokens: int = 0


# A usage object's field names: input, output, and the details objects of cached input and
# reasoning tokens (chat and completions; the Responses API; Realtime).
_CHAT_NAMES = (
    "prompt_tokens",
    "completion_tokens",
    "prompt_tokens_details",
    "completion_tokens_details",
)
_RESPONSES_NAMES = (
    "input_tokens",
    "output_tokens",
    "input_tokens_details",
    "output_tokens_details",
)
_REALTIME_NAMES = ("input_tokens", "output_tokens", "input_token_details", "output_token_details")


def _count(value: object) -> int:
    """A token count as reported, or 0 for anything that is not a whole number >= 0."""
    return value if type(value) is int and value >= 0 else 0  # (a bool's type is bool)


def usage_from_object(usage: object, model: object) -> Usage | None:
    """A `usage` object of any OpenAI answer, with the model the answer names.

    Read once per request on the hot path, so it is written for few steps, not for beauty.
    """
    if type(usage) is not dict:
        return None
    if "prompt_tokens" in usage or "completion_tokens" in usage:
        names = _CHAT_NAMES
    elif "input_tokens" in usage or "output_tokens" in usage:
        names = _REALTIME_NAMES if "input_token_details" in usage else _RESPONSES_NAMES
    else:
        return None
    input_name, output_name, input_details, output_details = names
    get = usage.get
    details = get(input_details)
    cached = details.get("cached_tokens") if type(details) is dict else 0
    details = get(output_details)
    reasoning = details.get("reasoning_tokens") if type(details) is dict else 0
    input_tokens = get(input_name)
    output_tokens = get(output_name)
    # `tuple.__new__` is the NamedTuple's constructor without its Python-level wrapper.
    return tuple.__new__(
        Usage,
        (
            model if type(model) is str else None,
            input_tokens if type(input_tokens) is int and input_tokens >= 0 else 0,
            output_tokens if type(output_tokens) is int and output_tokens >= 0 else 0,
            cached if type(cached) is int and cached >= 0 else 0,
            reasoning if type(reasoning) is int and reasoning >= 0 else 0,
        ),
    )


class JsonUsageTap:
    """The usage of a non-streamed JSON answer: the model it names and its tail are kept.

    The model is looked for in each chunk until found (the Responses API names it after the
    echoed `instructions`, which may be long); the usage is looked for once, in the last
    16 KiB, when the body is complete.
    """

    __slots__ = ("_model", "_pending", "_tail")

    def __init__(self) -> None:
        self._model: str | None = None
        self._pending = b""  # the end of the last chunk, if a `"model"` may go on past it
        self._tail = b""

    def feed(self, chunk: bytes) -> None:
        if self._model is None:
            data = self._pending + chunk if self._pending else chunk
            self._model, self._pending = _find_model(data)
        if not self._tail:  # the first chunk, most often the whole body: kept, not copied
            self._tail = chunk[-_TAIL_BYTES:] if len(chunk) > _TAIL_BYTES else chunk
            return
        tail = self._tail + chunk
        self._tail = tail[-_TAIL_BYTES:] if len(tail) > _TAIL_BYTES else tail

    def usage(self) -> Usage | None:
        """What the body reported, once it is complete; None if it named no usage."""
        tail = self._tail
        # The last `"usage": {` (a top-level usage comes after the content); the common
        # spellings are checked by slicing, the regular expression is the fallback.
        at = tail.rfind(b'"usage"')
        if at == -1:
            return None
        after = tail[at + 7 : at + 10]
        if after[:2] == b":{":
            start = at + 8
        elif after == b": {":
            start = at + 9
        else:
            start = _last_usage_object(tail)
            if start == -1:
                return None
        try:
            usage = _DECODER.raw_decode(tail[start:].decode("utf-8", "replace"))[0]
        except ValueError:
            return None
        return usage_from_object(usage, self._model)


def _last_usage_object(data: bytes) -> int:
    """Where the `{` of the last `"usage": {` is, or -1."""
    match = None
    for match in _USAGE_OBJECT.finditer(data):  # noqa: B007 - the last one is wanted
        pass
    return -1 if match is None else match.end() - 1


_MODEL_CARRY_LIMIT = 1024  # a model value cut at a chunk's end is held up to this long


def _find_model(data: bytes) -> tuple[str | None, bytes]:
    """The first model `data` names, or None and what to keep for the next chunk (the end of
    `data` if a `"model"` field may go on past it)."""
    at = data.find(b'"model"')
    while at != -1:
        after = data[at + 7 : at + 10]
        value = at + 9 if after[:2] == b':"' else at + 10 if after == b': "' else -1
        if value != -1:  # the compact and the pretty spellings, checked by slicing
            close = data.find(b'"', value)
            text = data[value:close]
            if close != -1 and text.find(b"\\") == -1:  # (`find`: see `SseUsageTap.feed`)
                return text.decode("utf-8", "replace"), b""
        match = _MODEL_ESCAPED.match(data, at)
        if match is not None:
            return _unescaped(match.group(1)), b""
        if _MODEL_PARTIAL.fullmatch(data, at):  # cut short by the chunk's end
            rest = data[at:]
            return None, rest if len(rest) <= _MODEL_CARRY_LIMIT else b""
        at = data.find(b'"model"', at + 1)  # not a model field (`"model"` as a value, say)
    return None, data[-6:]  # a `"model"` may begin in these bytes


def _unescaped(value: bytes) -> str | None:
    try:
        model: str = json.loads(b'"' + value + b'"')
    except ValueError:
        return None
    return model


class SseUsageTap:
    """The usage of a streamed (SSE) answer: complete events with a usage object are parsed."""

    __slots__ = ("_overflowed", "_partial", "_usage")

    def __init__(self) -> None:
        self._partial = b""
        self._usage: Usage | None = None
        self._overflowed = False

    def feed(self, chunk: bytes) -> None:
        data = self._partial + chunk if self._partial else chunk
        # The last event boundary (WHATWG HTML §9.2.5: a blank line after LF, CRLF or CR
        # line ends), looked for in the order streams use them: one search for most.
        # `find`, not `in`, on the hot path: CPython's bytes `in` first tries the operand as an
        # int and builds a TypeError for a bytes one (~1,800 instructions a time, callgrind).
        if data.find(b"\r") != -1:  # CRLF or CR line ends (rare): the careful way
            cut = _last_boundary(data)
        else:
            end = data.rfind(b"\n\n")
            cut = end + 2 if end != -1 else -1
        if cut == -1:
            self._hold(data)
            return
        complete = data[:cut]
        self._hold(data[cut:])
        if complete.find(b'"usage"') != -1 and _USAGE_OBJECT.search(complete):
            for event in _EVENT_BOUNDARY.split(complete):
                if _USAGE_OBJECT.search(event):
                    found = _usage_of_event(event)
                    if found is not None:
                        self._usage = found

    def _hold(self, rest: bytes) -> None:
        if len(rest) > MAX_EVENT_BYTES:
            self._overflowed = True
            self._partial = b""
        else:
            self._partial = rest

    def usage(self) -> Usage | None:
        """The last usage the stream reported; None if it reported none."""
        return self._usage


_EVENT_BOUNDARY = re.compile(rb"\r\n\r\n|\n\n|\r\r|\r\n\r(?!\n)|\n\r\n|\r\n\n|\r\r\n")


def _last_boundary(data: bytes) -> int:
    """The index after the last blank line of `data`, whatever its line ends, or -1."""
    last = -1
    for match in _EVENT_BOUNDARY.finditer(data):
        last = match.end()
    return last


def _usage_of_event(event: bytes) -> Usage | None:
    lines = [line[5:] for line in re.split(rb"\r\n|\n|\r", event) if line.startswith(b"data:")]
    data = b"\n".join(line[1:] if line.startswith(b" ") else line for line in lines)
    try:
        payload = json.loads(data)
    except ValueError:
        return None
    return usage_of_payload(payload)


def usage_of_payload(payload: object) -> Usage | None:
    """The usage an event's JSON reports: a chat/completions chunk, a Responses ending or a
    Realtime `response.done`."""
    if not isinstance(payload, dict):
        return None
    kind = payload.get("type")
    if kind in _RESPONSES_ENDINGS or kind == "response.done":
        response = payload.get("response")
        if isinstance(response, dict):
            return usage_from_object(response.get("usage"), response.get("model"))
        return None
    return usage_from_object(payload.get("usage"), payload.get("model"))


class InflatingTap:
    """A tap of a gzip- or deflate-compressed answer: the chunks are inflated for the tap as
    they pass (OpenAI compresses non-streamed answers for clients that accept it, and the SDK
    sends `Accept-Encoding: gzip, deflate`); the client still gets the compressed bytes."""

    __slots__ = ("_head", "_inflated", "_inflater", "_readable", "_tap")

    def __init__(self, tap: JsonUsageTap | SseUsageTap) -> None:
        self._tap = tap
        self._head = b""  # the first bytes, until they tell gzip, zlib or raw deflate apart
        self._inflater: zlib._Decompress | None = None
        self._readable = True
        self._inflated = 0

    def feed(self, chunk: bytes) -> None:
        if not self._readable:
            return
        inflater = self._inflater
        if inflater is None:
            self._head += chunk
            if len(self._head) < 2:
                return
            inflater = self._inflater = zlib.decompressobj(window_bits(self._head))
            chunk, self._head = self._head, b""
        try:
            data = inflater.decompress(chunk)
        except zlib.error:
            self._readable = False  # not what it said it is: the usage stays unknown
            return
        self._inflated += len(data)
        if self._inflated > _MAX_INFLATED:
            self._readable = False  # a bomb, or an answer too big to follow: not read further
            return
        self._tap.feed(data)

    def usage(self) -> Usage | None:
        return self._tap.usage() if self._readable else None


def window_bits(head: bytes) -> int:
    """zlib's `wbits` for a stream that starts with `head`: gzip (RFC 1952), zlib (RFC 1950,
    what "deflate" means), or raw deflate (what some servers send as "deflate")."""
    if head[:2] == b"\x1f\x8b":
        return 31
    if head[0] & 0x0F == 8 and (head[0] << 8 | head[1]) % 31 == 0:
        return 15
    return -15


class UnreadableTap:
    """An answer whose usage is due but cannot be read (a coding such as br or zstd, or
    several): its usage is unknown, and says so."""

    __slots__ = ()

    def feed(self, chunk: bytes) -> None:
        pass

    def usage(self) -> Usage | None:
        return None


UsageTap = JsonUsageTap | SseUsageTap | InflatingTap | UnreadableTap
INFLATED_ENCODINGS = frozenset({b"gzip", b"x-gzip", b"deflate"})
# An answer that inflates beyond this is not followed further (the tap keeps only a tail, but
# inflating costs CPU): its usage is then unknown.
_MAX_INFLATED = 256 * 1024 * 1024


def usage_due(method: str, raw_path: bytes) -> bool:
    """Whether a request's answer reports token usage (its method and path say so)."""
    return method == "POST" and raw_path in USAGE_PATHS


def tap_for(
    due: bool, status: int, content_type: bytes, content_encoding: bytes | None = None
) -> UsageTap | None:
    """The tap for one answer, chosen once: None unless a successful answer reports usage."""
    if not due or not 200 <= status < 300:
        return None
    kind = content_type[:24].lower()  # media types are case-insensitive (RFC 9110 §8.3.1)
    tap: JsonUsageTap | SseUsageTap
    if kind.startswith(b"text/event-stream"):
        tap = SseUsageTap()
    elif kind.startswith(b"application/json"):
        tap = JsonUsageTap()
    else:
        return None
    if content_encoding is None or content_encoding.strip().lower() == b"identity":
        return tap
    if content_encoding.strip().lower() in INFLATED_ENCODINGS:
        return InflatingTap(tap)
    return UnreadableTap()  # br, zstd, several codings: not read (the usage is unknown)


def record_usage(record: RequestRecord | SessionRecord, usage: Usage | None) -> None:
    """Put what the answer reported in the request's record (or that it is unknown, and why)."""
    if usage is None:
        record.usage = USAGE_UNKNOWN
        if record.ending in (CLIENT_DISCONNECT, UPSTREAM_ERROR):
            record.usage_unknown_reason = record.ending
        else:
            record.usage_unknown_reason = NOT_REPORTED
        return
    record.usage = USAGE_KNOWN
    record.tokens = usage


class RealtimeUsageTap:
    """The tokens of a Realtime session: every `response.done`'s usage, summed, with the model
    of `session.created` / `session.updated`. Only messages naming those events are parsed."""

    __slots__ = ("_cached", "_input", "_output", "_reasoning", "model", "reported", "responses")

    def __init__(self) -> None:
        self.model: str | None = None
        self.responses = 0  # `response.created` seen: each should end in a usage
        self.reported = 0  # `response.done` events with a usage
        self._input = self._output = self._cached = self._reasoning = 0

    def feed(self, text: str) -> None:
        if '"response.created"' in text:
            self.responses += 1
        elif (
            '"response.done"' in text or '"session.created"' in text or '"session.updated"' in text
        ):
            try:
                payload = json.loads(text)
            except ValueError:
                return
            if not isinstance(payload, dict):
                return
            if payload.get("type") in ("session.created", "session.updated"):
                session = payload.get("session")
                model = session.get("model") if isinstance(session, dict) else None
                if isinstance(model, str):
                    self.model = model
                return
            usage = usage_of_payload(payload)
            if usage is not None:
                self.reported += 1
                self._input += usage.input_tokens
                self._output += usage.output_tokens
                self._cached += usage.cached_input_tokens
                self._reasoning += usage.reasoning_tokens

    def usage(self) -> Usage | None:
        """The tokens the session's responses reported, summed; None if none reported any.

        A response cut short (the client or the upstream ended the session mid-response)
        reports nothing, but what the finished ones reported was spent all the same: it is
        counted and charged. Were it dropped, a client could spend without limit by never
        letting a session's last response finish.
        """
        if not self.reported:
            return None
        return Usage(self.model, self._input, self._output, self._cached, self._reasoning)
