"""The fixed upstream answers and the request every load generator sends (same for all targets)."""

from __future__ import annotations

import json

MODEL = "gpt-4o-mini-2024-07-18"
COMPLETION_ID = "chatcmpl-bench0000000000000000000000"

PLAIN_PATH = "/v1/chat/completions"  # a ~1 KB chat.completion, Content-Length
STREAM_PATH = "/v1/sse/chat/completions"  # 50 chat.completion.chunk events + [DONE], Content-Length
SLOW_PATH = "/v1/slow/chat/completions"  # 20 events 100 ms apart, chunked (Python upstream only)

SLOW_EVENTS = 20
SLOW_INTERVAL_S = 0.1

REQUEST_BODY = (
    b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Say hi"}],"max_tokens":16}'
)
REQUEST_HEADERS = (
    ("Content-Type", "application/json"),
    ("Authorization", "Bearer sk-bench-client"),
    ("User-Agent", "llmproxy-bench"),
)

COMPLETION = json.dumps(
    {
        "id": COMPLETION_ID,
        "object": "chat.completion",
        "created": 1700000000,
        "model": MODEL,
        "system_fingerprint": "fp_bench0000",
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": (
                        "This is a fixed benchmark answer of roughly one kilobyte. " * 11
                    ).strip(),
                    "refusal": None,
                },
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {
            "prompt_tokens": 12,
            "completion_tokens": 140,
            "total_tokens": 152,
            "prompt_tokens_details": {"cached_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 0},
        },
    },
    separators=(",", ":"),
).encode()


def _chunk(delta: dict[str, str], finish: str | None = None) -> bytes:
    event = {
        "id": COMPLETION_ID,
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": MODEL,
        "system_fingerprint": "fp_bench0000",
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
    }
    return b"data: " + json.dumps(event, separators=(",", ":")).encode() + b"\n\n"


def sse_events(n: int) -> list[bytes]:
    """n `data:` events: a role chunk, content chunks, a finish chunk, then `[DONE]`."""
    events = [_chunk({"role": "assistant", "content": ""})]
    events += [_chunk({"content": f"word{i} "}) for i in range(1, n - 2)]
    events.append(_chunk({}, "stop"))
    events.append(b"data: [DONE]\n\n")
    return events


STREAM = b"".join(sse_events(50))
SLOW_STREAM_EVENTS = sse_events(SLOW_EVENTS)

if __name__ == "__main__":
    print(len(COMPLETION), len(STREAM), STREAM.count(b"data: "), len(SLOW_STREAM_EVENTS))
