"""Header policy: which headers cross the proxy, in which direction, and who wins.

Pure functions over lists of (name, value) pairs, so that Hypothesis can test them and the
forwarder can apply them without touching I/O. Contract: DESIGN §3.2 and §4.1.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence

# Hop-by-hop headers describe one connection, not the message; a proxy must not forward them.
HOP_BY_HOP_HEADERS: frozenset[str] = frozenset(
    {
        "connection",  # RFC 9110 §7.6.1
        "keep-alive",  # RFC 9110 §7.6.1 (historical, RFC 2068 §19.7.1)
        "proxy-connection",  # non-standard, sent by old clients; RFC 9110 §7.6.1 names it
        "proxy-authenticate",  # RFC 9110 §11.7.1: applies to the next hop only
        "proxy-authorization",  # RFC 9110 §11.7.2: applies to the next hop only
        "te",  # RFC 9110 §10.1.4
        "trailer",  # RFC 9110 §6.6.2
        "transfer-encoding",  # RFC 9112 §6.1: framing of this connection
        "upgrade",  # RFC 9110 §7.8
    }
)

# The upstream client sets these itself from the upstream URL and the body it sends.
CLIENT_SET_REQUEST_HEADERS: frozenset[str] = frozenset({"host", "content-length"})

_HOP_BY_HOP_BYTES: frozenset[bytes] = frozenset(name.encode() for name in HOP_BY_HOP_HEADERS)


def connection_listed_names(headers: Iterable[tuple[str, str]]) -> frozenset[str]:
    """Lowercased header names listed in every `Connection` header (RFC 9110 §7.6.1)."""
    listed: set[str] = set()
    for name, value in headers:
        if name.lower() == "connection":
            listed.update(token.strip().lower() for token in value.split(","))
    listed.discard("")
    return frozenset(listed)


def merge_upstream_headers(
    client_headers: Sequence[tuple[str, str]],
    default_headers: Sequence[tuple[str, str]],
) -> list[tuple[str, str]]:
    """Headers for the upstream request: the defaults, then the client's others in order.

    Stripping happens before the merge, so a client's `Connection: authorization` removes only
    the client's own `Authorization`; a default replaces every client value of the same name,
    whatever its case or count (DESIGN §3.2).
    """
    dropped = _names_never_forwarded(tuple(default_headers))
    listed = connection_listed_names(client_headers)
    if listed:
        dropped = dropped | listed
    return [
        *default_headers,
        *((name, value) for name, value in client_headers if name.lower() not in dropped),
    ]


def wire_headers(headers: Iterable[tuple[str, str]]) -> tuple[tuple[str, str], ...]:
    """Configured headers in the form the upstream client writes: one character per byte.

    Client headers reach the forwarder decoded as latin-1 (each byte one character, so obs-text
    passes unchanged); configured values are text, sent as their UTF-8 bytes. Converting them
    once at start-up lets the whole request head be encoded with latin-1 per request.
    """
    return tuple((name, value.encode("utf-8").decode("latin-1")) for name, value in headers)


@functools.lru_cache(maxsize=64)
def _names_never_forwarded(default_headers: tuple[tuple[str, str], ...]) -> frozenset[str]:
    """Hop-by-hop, client-set and default names: computed once per set of defaults."""
    defaults = {name.lower() for name, _ in default_headers}
    return HOP_BY_HOP_HEADERS | CLIENT_SET_REQUEST_HEADERS | defaults


# The bytes a field name (a token: no controls, separators or space, as uvicorn's HEADER_RE
# has it) and a field value (RFC 9110 §5.5: no controls but HTAB) may hold, for
# `data.translate(None, FINE)`: what it leaves are the bytes that are not fine. One C loop over
# all the names or values of a message; a regular-expression search per field cost several
# times as much (callgrind).
FIELD_NAME_BYTES_FINE = bytes(
    b for b in range(256) if b > 0x1F and b != 0x7F and b not in b'()<>@,;:[]={} \t\\"'
)
FIELD_VALUE_BYTES_FINE = bytes(b for b in range(256) if (b > 0x1F and b != 0x7F) or b == 0x09)

# The upstream client lets some control bytes through; the server would refuse to write them
# after the response had been committed, so the forwarder looks first.


def has_control_bytes(headers: Sequence[tuple[bytes, bytes]]) -> bool:
    """Whether any header value holds a control byte (one scan over all the values)."""
    return bool(b"".join([value for _, value in headers]).translate(None, FIELD_VALUE_BYTES_FINE))


def filter_response_headers(
    headers: Sequence[tuple[bytes, bytes]], names: Sequence[bytes] | None = None
) -> list[tuple[bytes, bytes]]:
    """Upstream response headers for the client: everything but the hop-by-hop ones.

    Works on raw bytes because that is what both the upstream client and ASGI speak, so the hot
    path never re-encodes a header. `names`, if given, are the names already lowercased, in
    order (the upstream client lowers them once per response).
    """
    if names is None:
        names = [name.lower() for name, _ in headers]
    dropped = _HOP_BY_HOP_BYTES
    if b"connection" in names:
        for name, (_, value) in zip(names, headers, strict=True):
            if name == b"connection":
                dropped = dropped | {token.strip().lower() for token in value.split(b",")}
    return [pair for name, pair in zip(names, headers, strict=True) if name not in dropped]
