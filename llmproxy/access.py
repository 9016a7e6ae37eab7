"""Proxy access keys (issue 5): who may spend the upstream key, and which header proved it.

Pure functions over the client's headers. Keys are compared in constant time, and every header
that carried a valid proxy key is removed before forwarding, so the key never reaches the
upstream (the configured default `Authorization` goes instead).
"""

from __future__ import annotations

import hmac
import re
from collections.abc import Sequence

KEY_HEADERS = frozenset({"authorization", "x-api-key"})
# Browsers cannot set headers on a WebSocket handshake, so OpenAI's Realtime API also takes the
# key as a subprotocol offered next to `realtime` (DESIGN §10).
KEY_SUBPROTOCOL_PREFIX = "openai-insecure-api-key."
_BEARER = re.compile(r"^\s*bearer\s+(\S+)\s*$", re.IGNORECASE)
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


def presented_key(name: str, value: str) -> str | None:
    """The key a header presents: `Authorization: Bearer <key>` or `x-api-key: <key>`."""
    lowered = name.lower()
    if lowered == "x-api-key":
        return value.strip()
    if lowered == "authorization":
        match = _BEARER.match(value)
        return match.group(1) if match else None
    return None


def is_access_key(candidate: str, keys: Sequence[bytes]) -> bool:
    """Whether `candidate` is one of `keys`, comparing with every key in constant time."""
    presented = candidate.encode("utf-8", "surrogateescape")
    found = False
    for key in keys:
        found |= hmac.compare_digest(presented, key)
    return found


def authenticate(
    client_headers: Sequence[tuple[str, str]], keys: Sequence[bytes]
) -> list[tuple[str, str]] | None:
    """The client's headers without those carrying a valid access key; None if none did."""
    kept: list[tuple[str, str]] = []
    authenticated = False
    for name, value in client_headers:
        if name.lower() in KEY_HEADERS:
            candidate = presented_key(name, value)
            if candidate is not None and is_access_key(candidate, keys):
                authenticated = True
                continue
        kept.append((name, value))
    return kept if authenticated else None


def authenticate_subprotocols(
    subprotocols: Sequence[str], keys: Sequence[bytes]
) -> list[str] | None:
    """The offered subprotocols without those carrying a valid access key; None if none did.

    Only a subprotocol that proved the client is removed: any other is the upstream's to accept
    or refuse, as for headers.
    """
    kept: list[str] = []
    authenticated = False
    for subprotocol in subprotocols:
        if subprotocol.startswith(KEY_SUBPROTOCOL_PREFIX) and is_access_key(
            subprotocol[len(KEY_SUBPROTOCOL_PREFIX) :], keys
        ):
            authenticated = True
            continue
        kept.append(subprotocol)
    return kept if authenticated else None


def usable_request_id(value: str | None) -> str | None:
    """A client's `x-request-id` if it is safe to log and forward (short, plain characters)."""
    if value is not None and _REQUEST_ID.match(value):
        return value
    return None
