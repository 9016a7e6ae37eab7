"""One log line per forwarded request: what happened, how long it took, how it ended.

The record is filled in by the forwarder as the exchange goes; formatting is a pure function.
Nothing in it can hold a secret: no header values, no bodies, no upstream URL credentials.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TextIO, TypeVar

logger = logging.getLogger("llmproxy.access")

# How an exchange ended.
COMPLETE = "complete"
CLIENT_DISCONNECT = "client_disconnect"
CLIENT_TIMEOUT = "client_timeout"  # closed by client_header_timeout / client_body_timeout
UPSTREAM_ERROR = "upstream_error"
PROXY_ERROR = "proxy_error"
# Whether the answer's token usage is known (RequestRecord.usage).
USAGE_KNOWN = "known"
USAGE_UNKNOWN = "unknown"
# Why it is not: the answer was whole but named none (a stream without `include_usage`), the
# client left first, the upstream failed mid-answer.
NOT_REPORTED = "not_reported"

# How a WebSocket session ended, besides CLIENT_DISCONNECT, UPSTREAM_ERROR and PROXY_ERROR.
CLIENT_CLOSED = "client_closed"  # the client sent a close frame
UPSTREAM_CLOSED = "upstream_closed"  # the upstream sent a close frame
UPSTREAM_REFUSED = "upstream_refused"  # the upstream answered the handshake with a non-101
MESSAGE_TOO_BIG = "message_too_big"  # a message over max_ws_message_bytes (1009 to its sender)
SHUTDOWN = "shutdown"  # still open at the drain deadline (1001 both ways)


@dataclass(slots=True)
class RequestRecord:
    """What the log line of one request reports."""

    method: str
    path: str
    request_id: str = ""
    key: str = "-"  # the access key's name (never the key), "-" without access keys
    status: int | None = None
    upstream_status: int | None = None
    attempts: int = 0
    # Requests sent again on a new connection because a reused one closed before answering
    # (the upstream client's own retry, not one of the attempts).
    stale_retries: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    upstream_headers_ms: float | None = None
    first_byte_ms: float | None = None
    total_ms: float | None = None
    ending: str = COMPLETE
    # Token usage the answer reported (DESIGN §11); `usage` is "unknown" when an answer that
    # should report it did not (then `usage_unknown_reason` says why), None when none is due.
    usage: str | None = None
    # (model, input, output, cached input, reasoning tokens): a `usage.Usage` when known.
    tokens: tuple[str | None, int, int, int, int] | None = None
    usage_unknown_reason: str | None = None


@dataclass(slots=True)
class SessionRecord:
    """What the log line of one WebSocket session reports (one line when it ends)."""

    path: str
    request_id: str = ""
    key: str = "-"
    status: int | None = None  # 101, or the refusal's status
    upstream_status: int | None = None
    attempts: int = 0
    messages_to_upstream: int = 0
    bytes_to_upstream: int = 0
    messages_to_client: int = 0
    bytes_to_client: int = 0
    # The close code each side sent, or received from the proxy; 1006: lost without one.
    client_close_code: int | None = None
    upstream_close_code: int | None = None
    total_ms: float | None = None
    ending: str = PROXY_ERROR
    # The tokens of every `response.done` (Realtime), summed; as in RequestRecord.
    usage: str | None = None
    tokens: tuple[str | None, int, int, int, int] | None = None
    usage_unknown_reason: str | None = None


def format_session_text(record: SessionRecord) -> str:
    """A readable line: `WS /v1/realtime 101 ... client_close=1000 ... ending=client_closed`."""
    total = "-" if record.total_ms is None else f"{record.total_ms:.1f}ms"
    return (
        f"{record.request_id} WS {record.path} {record.status or '-'}"
        f" upstream={record.upstream_status or '-'} attempts={record.attempts}"
        f" to_upstream={record.messages_to_upstream}msg/{record.bytes_to_upstream}B"
        f" to_client={record.messages_to_client}msg/{record.bytes_to_client}B"
        f" client_close={record.client_close_code or '-'}"
        f" upstream_close={record.upstream_close_code or '-'}"
        f" total={total} ending={record.ending} key={record.key}" + _usage_text(record)
    )


def format_session_json(record: SessionRecord) -> str:
    """The session's record as one compact JSON object, `"kind": "websocket"` first."""
    return json.dumps({"kind": "websocket", **_flat_fields(record)}, separators=(",", ":"))


def format_text(record: RequestRecord) -> str:
    """A readable line: `POST /v1/chat/completions 200 ... ending=complete`."""

    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value:.1f}ms"

    return (
        f"{record.request_id} {record.method} {record.path} {record.status or '-'}"
        f" upstream={record.upstream_status or '-'} attempts={record.attempts}"
        f" stale_retries={record.stale_retries}"
        f" in={record.bytes_in}B out={record.bytes_out}B"
        f" headers={ms(record.upstream_headers_ms)} ttfb={ms(record.first_byte_ms)}"
        f" total={ms(record.total_ms)} ending={record.ending} key={record.key}"
        + _usage_text(record)
    )


TOKEN_FIELDS = ("model", "input_tokens", "output_tokens", "cached_input_tokens", "reasoning_tokens")


def _usage_text(record: RequestRecord | SessionRecord) -> str:
    if record.tokens is not None:
        model, input_tokens, output_tokens, cached, reasoning = record.tokens
        return (
            f" model={model or '-'} input_tokens={input_tokens} output_tokens={output_tokens}"
            f" cached_input_tokens={cached} reasoning_tokens={reasoning}"
        )
    if record.usage == USAGE_UNKNOWN:
        return f" usage=unknown usage_unknown_reason={record.usage_unknown_reason}"
    return ""


def format_json(record: RequestRecord) -> str:
    """The record as one compact JSON object (the token counts as fields of their own)."""
    return json.dumps(_flat_fields(record), separators=(",", ":"))


def _flat_fields(record: RequestRecord | SessionRecord) -> dict[str, object]:
    fields = asdict(record)
    tokens = fields.pop("tokens")
    fields.update(zip(TOKEN_FIELDS, tokens or (None,) * len(TOKEN_FIELDS), strict=True))
    return fields


_Record = TypeVar("_Record", RequestRecord, SessionRecord)


def log_request(record: _Record, formatter: Callable[[_Record], str]) -> None:
    """Emit the request's line at INFO (the formatting is skipped when INFO is off).

    The LogRecord is made directly: `logger.info` would look up the caller's source line on
    every request, a cost the profile showed and nobody reads for an access line.
    """
    if logger.isEnabledFor(logging.INFO):
        logger.handle(
            logger.makeRecord(logger.name, logging.INFO, __file__, 0, formatter(record), (), None)
        )


def flush_request_log() -> None:
    """Write out the request lines still buffered (at shutdown: the process may exit by signal)."""
    for handler in logger.handlers:
        handler.flush()


class BufferedLineHandler(logging.StreamHandler[TextIO]):
    """A StreamHandler that writes its lines in batches instead of one write and flush each.

    Inside an event loop, lines wait at most `flush_delay` seconds (or until `flush_bytes` have
    gathered), so a busy proxy makes a few write system calls a second instead of one per
    request (issue 6). Outside a loop, and at close, every line is written at once. Nothing is
    dropped: the app's shutdown and `logging.shutdown()` flush what is pending.
    """

    def __init__(
        self, stream: TextIO | None = None, flush_delay: float = 0.1, flush_bytes: int = 65536
    ) -> None:
        super().__init__(stream)
        self.flush_delay = flush_delay
        self.flush_bytes = flush_bytes
        self._pending: list[str] = []
        self._pending_bytes = 0
        self._flush_scheduled = False

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:
            self.handleError(record)
            return
        self._pending.append(line)  # `handle` holds the handler's lock around `emit`
        self._pending_bytes += len(line) + 1
        if self._pending_bytes >= self.flush_bytes:
            self.flush()
            return
        if self._flush_scheduled:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop in this thread: nobody would run a later flush
            self.flush()
            return
        self._flush_scheduled = True
        loop.call_later(self.flush_delay, self.flush)

    def flush(self) -> None:
        self.acquire()
        try:
            self._flush_scheduled = False
            if self._pending:
                text = "\n".join(self._pending) + "\n"
                self._pending.clear()
                self._pending_bytes = 0
                try:
                    self.stream.write(text)
                except Exception:
                    return  # a closed or broken stream must not break the request path
            super().flush()
        finally:
            self.release()

    def close(self) -> None:
        self.flush()
        super().close()
