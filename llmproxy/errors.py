"""Errors the proxy itself produces, in the OpenAI error shape (DESIGN §5).

Messages are fixed strings chosen here, never text from an exception that might quote a header
or a URL, so no secret can reach a client through them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ProxyError:
    """An error answered by the proxy itself rather than passed through from the upstream."""

    status: int
    code: str
    message: str
    type: str = "proxy_error"

    def body(self) -> bytes:
        """`{"error": {"message", "type", "param": null, "code"}}` as compact JSON bytes."""
        return openai_error_body(self.message, self.type, self.code)


def openai_error_body(message: str, type_: str, code: str) -> bytes:
    """The OpenAI error object as JSON bytes."""
    error = {"error": {"message": message, "type": type_, "param": None, "code": code}}
    return json.dumps(error, separators=(",", ":")).encode()


UPSTREAM_UNREACHABLE = ProxyError(
    502, "upstream_unreachable", "The upstream could not be reached.", "upstream_error"
)
UPSTREAM_CONNECT_TIMEOUT = ProxyError(
    502,
    "upstream_unreachable",
    "The upstream could not be reached: connecting timed out.",
    "upstream_error",
)
UPSTREAM_BAD_RESPONSE = ProxyError(
    502,
    "upstream_bad_response",
    "The upstream sent a response that is not valid HTTP.",
    "upstream_error",
)
UPSTREAM_CONNECTION_CLOSED = ProxyError(
    502,
    "upstream_connection_closed",
    "The upstream closed the connection before sending a response.",
    "upstream_error",
)
UPSTREAM_TIMEOUT = ProxyError(
    504,
    "upstream_timeout",
    "The upstream sent no response headers within the read timeout.",
    "upstream_error",
)
UPSTREAM_HANDSHAKE_TIMEOUT = ProxyError(
    504,
    "upstream_timeout",
    "The upstream sent no answer to the WebSocket handshake within the read timeout.",
    "upstream_error",
)
UPSTREAM_BAD_HANDSHAKE = ProxyError(
    502,
    "upstream_bad_response",
    "The upstream's answer to the WebSocket handshake is not valid.",
    "upstream_error",
)


def upstream_proxy_error(detail: str) -> ProxyError:
    """The egress proxy refused or could not be reached; `detail` names it, never credentials."""
    return ProxyError(
        502, "upstream_proxy_error", f"The egress proxy failed: {detail}.", "upstream_error"
    )


NOT_FOUND = ProxyError(
    404,
    "not_found",
    "Not found: the proxy serves the OpenAI API under /v1/.",
    "invalid_request_error",
)
METHOD_NOT_ALLOWED = ProxyError(
    405, "method_not_allowed", "Method not allowed on this path.", "invalid_request_error"
)
INVALID_PATH = ProxyError(
    400,
    "invalid_path",
    "The request path contains '.' or '..' segments, which the proxy does not forward.",
    "invalid_request_error",
)
INVALID_HEADER = ProxyError(
    400,
    "invalid_header",
    "A request header or the path holds a line break, so it cannot be forwarded.",
    "invalid_request_error",
)
INVALID_PROXY_KEY = ProxyError(
    401,
    "invalid_proxy_key",
    "Missing or invalid proxy access key: send it as 'Authorization: Bearer <key>' or 'x-api-key'.",
    "invalid_request_error",
)
REQUEST_TOO_LARGE = ProxyError(
    413,
    "request_too_large",
    "The request body is larger than the proxy accepts.",
    "invalid_request_error",
)
PROXY_OVERLOADED = ProxyError(
    503,
    "proxy_overloaded",
    "The proxy is at its limit of concurrent requests; try again.",
)
INTERNAL_ERROR = ProxyError(500, "internal_error", "The proxy failed to handle the request.")

# The final event of a text/event-stream whose upstream failed mid-way (DESIGN §4.4).
STREAM_INTERRUPTED_EVENT = (
    b"data: "
    + openai_error_body(
        "The upstream stream was interrupted before it finished.",
        "upstream_error",
        "upstream_stream_interrupted",
    )
    + b"\n\n"
)
