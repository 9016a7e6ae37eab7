"""Reading server-sent events off a real response, with arrival times (shared by the e2e tests)."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx

# An event ends at the first blank line; SSE allows LF, CRLF and CR line endings.
_EVENT_END = re.compile(rb"\r\n\r\n|\n\n|\r\r")

CHAT_PATH = "/v1/chat/completions"


def chat_request(*, stream: bool = True, include_usage: bool = False) -> dict[str, Any]:
    """A minimal chat-completions request body."""
    body: dict[str, Any] = {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "Say hello"}],
        "stream": stream,
    }
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    return body


@dataclass(frozen=True)
class TimedEvent:
    """One complete event (its bytes up to and including the blank line) and when it arrived."""

    raw: bytes
    arrived_at: float

    @property
    def data(self) -> str:
        """The event's `data:` payload (lines joined by LF), as an SSE client sees it."""
        lines = re.split(rb"\r\n|\n|\r", self.raw)
        return "\n".join(
            line[5:].removeprefix(b" ").decode() for line in lines if line.startswith(b"data:")
        )

    def json(self) -> Any:
        return json.loads(self.data)


def split_events(body: bytes) -> list[bytes]:
    """Complete events in `body`, each with its terminating blank line; a trailing partial
    event is dropped."""
    events, start = [], 0
    for match in _EVENT_END.finditer(body):
        events.append(body[start : match.end()])
        start = match.end()
    return events


def iter_timed_events(response: httpx.Response) -> Iterator[TimedEvent]:
    """Yield each event as soon as its last byte has arrived, stamped with `time.time()`."""
    pending = b""
    for data in response.iter_raw():
        arrived_at = time.time()
        pending += data
        while match := _EVENT_END.search(pending):
            yield TimedEvent(pending[: match.end()], arrived_at)
            pending = pending[match.end() :]


def data_events(body: bytes) -> list[str]:
    """The `data:` payloads of every event in `body` that has one (comments skipped)."""
    payloads = [TimedEvent(raw, 0.0).data for raw in split_events(body)]
    return [payload for payload in payloads if payload]


def content_of(payloads: list[str]) -> str:
    """The assistant text carried by a chat stream's JSON chunks."""
    text = ""
    for payload in payloads:
        if payload == "[DONE]":
            continue
        for choice in json.loads(payload).get("choices", []):
            text += choice["delta"].get("content") or ""
    return text
