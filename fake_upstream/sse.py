"""Server-sent event framing, byte for byte as OpenAI writes it: `data: <json>\\n\\n`, or
`event: <type>\\ndata: <json>\\n\\n` on Responses streams."""

from __future__ import annotations

from typing import Final

from sse_starlette import ServerSentEvent

LF: Final = "\n"
CRLF: Final = "\r\n"

DONE: Final = "[DONE]"
MALFORMED_EVENT: Final = b"data: {not json\n\n"


def encode_event(data: str, sep: str = LF, event: str | None = None) -> bytes:
    """One `data:` event, after an `event:` line when `event` is given (the Responses API
    names every event); `sep` is the line ending (OpenAI uses LF; CRLF is a scripted variant)."""
    return ServerSentEvent(data=data, event=event, sep=sep).encode()


def encode_comment(text: str, sep: str = LF) -> bytes:
    """A comment line such as `: ping`, which SSE clients must ignore."""
    return ServerSentEvent(comment=text, sep=sep).encode()
