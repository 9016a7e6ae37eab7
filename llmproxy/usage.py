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
from dataclasses import dataclass
from typing import Any

from llmproxy.access_log import (
    CLIENT_DISCONNECT,
    NOT_REPORTED,
    UPSTREAM_ERROR,
    USAGE_KNOWN,
    USAGE_UNKNOWN,
    RequestRecord,
)

# How much of a JSON body is kept to look in: its usage and model sit at its ends.
_HEAD_BYTES = 16 * 1024
_TAIL_BYTES = 16 * 1024
# The longest SSE event held while it is incomplete (a `response.completed` repeats the whole
# output); one longer is not looked into, and the usage stays unknown.
MAX_EVENT_BYTES = 8 * 1024 * 1024

_USAGE_OBJECT = re.compile(rb'"usage"\s*:\s*\{')
_MODEL_VALUE = re.compile(rb'"model"\s*:\s*"((?:[^"\\]|\\.)*)"')
_RESPONSES_ENDINGS = frozenset({"response.completed", "response.incomplete", "response.failed"})
_DECODER = json.JSONDecoder()
# The endpoints whose answers report token usage (POST).
USAGE_PATHS = frozenset(
    {b"/v1/chat/completions", b"/v1/completions", b"/v1/embeddings", b"/v1/responses"}
)


@dataclass(frozen=True, slots=True)
class Usage:
    """What one answer reported it used."""

    model: str | None
    input_tokens: int
    output_tokens: int
    cached_input_tokens: int = 0
    reasoning_tokens: int = 0


def _count(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def _detail(usage: dict[str, Any], groups: tuple[str, ...], name: str) -> int:
    """`name` inside the first of the `*_details` objects present."""
    for group in groups:
        details = usage.get(group)
        if isinstance(details, dict):
            return _count(details.get(name))
    return 0


def usage_from_object(usage: object, model: object) -> Usage | None:
    """A `usage` object of any OpenAI answer, with the model the answer names."""
    if not isinstance(usage, dict):
        return None
    shown_model = model if isinstance(model, str) else None
    if "input_tokens" in usage or "output_tokens" in usage:  # Responses API, Realtime
        return Usage(
            shown_model,
            _count(usage.get("input_tokens")),
            _count(usage.get("output_tokens")),
            _detail(usage, ("input_tokens_details", "input_token_details"), "cached_tokens"),
            _detail(usage, ("output_tokens_details", "output_token_details"), "reasoning_tokens"),
        )
    if "prompt_tokens" in usage or "completion_tokens" in usage:  # chat, completions, embeddings
        return Usage(
            shown_model,
            _count(usage.get("prompt_tokens")),
            _count(usage.get("completion_tokens")),
            _detail(usage, ("prompt_tokens_details",), "cached_tokens"),
            _detail(usage, ("completion_tokens_details",), "reasoning_tokens"),
        )
    return None


class JsonUsageTap:
    """The usage of a non-streamed JSON answer: its head and tail are kept, nothing else."""

    __slots__ = ("_head", "_seen", "_tail")

    def __init__(self) -> None:
        self._head = b""
        self._tail = b""
        self._seen = 0

    def feed(self, chunk: bytes) -> None:
        if len(self._head) < _HEAD_BYTES:
            self._head += chunk[: _HEAD_BYTES - len(self._head)]
        self._seen += len(chunk)
        tail = self._tail + chunk if self._tail else chunk
        self._tail = tail[-_TAIL_BYTES:] if len(tail) > _TAIL_BYTES else tail

    def usage(self) -> Usage | None:
        """What the body reported, once it is complete; None if it named no usage."""
        whole = self._seen <= _HEAD_BYTES
        tail = self._head if whole else self._tail
        # The last one: a top-level usage comes after the content.
        match = next(reversed(list(_USAGE_OBJECT.finditer(tail))), None)
        if match is None:
            return None
        try:
            usage, _ = _DECODER.raw_decode(
                tail.decode("utf-8", "replace"), _char_index(tail, match)
            )
        except ValueError:
            return None
        return usage_from_object(usage, _first_model(self._head) or _first_model(self._tail))


def _char_index(data: bytes, match: re.Match[bytes]) -> int:
    """Where the usage object's `{` is, as an index into `data` decoded."""
    return len(data[: match.end() - 1].decode("utf-8", "replace"))


def _first_model(data: bytes) -> str | None:
    match = _MODEL_VALUE.search(data)
    if match is None:
        return None
    try:
        model: str = json.loads(b'"' + match.group(1) + b'"')
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
        end = max(data.rfind(b"\n\n"), data.rfind(b"\n\r\n"))
        if end == -1:
            self._hold(data)
            return
        cut = end + (2 if data[end + 1 : end + 2] == b"\n" else 3)
        complete = data[:cut]
        self._hold(data[cut:])
        if b'"usage"' in complete and _USAGE_OBJECT.search(complete):
            for event in re.split(rb"\r?\n\r?\n", complete):
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


def _usage_of_event(event: bytes) -> Usage | None:
    lines = [line[5:] for line in re.split(rb"\r?\n", event) if line.startswith(b"data:")]
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


UsageTap = JsonUsageTap | SseUsageTap


def usage_due(method: str, raw_path: bytes) -> bool:
    """Whether a request's answer reports token usage (its method and path say so)."""
    return method == "POST" and raw_path in USAGE_PATHS


def tap_for(due: bool, status: int, content_type: bytes) -> UsageTap | None:
    """The tap for one answer, chosen once: None unless a successful answer reports usage."""
    if not due or not 200 <= status < 300:
        return None
    if content_type.startswith(b"text/event-stream"):
        return SseUsageTap()
    if content_type.startswith(b"application/json"):
        return JsonUsageTap()
    return None


def record_usage(record: RequestRecord, usage: Usage | None) -> None:
    """Put what the answer reported in the request's record (or that it is unknown, and why)."""
    if usage is None:
        record.usage = USAGE_UNKNOWN
        if record.ending in (CLIENT_DISCONNECT, UPSTREAM_ERROR):
            record.usage_unknown_reason = record.ending
        else:
            record.usage_unknown_reason = NOT_REPORTED
        return
    record.usage = USAGE_KNOWN
    record.model = usage.model
    record.input_tokens = usage.input_tokens
    record.output_tokens = usage.output_tokens
    record.cached_input_tokens = usage.cached_input_tokens
    record.reasoning_tokens = usage.reasoning_tokens
