"""The Responses API (`/v1/responses`) on the wire, as pure functions: the response object, its
output items, and the named events of a stream for each scripted ending (WIRE.md, "The
Responses API").

Which events a stream carries is decided here; how their bytes go out (framing, pauses, a cut
connection) is `plan.plan_named_stream`'s business. Sequence numbers are given here, over the
final list, so every stream counts from 0 without gaps whatever its ending.
"""

from __future__ import annotations

import copy
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from fake_upstream.wire import FunctionCall, content_texts, output_tokens, split_arguments

DEFAULT_ERROR_MESSAGE: Final = (
    "The server had an error while processing your request. Sorry about that!"
)
# Request fields the real API echoes back in the response object, with their defaults there.
_ECHOED: Final[Mapping[str, Any]] = {
    "instructions": None,
    "max_output_tokens": None,
    "metadata": {},
    "parallel_tool_calls": True,
    "previous_response_id": None,
    "temperature": 1.0,
    "tool_choice": "auto",
    "tools": [],
    "top_p": 1.0,
}
# Endings whose events this module cuts after `after_chunks` deltas; the transport endings
# (close, reset, stall, malformed_json) get the whole list and the plan cuts the bytes.
SEMANTIC_ENDINGS: Final = frozenset({"error_event", "failed", "incomplete"})


@dataclass(frozen=True, slots=True)
class ResponseSpec:
    """Everything one scripted response is made of."""

    id: str
    created_at: int
    model: str
    chunks: tuple[str, ...]
    tool_calls: tuple[FunctionCall, ...]
    input_tokens: int
    reasoning_tokens: int
    request: Mapping[str, Any]

    @property
    def has_message(self) -> bool:
        """A reply that is only tool calls has no message item."""
        return bool(self.chunks) or not self.tool_calls

    def message_id(self) -> str:
        return "msg_" + self.id.removeprefix("resp_")

    def call_item_id(self, index: int) -> str:
        return f"fc_{self.id.removeprefix('resp_')}_{index}"


def new_response_id() -> str:
    return f"resp_{uuid.uuid4().hex}"


def input_text(request: Mapping[str, Any]) -> str:
    """All text a Responses request asks about (instructions and input), for the usage."""
    parts: list[str] = []
    for value in (request.get("instructions"), request.get("input")):
        if isinstance(value, str):
            parts.append(value)
        elif isinstance(value, list):
            for item in value:
                if isinstance(item, Mapping):
                    parts.extend(content_texts(item.get("content")))
    return "\n".join(parts)


def usage(input_tokens: int, output_tokens: int, reasoning_tokens: int) -> dict[str, Any]:
    """Responses usage; reasoning tokens are part of `output_tokens`, as OpenAI bills them."""
    output_tokens += reasoning_tokens
    return {
        "input_tokens": input_tokens,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": output_tokens,
        "output_tokens_details": {"reasoning_tokens": reasoning_tokens},
        "total_tokens": input_tokens + output_tokens,
    }


def response_object(
    spec: ResponseSpec,
    status: str,
    output: Sequence[Mapping[str, Any]],
    *,
    usage: Mapping[str, Any] | None = None,
    error: Mapping[str, Any] | None = None,
    incomplete_details: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A `response` object in the real API's key order."""
    echoed = {name: spec.request.get(name, default) for name, default in _ECHOED.items()}
    return {
        "id": spec.id,
        "object": "response",
        "created_at": spec.created_at,
        "status": status,
        "background": False,
        "completed_at": spec.created_at if status == "completed" else None,
        "error": None if error is None else dict(error),
        "incomplete_details": None if incomplete_details is None else dict(incomplete_details),
        "instructions": echoed["instructions"],
        "max_output_tokens": echoed["max_output_tokens"],
        "model": spec.model,
        "output": [dict(item) for item in output],
        "parallel_tool_calls": echoed["parallel_tool_calls"],
        "previous_response_id": echoed["previous_response_id"],
        "reasoning": {"effort": None, "summary": None},
        "store": True,
        "temperature": echoed["temperature"],
        "text": {"format": {"type": "text"}},
        "tool_choice": echoed["tool_choice"],
        "tools": echoed["tools"],
        "top_p": echoed["top_p"],
        "truncation": "disabled",
        "usage": None if usage is None else dict(usage),
        "user": None,
        "metadata": echoed["metadata"],
    }


def text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": []}


def message_item(spec: ResponseSpec, status: str, text: str | None) -> dict[str, Any]:
    """The assistant's message; `text=None` while it has no content part yet."""
    content = [] if text is None else [text_part(text)]
    return {
        "type": "message",
        "id": spec.message_id(),
        "status": status,
        "role": "assistant",
        "content": content,
    }


def function_call_item(
    spec: ResponseSpec, index: int, call: FunctionCall, status: str, arguments: str
) -> dict[str, Any]:
    return {
        "type": "function_call",
        "id": spec.call_item_id(index),
        "call_id": call.call_id,
        "name": call.name,
        "arguments": arguments,
        "status": status,
    }


def final_response(spec: ResponseSpec) -> dict[str, Any]:
    """The non-streamed answer: status `completed`, the whole output, usage."""
    output: list[dict[str, Any]] = []
    if spec.has_message:
        output.append(message_item(spec, "completed", "".join(spec.chunks)))
    output.extend(
        function_call_item(spec, index, call, "completed", call.arguments)
        for index, call in enumerate(spec.tool_calls)
    )
    tokens = output_tokens(spec.chunks, spec.tool_calls)
    return response_object(
        spec, "completed", output, usage=usage(spec.input_tokens, tokens, spec.reasoning_tokens)
    )


Event = dict[str, Any]


def _complete_stream(spec: ResponseSpec) -> list[Event]:
    """The events of a response that runs to its end, not yet numbered."""
    events: list[Event] = [
        {"type": "response.created", "response": response_object(spec, "in_progress", [])},
        {"type": "response.in_progress", "response": response_object(spec, "in_progress", [])},
    ]
    output_index = 0
    if spec.has_message:
        item_id = spec.message_id()
        where = {"item_id": item_id, "output_index": output_index, "content_index": 0}
        events.append(
            {
                "type": "response.output_item.added",
                "output_index": output_index,
                "item": message_item(spec, "in_progress", None),
            }
        )
        events.append({"type": "response.content_part.added", **where, "part": text_part("")})
        events.extend(
            {"type": "response.output_text.delta", **where, "delta": piece, "logprobs": []}
            for piece in spec.chunks
        )
        events.extend(_closing_message(spec, output_index, "".join(spec.chunks), "completed"))
        output_index += 1
    for index, call in enumerate(spec.tool_calls):
        events.append(
            {
                "type": "response.output_item.added",
                "output_index": output_index,
                "item": function_call_item(spec, index, call, "in_progress", ""),
            }
        )
        events.extend(
            {
                "type": "response.function_call_arguments.delta",
                "item_id": spec.call_item_id(index),
                "output_index": output_index,
                "delta": piece,
            }
            for piece in split_arguments(call.arguments)
        )
        events.extend(_closing_call(spec, output_index, index, call.arguments, "completed"))
        output_index += 1
    events.append({"type": "response.completed", "response": final_response(spec)})
    return events


def is_delta(event: Mapping[str, Any]) -> bool:
    """A content event: text or arguments (what `after_chunks` and `delay_per_chunk` count)."""
    return str(event["type"]).endswith(".delta")


def _closing_message(spec: ResponseSpec, output_index: int, text: str, status: str) -> list[Event]:
    where = {"item_id": spec.message_id(), "output_index": output_index, "content_index": 0}
    return [
        {"type": "response.output_text.done", **where, "text": text, "logprobs": []},
        {"type": "response.content_part.done", **where, "part": text_part(text)},
        {
            "type": "response.output_item.done",
            "output_index": output_index,
            "item": message_item(spec, status, text),
        },
    ]


def _closing_call(
    spec: ResponseSpec, output_index: int, index: int, arguments: str, status: str
) -> list[Event]:
    call = spec.tool_calls[index]
    return [
        {
            "type": "response.function_call_arguments.done",
            "item_id": spec.call_item_id(index),
            "output_index": output_index,
            "name": call.name,
            "arguments": arguments,
        },
        {
            "type": "response.output_item.done",
            "output_index": output_index,
            "item": function_call_item(spec, index, call, status, arguments),
        },
    ]


def _output_so_far(events: Sequence[Event]) -> tuple[list[Event], list[int]]:
    """The output items as the events so far built them, and the indexes still open."""
    items: dict[int, Event] = {}
    open_indexes: list[int] = []
    for event in events:
        kind, index = event["type"], event.get("output_index", -1)
        if kind == "response.output_item.added":
            items[index] = copy.deepcopy(event["item"])
            open_indexes.append(index)
        elif kind == "response.content_part.added":
            items[index]["content"].append(copy.deepcopy(event["part"]))
        elif kind == "response.output_text.delta":
            items[index]["content"][event["content_index"]]["text"] += event["delta"]
        elif kind == "response.function_call_arguments.delta":
            items[index]["arguments"] += event["delta"]
        elif kind == "response.output_item.done":
            items[index] = copy.deepcopy(event["item"])
            open_indexes.remove(index)
    return [items[index] for index in sorted(items)], open_indexes


def _close_as_incomplete(spec: ResponseSpec, item: Event, output_index: int) -> list[Event]:
    if item["type"] == "message":
        # A cut falls right after a delta, so an open message has its one part.
        text = item["content"][0]["text"]
        return _closing_message(spec, output_index, text, "incomplete")
    index = int(item["id"].rsplit("_", 1)[1])
    return _closing_call(spec, output_index, index, item["arguments"], "incomplete")


def stream_events(
    spec: ResponseSpec,
    *,
    ending: str,
    after_chunks: int | None,
    error: Mapping[str, Any] | None = None,
    error_shape: str = "nested",
) -> list[Event]:
    """Every event of a streamed response, numbered from 0, for a scripted ending.

    `error_event`, `failed` and `incomplete` come right after the `after_chunks`-th delta (text
    and argument deltas both count; none given: after the whole answer, items closed) and end
    as the API does: an `error` event; `response.failed` with the items as far as they got; or
    the open items closed as `incomplete` and `response.incomplete` with
    `incomplete_details.reason: max_output_tokens`. Every other ending gets the complete
    stream, up to `response.completed` (the plan cuts the bytes for close, reset, stall)."""
    events = _complete_stream(spec)
    if ending in SEMANTIC_ENDINGS:
        events.pop()  # response.completed
        if after_chunks is not None:
            events = events[: cut_after(events, after_chunks)]
        output, open_indexes = _output_so_far(events)
        deltas = sum(1 for event in events if is_delta(event))
        tokens = usage(spec.input_tokens, deltas, spec.reasoning_tokens)
        if ending == "error_event":
            events.append(error_event(error, error_shape))
        elif ending == "failed":
            failure = {"code": "server_error", "message": DEFAULT_ERROR_MESSAGE}
            failure.update({k: v for k, v in (error or {}).items() if k in ("code", "message")})
            failed = response_object(spec, "failed", output, usage=tokens, error=failure)
            events.append({"type": "response.failed", "response": failed})
        else:
            for index in open_indexes:
                events.extend(_close_as_incomplete(spec, output[index], index))
            output, _ = _output_so_far(events)
            details = {"reason": "max_output_tokens"}
            incomplete = response_object(
                spec, "incomplete", output, usage=tokens, incomplete_details=details
            )
            events.append({"type": "response.incomplete", "response": incomplete})
    return [_numbered(event, number) for number, event in enumerate(events)]


def cut_after(events: Sequence[Event], deltas: int) -> int:
    """How many events to keep so that the last kept one is the `deltas`-th delta (0: just the
    opening two; more deltas than there are: all)."""
    if deltas == 0:
        return 2
    seen = 0
    for position, event in enumerate(events):
        if is_delta(event):
            seen += 1
            if seen == deltas:
                return position + 1
    return len(events)


def _numbered(event: Event, number: int) -> Event:
    # Key order as each event is sent: the flat error puts sequence_number last, every other
    # event right after its type.
    if event["type"] == "error" and "error" not in event:
        return {**event, "sequence_number": number}
    kind, *rest = event.items()
    return {kind[0]: kind[1], "sequence_number": number, **dict(rest)}


def error_event(error: Mapping[str, Any] | None, shape: str) -> Event:
    """The `error` event without its sequence number: production's nested shape, or the
    documented flat one (WIRE.md)."""
    fields: dict[str, Any] = {
        "type": "server_error",
        "code": "server_error",
        "message": DEFAULT_ERROR_MESSAGE,
        "param": None,
    }
    fields.update(error or {})
    if shape == "flat":
        fields.pop("type")
        return {"type": "error", **fields}
    return {"type": "error", "error": fields}
