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
import zlib

from llmproxy.usage import INFLATED_ENCODINGS, window_bits

INJECTED_PATHS = frozenset({b"/v1/chat/completions", b"/v1/completions"})
# A blank line: two line ends, each CRLF, LF or CR (WHATWG HTML §9.2.5), a CR not the start of
# a CRLF. A CR at the end of a read may be one: see `UsageChunkRemover._after_cr`.
_EVENT_END = re.compile(rb"(?:\r\n|\n|\r(?!\n))(?:\r\n|\n|\r(?!\n))")
_NULL_USAGE = re.compile(rb',\s*"usage"\s*:\s*null|"usage"\s*:\s*null\s*,?')


def request_with_usage(body: bytes) -> bytes | None:
    """The body asking for usage, or None when it needs no change (not a stream, already
    asking, or not a JSON object: the upstream answers that as it would).

    Also None for JSON that Python cannot write back as the same request: nested deeper than
    the recursion limit (json raises RecursionError), `NaN`/`Infinity` (not JSON), a number
    beyond a float (read as inf), a lone surrogate escape (no UTF-8 for it). Re-encoding those
    would answer the client with a 500 or send the upstream something it did not send.
    """
    try:
        request = json.loads(body, parse_constant=_not_json)
    except (ValueError, RecursionError):
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
    try:
        encoded = json.dumps(request, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
        return encoded.encode()
    except (ValueError, RecursionError):  # inf from a huge number; UnicodeEncodeError
        return None


def _not_json(constant: str) -> object:
    raise ValueError(f"{constant} is not JSON")


class UsageChunkRemover:
    """Removes from an SSE stream what only the injected `include_usage` added.

    Events are held until complete (a chunk may end inside one); an event is dropped when its
    data is a chunk with no choices and a usage object, and `"usage": null` is cut from the
    others. Everything else passes byte for byte.
    """

    __slots__ = ("_after_cr", "_partial")

    def __init__(self) -> None:
        self._partial = b""
        # The last read ended an event on a CR: if the next starts with LF, that LF ends the
        # same blank line (CRLF) and goes the way its event went (b"\n" kept, b"" dropped).
        self._after_cr: bytes | None = None

    def feed(self, chunk: bytes) -> bytes:
        if not chunk:
            return b""
        lead = b""
        if self._after_cr is not None:
            if chunk.startswith(b"\n"):
                lead, chunk = self._after_cr, chunk[1:]
            self._after_cr = None
        data = self._partial + chunk if self._partial else chunk
        ends = list(_EVENT_END.finditer(data))
        if not ends:
            self._partial = data
            return lead
        cut = ends[-1].end()
        self._partial = data[cut:]
        out: list[bytes] = [lead]
        start = 0
        kept = True
        for end in ends:
            event = data[start : end.end()]
            start = end.end()
            if event.find(b'"usage"') == -1:  # (`find`: bytes `in` builds a TypeError)
                kept = True
                out.append(event)
            elif _is_usage_only(event):
                kept = False
            else:
                kept = True
                out.append(_NULL_USAGE.sub(b"", event))
        if cut == len(data) and data.endswith(b"\r"):
            self._after_cr = b"\n" if kept else b""
        return b"".join(out)

    def flush(self) -> bytes:
        """What is left at the end of the stream (an event without its blank line)."""
        rest, self._partial = self._partial, b""
        self._after_cr = None
        return rest


class InflatingUsageChunkRemover:
    """The remover of a gzip- or deflate-coded stream: inflated, then cleaned. The client gets
    the stream decoded (the forwarder drops its Content-Encoding): removing bytes from inside a
    compressed stream is not possible, and passing it on would show the client what it did not
    ask for."""

    __slots__ = ("_head", "_inflater", "_remover")

    def __init__(self) -> None:
        self._remover = UsageChunkRemover()
        self._inflater: zlib._Decompress | None = None
        self._head = b""  # the first bytes, until they tell gzip, zlib or raw deflate apart

    def feed(self, chunk: bytes) -> bytes:
        inflater = self._inflater
        if inflater is None:
            self._head += chunk
            if len(self._head) < 2:
                return b""
            inflater = self._inflater = zlib.decompressobj(window_bits(self._head))
            chunk, self._head = self._head, b""
        try:
            return self._remover.feed(inflater.decompress(chunk))
        except zlib.error as error:
            raise CodingError(f"the upstream's {error} in a compressed stream") from None

    def flush(self) -> bytes:
        rest = self._inflater.flush() if self._inflater is not None else self._head
        return self._remover.feed(rest) + self._remover.flush()


class CodingError(ValueError):
    """A compressed stream that does not inflate."""


def remover_for(
    content_encoding: bytes | None,
) -> UsageChunkRemover | InflatingUsageChunkRemover | None:
    """The remover for a stream of this coding; None for one it cannot decode (br, zstd,
    several codings), which then passes on as it came, the usage chunk included."""
    coding = (content_encoding or b"identity").strip().lower()
    if coding == b"identity":
        return UsageChunkRemover()
    if coding in INFLATED_ENCODINGS:
        return InflatingUsageChunkRemover()
    return None


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
