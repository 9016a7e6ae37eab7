"""One log line per forwarded request: what happened, how long it took, how it ended.

The record is filled in by the forwarder as the exchange goes; formatting is a pure function.
Nothing in it can hold a secret: no header values, no bodies, no upstream URL credentials.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass

logger = logging.getLogger("llmproxy.access")

# How an exchange ended.
COMPLETE = "complete"
CLIENT_DISCONNECT = "client_disconnect"
UPSTREAM_ERROR = "upstream_error"
PROXY_ERROR = "proxy_error"


@dataclass(slots=True)
class RequestRecord:
    """What the log line of one request reports."""

    method: str
    path: str
    request_id: str = ""
    status: int | None = None
    upstream_status: int | None = None
    attempts: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    upstream_headers_ms: float | None = None
    first_byte_ms: float | None = None
    total_ms: float | None = None
    ending: str = COMPLETE


def format_text(record: RequestRecord) -> str:
    """A readable line: `POST /v1/chat/completions 200 ... ending=complete`."""

    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value:.1f}ms"

    return (
        f"{record.request_id} {record.method} {record.path} {record.status or '-'}"
        f" upstream={record.upstream_status or '-'} attempts={record.attempts}"
        f" in={record.bytes_in}B out={record.bytes_out}B"
        f" headers={ms(record.upstream_headers_ms)} ttfb={ms(record.first_byte_ms)}"
        f" total={ms(record.total_ms)} ending={record.ending}"
    )


def format_json(record: RequestRecord) -> str:
    """The record as one compact JSON object."""
    return json.dumps(asdict(record), separators=(",", ":"))


def log_request(record: RequestRecord, formatter: Callable[[RequestRecord], str]) -> None:
    """Emit the request's line at INFO (the formatting is skipped when INFO is off).

    The LogRecord is made directly: `logger.info` would look up the caller's source line on
    every request, a cost the profile showed and nobody reads for an access line.
    """
    if logger.isEnabledFor(logging.INFO):
        logger.handle(
            logger.makeRecord(logger.name, logging.INFO, __file__, 0, formatter(record), (), None)
        )
