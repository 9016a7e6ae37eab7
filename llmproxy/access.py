"""Proxy access keys (issue 5): who may spend the upstream key, and which header proved it.

Pure functions over the client's headers. Keys are compared in constant time, and every header
that carried a valid proxy key is removed before forwarding, so the key never reaches the
upstream (the configured default `Authorization` goes instead).
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from llmproxy.limits import KeyLimits

KEY_HEADERS = frozenset({"authorization", "x-api-key"})
# Browsers cannot set headers on a WebSocket handshake, so OpenAI's Realtime API also takes the
# key as a subprotocol offered next to `realtime` (DESIGN §10).
KEY_SUBPROTOCOL_PREFIX = "openai-insecure-api-key."
_BEARER = re.compile(r"^\s*bearer\s+(\S+)\s*$", re.IGNORECASE)
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


NO_KEY = "-"  # the key name of requests when the proxy has no access keys
_NO_LIMITS = KeyLimits()


@dataclass(frozen=True, slots=True)
class AccessKey:
    """A proxy access key as the proxy holds it: a name, the key's SHA-256, its limits."""

    name: str
    sha256: bytes = field(repr=False)
    limits: KeyLimits = _NO_LIMITS


def key_digest(key: str) -> bytes:
    """The SHA-256 of a key as the client sends it."""
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()


def unnamed_key_name(key: str) -> str:
    """The name of a key given without one (`LLMPROXY_ACCESS_KEYS`): `key-` + 8 hex digits."""
    return "key-" + hashlib.sha256(key.encode()).hexdigest()[:8]


class KeyRing:
    """Every access key, found by the digest of what a client presents (DESIGN §11).

    A dict lookup on the SHA-256 costs the same for 1 key or 10,000 (comparing against each
    key in constant time cost ~91 µs per request at 1,000 keys); the digest found is then
    compared in constant time, and nothing about the key is learnt from timing but its hash.
    """

    __slots__ = ("_by_digest",)

    def __init__(self, keys: Iterable[AccessKey]) -> None:
        self._by_digest = {key.sha256: key for key in keys}

    def __bool__(self) -> bool:
        return bool(self._by_digest)

    def find(self, candidate: str) -> AccessKey | None:
        digest = key_digest(candidate)
        key = self._by_digest.get(digest)
        if key is not None and hmac.compare_digest(key.sha256, digest):
            return key
        return None

    def authenticate(
        self, client_headers: Sequence[tuple[str, str]]
    ) -> tuple[AccessKey, list[tuple[str, str]]] | None:
        """The key a header presented, and the headers without those that carried a valid
        key; None if none did."""
        kept: list[tuple[str, str]] = []
        found: AccessKey | None = None
        for name, value in client_headers:
            if name.lower() in KEY_HEADERS:
                candidate = presented_key(name, value)
                key = self.find(candidate) if candidate is not None else None
                if key is not None:
                    found = found or key
                    continue
            kept.append((name, value))
        return (found, kept) if found is not None else None

    def authenticate_subprotocols(
        self, subprotocols: Sequence[str]
    ) -> tuple[AccessKey, list[str]] | None:
        """The key a subprotocol `openai-insecure-api-key.<key>` carried, and the offered
        subprotocols without it; None if none did. Any other subprotocol is the upstream's to
        accept or refuse, as for headers."""
        kept: list[str] = []
        found: AccessKey | None = None
        for subprotocol in subprotocols:
            if subprotocol.startswith(KEY_SUBPROTOCOL_PREFIX):
                key = self.find(subprotocol[len(KEY_SUBPROTOCOL_PREFIX) :])
                if key is not None:
                    found = found or key
                    continue
            kept.append(subprotocol)
        return (found, kept) if found is not None else None


def presented_key(name: str, value: str) -> str | None:
    """The key a header presents: `Authorization: Bearer <key>` or `x-api-key: <key>`."""
    lowered = name.lower()
    if lowered == "x-api-key":
        return value.strip()
    if lowered == "authorization":
        match = _BEARER.match(value)
        return match.group(1) if match else None
    return None


def usable_request_id(value: str | None) -> str | None:
    """A client's `x-request-id` if it is safe to log and forward (short, plain characters)."""
    if value is not None and _REQUEST_ID.match(value):
        return value
    return None
