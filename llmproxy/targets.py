"""Where a client's request goes: `/v1/<rest>?<query>` -> `<upstream base path>/<rest>?<query>`.

Pure functions over the raw (still percent-encoded) path, so the upstream receives exactly the
bytes the client sent, and nothing the client sends can choose another host (DESIGN §3.3).
"""

from __future__ import annotations

API_PREFIX = b"/v1/"

_DOT_SEGMENTS = frozenset({b".", b"..", b"%2e", b"%2e%2e", b".%2e", b"%2e."})


def is_api_path(raw_path: bytes) -> bool:
    """Whether the path is one the proxy forwards (under `/v1/`)."""
    return raw_path.startswith(API_PREFIX) or raw_path == API_PREFIX[:-1]


def has_dot_segment(raw_path: bytes) -> bool:
    """Whether any segment is `.` or `..`, plain or percent-encoded.

    An upstream (or a CDN in front of it) may normalise them and serve a path outside the base
    URL, so such requests are refused rather than forwarded.
    """
    # `find`, not `in`: CPython's bytes `in` first tries the operand as an int and builds a
    # TypeError for a bytes one (~1,800 instructions a time, measured under callgrind).
    if raw_path.find(b".") == -1 and raw_path.find(b"%") == -1:
        return False
    return any(segment.lower() in _DOT_SEGMENTS for segment in raw_path.split(b"/"))


def request_target(base_path: str, raw_path: bytes, query_string: bytes) -> str:
    """The request target for the upstream: its base path, then the API path's rest and query.

    `base_path` is the upstream base URL's path without a trailing slash (`/v1`, or `` for a
    bare host). The rest and the query are appended byte for byte: they are ASCII on the wire,
    as HTTP/1.1 request targets are. An empty path is `/` (origin-form, RFC 9112 §3.2.1).
    """
    rest = raw_path[len(API_PREFIX) - 1 :].decode("latin-1")
    if not rest and not base_path:
        rest = "/"
    if query_string:
        return f"{base_path}{rest}?{query_string.decode('latin-1')}"
    return base_path + rest
