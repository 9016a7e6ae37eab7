"""Opt-in usage injection (`usage_injection`, DESIGN §11): the one setting that changes bytes.

A streamed chat or completions request that did not ask for usage
(`stream_options.include_usage`) is sent upstream asking for it, so the proxy can count its
tokens; what goes back to the client is what it asked for: the usage-only chunk (no choices,
a usage object) is removed, and so is the `"usage": null` the upstream then adds to every
other chunk. LiteLLM and Envoy AI Gateway do the same (litellm PR #35290, envoyproxy/ai-gateway
PR #936). The request body is re-encoded as compact JSON when it is changed.
"""

from __future__ import annotations

import json
import re

INJECTED_PATHS = frozenset({b"/v1/chat/completions", b"/v1/completions"})
_EVENT_END = re.compile(rb"\r?\n\r?\n")
_NULL_USAGE = re.compile(rb',\s*"usage"\s*:\s*null|"usage"\s*:\s*null\s*,?')


def request_with_usage(body: bytes) -> bytes | None:
    """The body asking for usage, or None when it needs no change (not a stream, already
    asking, or not a JSON object: the upstream answers that as it would)."""
    try:
        request = json.loads(body)
    except ValueError:
        return None
    if not isinstance(request, dict) or request.get("stream") is not True:
        return None
    options = request.get("stream_options")
    if options is None:
        options = request["stream_options"] = {}
    elif not isinstance(options, dict):
        return None
    if options.get("include_usage") is True:
        return None
    options["include_usage"] = True
    return json.dumps(request, separators=(",", ":"), ensure_ascii=False).encode()


class UsageChunkRemover:
    """Removes from an SSE stream what only the injected `include_usage` added.

    Events are held until complete (a chunk may end inside one); an event is dropped when its
    data is a chunk with no choices and a usage object, and `"usage": null` is cut from the
    others. Everything else passes byte for byte.
    """

    __slots__ = ("_partial",)

    def __init__(self) -> None:
        self._partial = b""

    def feed(self, chunk: bytes) -> bytes:
        data = self._partial + chunk if self._partial else chunk
        ends = list(_EVENT_END.finditer(data))
        if not ends:
            self._partial = data
            return b""
        cut = ends[-1].end()
        self._partial = data[cut:]
        out: list[bytes] = []
        start = 0
        for end in ends:
            event = data[start : end.end()]
            start = end.end()
            if b'"usage"' not in event:
                out.append(event)
            elif not _is_usage_only(event):
                out.append(_NULL_USAGE.sub(b"", event))
        return b"".join(out)

    def flush(self) -> bytes:
        """What is left at the end of the stream (an event without its blank line)."""
        rest, self._partial = self._partial, b""
        return rest


def _is_usage_only(event: bytes) -> bool:
    payload = b"".join(
        line[5:].lstrip(b" ") for line in event.splitlines() if line.startswith(b"data:")
    )
    try:
        chunk = json.loads(payload)
    except ValueError:
        return False
    return (
        isinstance(chunk, dict)
        and chunk.get("choices") == []
        and isinstance(chunk.get("usage"), dict)
    )
