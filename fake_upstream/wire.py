"""OpenAI wire objects as pure functions: completions, chunks, embeddings, models, errors, headers.

Shapes and key order follow the real API as described in ../shared/WIRE.md and the `openai`
SDK's types. Nothing here does I/O; the app decides what to send, these say what it looks like.
"""

from __future__ import annotations

import base64
import hashlib
import json
import struct
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, Final

DEFAULT_CHUNKS: Final[tuple[str, ...]] = ("Hello", " from", " fake", " upstream", "!")
"""The default reply, streamed as these five content deltas; joined: `Hello from fake upstream!`."""

DEFAULT_MODEL: Final = "gpt-4o-mini"
SYSTEM_FINGERPRINT: Final = "fp_fake_upstream"
MODELS: Final[tuple[str, ...]] = ("gpt-4o-mini", "gpt-4o", "text-embedding-3-small")
EMBEDDING_DIMENSIONS: Final = 8


def compact_json(obj: object) -> str:
    """JSON as OpenAI streams it: no spaces, non-ASCII kept as UTF-8."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def pretty_json(obj: object) -> bytes:
    """JSON as OpenAI sends non-streamed bodies: indented by two spaces."""
    return json.dumps(obj, indent=2, ensure_ascii=False).encode()


def new_request_id() -> str:
    return f"req_{uuid.uuid4().hex}"


def new_completion_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now_created() -> int:
    return int(time.time())


def estimate_tokens(text: str) -> int:
    """Deterministic stand-in for a tokenizer: about four characters per token."""
    return max(1, len(text) // 4)


def content_texts(content: object) -> list[str]:
    """The text of a message's `content`: a string, or the `text` of each part of a list."""
    if isinstance(content, str):
        return [content]
    if isinstance(content, list):
        return [
            p["text"] for p in content if isinstance(p, Mapping) and isinstance(p.get("text"), str)
        ]
    return []


def prompt_text(request: Mapping[str, Any]) -> str:
    """All text a chat or completions request asks about, for the usage numbers."""
    parts: list[str] = []
    for message in request.get("messages") or []:
        if isinstance(message, Mapping):
            parts.extend(content_texts(message.get("content")))
    prompt = request.get("prompt")
    if isinstance(prompt, str):
        parts.append(prompt)
    elif isinstance(prompt, list):
        parts.extend(p for p in prompt if isinstance(p, str))
    return "\n".join(parts)


def usage(prompt_tokens: int, completion_tokens: int, reasoning_tokens: int = 0) -> dict[str, Any]:
    """Chat/completions usage. Reasoning tokens count in `completion_tokens`, as OpenAI bills
    them; the details objects appear only when there are some, so plain replies keep the
    short shape older models send."""
    completion_tokens += reasoning_tokens
    result: dict[str, Any] = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
    if reasoning_tokens:
        result["prompt_tokens_details"] = {"cached_tokens": 0, "audio_tokens": 0}
        result["completion_tokens_details"] = {
            "reasoning_tokens": reasoning_tokens,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        }
    return result


def output_tokens(chunks: Sequence[str], tool_calls: Sequence[FunctionCall]) -> int:
    """The stand-in token count of an answer, without reasoning: one per chunk, ~4 characters
    per token of tool-call arguments."""
    return len(chunks) + sum(estimate_tokens(call.arguments) for call in tool_calls)


def split_arguments(arguments: str) -> list[str]:
    """A tool call's arguments in the pieces a model streams them in: at least two (the SDKs
    must join fragments), about eight characters each."""
    if len(arguments) < 2:
        return [arguments, ""]
    size = min(8, len(arguments) // 2)
    return [arguments[i : i + size] for i in range(0, len(arguments), size)]


@dataclass(frozen=True, slots=True)
class FunctionCall:
    """A tool call as the wire shows it: its call id resolved."""

    call_id: str
    name: str
    arguments: str


# --- chat completions -------------------------------------------------------------------------


def chat_tool_call(call: FunctionCall) -> dict[str, Any]:
    return {
        "id": call.call_id,
        "type": "function",
        "function": {"name": call.name, "arguments": call.arguments},
    }


def chat_completion(
    *,
    id: str,
    created: int,
    model: str,
    content: str | None,
    finish_reason: str,
    usage: dict[str, Any],
    tool_calls: Sequence[FunctionCall] = (),
) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": content, "refusal": None}
    if tool_calls:
        message["tool_calls"] = [chat_tool_call(call) for call in tool_calls]
    return {
        "id": id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": message,
                "logprobs": None,
                "finish_reason": finish_reason,
            }
        ],
        "usage": usage,
        "system_fingerprint": SYSTEM_FINGERPRINT,
    }


def chat_chunk_events(
    *,
    id: str,
    created: int,
    model: str,
    chunks: Iterable[str],
    finish_reason: str,
    include_usage: bool,
    usage: dict[str, Any],
    tool_calls: Sequence[FunctionCall] = (),
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The stream's events as (head, tail): head = role delta + one per content chunk, then
    each tool call's fragments (WIRE.md, "Chat tool calls"); tail = the `finish_reason` chunk
    and, with include_usage, the usage chunk."""

    def chunk(delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
        event: dict[str, Any] = {
            "id": id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "system_fingerprint": SYSTEM_FINGERPRINT,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }
        if include_usage:
            event["usage"] = None
        return event

    chunks = list(chunks)
    # A reply that is only tool calls opens with `content: null`, as the API sends it.
    opening = "" if chunks or not tool_calls else None
    head = [chunk({"role": "assistant", "content": opening, "refusal": None}, None)]
    head.extend(chunk({"content": text}, None) for text in chunks)
    for index, call in enumerate(tool_calls):
        first = {
            "index": index,
            "id": call.call_id,
            "type": "function",
            "function": {"name": call.name, "arguments": ""},
        }
        head.append(chunk({"tool_calls": [first]}, None))
        head.extend(
            chunk({"tool_calls": [{"index": index, "function": {"arguments": piece}}]}, None)
            for piece in split_arguments(call.arguments)
        )
    tail = [chunk({}, finish_reason)]
    if include_usage:
        final = chunk({}, None)
        final["choices"] = []
        final["usage"] = usage
        tail.append(final)
    return head, tail


# --- legacy completions -----------------------------------------------------------------------


def text_completion(
    *, id: str, created: int, model: str, text: str, finish_reason: str, usage: dict[str, Any]
) -> dict[str, Any]:
    return {
        "id": id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish_reason}],
        "usage": usage,
        "system_fingerprint": SYSTEM_FINGERPRINT,
    }


def text_chunk_events(
    *,
    id: str,
    created: int,
    model: str,
    chunks: Iterable[str],
    finish_reason: str,
    include_usage: bool,
    usage: dict[str, Any],
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Like `chat_chunk_events` for `/v1/completions` (no role delta in this API)."""

    def chunk(text: str, finish: str | None) -> dict[str, Any]:
        event: dict[str, Any] = {
            "id": id,
            "object": "text_completion",
            "created": created,
            "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}],
            "model": model,
            "system_fingerprint": SYSTEM_FINGERPRINT,
        }
        if include_usage:
            event["usage"] = None
        return event

    head = [chunk(text, None) for text in chunks]
    tail = [chunk("", finish_reason)]
    if include_usage:
        final = chunk("", None)
        final["choices"] = []
        final["usage"] = usage
        tail.append(final)
    return head, tail


# --- embeddings and models --------------------------------------------------------------------


def embedding_vector(text: str) -> list[float]:
    """A deterministic unit-ish vector derived from the input's hash."""
    digest = hashlib.sha256(text.encode()).digest()
    return [round((byte - 127.5) / 127.5, 6) for byte in digest[:EMBEDDING_DIMENSIONS]]


def embeddings_list(request: Mapping[str, Any]) -> dict[str, Any]:
    raw_input = request.get("input", "")
    inputs = raw_input if isinstance(raw_input, list) else [raw_input]
    texts = [item if isinstance(item, str) else compact_json(item) for item in inputs]
    base64_format = request.get("encoding_format") == "base64"
    data = []
    for index, text in enumerate(texts):
        vector = embedding_vector(text)
        encoded: list[float] | str = (
            # The SDK asks for base64 by default: little-endian float32, as the real API sends.
            base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
            if base64_format
            else vector
        )
        data.append({"object": "embedding", "index": index, "embedding": encoded})
    prompt_tokens = sum(estimate_tokens(text) for text in texts)
    return {
        "object": "list",
        "data": data,
        "model": request.get("model") or "text-embedding-3-small",
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    }


def models_list() -> dict[str, Any]:
    return {
        "object": "list",
        "data": [
            {"id": name, "object": "model", "created": 1_700_000_000, "owned_by": "system"}
            for name in MODELS
        ],
    }


# --- errors and headers -----------------------------------------------------------------------

_ERROR_TYPES: Final[Mapping[int, tuple[str, str | None]]] = {
    400: ("invalid_request_error", None),
    401: ("invalid_request_error", "invalid_api_key"),
    403: ("invalid_request_error", "unsupported_country_region_territory"),
    404: ("invalid_request_error", None),
    409: ("invalid_request_error", None),
    429: ("requests", "rate_limit_exceeded"),
    500: ("server_error", None),
    502: ("server_error", None),
    503: ("server_error", None),
}


def error_object(status: int, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """`{"error": {...}}` for a status, OpenAI-style; `overrides` replaces any of its fields."""
    error_type, code = _ERROR_TYPES.get(
        status, ("server_error" if status >= 500 else "invalid_request_error", None)
    )
    if status >= 500:
        message = "The server had an error while processing your request. Sorry about that!"
    else:
        message = f"{HTTPStatus(status).phrase} (scripted by fake_upstream)"
    error: dict[str, Any] = {"message": message, "type": error_type, "param": None, "code": code}
    error.update(overrides or {})
    return {"error": error}


def request_error(
    message: str, *, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    """A 4xx body for a request the fake itself refuses."""
    return {
        "error": {
            "message": message,
            "type": "invalid_request_error",
            "param": param,
            "code": code,
        }
    }


def default_response_headers(request_id: str, processing_ms: int) -> list[tuple[str, str]]:
    """Headers every real `/v1` response carries (WIRE.md, "Response headers")."""
    return [
        ("openai-organization", "user-fake-upstream"),
        ("openai-processing-ms", str(processing_ms)),
        ("openai-version", "2020-10-01"),
        ("x-ratelimit-limit-requests", "10000"),
        ("x-ratelimit-limit-tokens", "30000000"),
        ("x-ratelimit-remaining-requests", "9999"),
        ("x-ratelimit-remaining-tokens", "29999990"),
        ("x-ratelimit-reset-requests", "6ms"),
        ("x-ratelimit-reset-tokens", "0s"),
        ("x-request-id", request_id),
    ]


def merge_headers(
    defaults: Iterable[tuple[str, str]], scripted: Iterable[tuple[str, str]]
) -> list[tuple[str, str]]:
    """Scripted headers replace every default of the same name (case-insensitive)."""
    scripted = list(scripted)
    replaced = {name.lower() for name, _ in scripted}
    return [(n, v) for n, v in defaults if n.lower() not in replaced] + scripted
