"""The journal: what happened on the wire for each `/v1` request, readable while it happens.

The server's event loop writes it and test code reads it from another thread, so every access
holds one `threading.Condition`; waiters are woken on each change instead of polling.
Times are `time.time()` (wall clock) so they compare with timestamps taken in other processes.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

JournalSnapshot = list[dict[str, Any]]


@dataclass(slots=True)
class ChunkRecord:
    index: int
    written_at: float
    size: int


@dataclass(slots=True)
class MessageRecord:
    """One WebSocket message: `direction` is `client_to_server` or `server_to_client`."""

    direction: str
    at: float
    kind: str  # "text" or "bytes"
    size: int
    text: str | None

    def to_json(self) -> dict[str, Any]:
        return {
            "direction": self.direction,
            "at": self.at,
            "kind": self.kind,
            "size": self.size,
            "text": self.text,
        }


@dataclass(slots=True)
class CloseRecord:
    code: int
    reason: str
    at: float


@dataclass(slots=True)
class WebSocketRecord:
    """What a WebSocket session did, beside the entry's handshake (path, query, headers)."""

    subprotocols: list[str]
    subprotocol: str | None = None
    accepted_at: float | None = None
    messages: list[MessageRecord] = field(default_factory=list)
    server_close: CloseRecord | None = None
    client_close: CloseRecord | None = None
    ending: str | None = None

    def to_json(self) -> dict[str, Any]:
        def close(record: CloseRecord | None) -> dict[str, Any] | None:
            if record is None:
                return None
            return {"code": record.code, "reason": record.reason, "at": record.at}

        return {
            "subprotocols": list(self.subprotocols),
            "subprotocol": self.subprotocol,
            "accepted_at": self.accepted_at,
            "messages": [message.to_json() for message in self.messages],
            "server_close": close(self.server_close),
            "client_close": close(self.client_close),
            "ending": self.ending,
        }


@dataclass(slots=True)
class JournalEntry:
    """One `/v1` request. Mutated only through `Journal` so waiters see each change."""

    id: str
    method: str
    path: str
    query: str
    headers: list[tuple[str, str]]
    body_sha256: str
    received_at: float
    script: dict[str, Any] | None = None
    fixture: str | int | None = None
    cassette: str | None = None
    status: int | None = None
    headers_sent_at: float | None = None
    chunks: list[ChunkRecord] = field(default_factory=list)
    completed: bool = False
    disconnected: bool = False
    disconnected_at: float | None = None
    chunks_before_disconnect: int | None = None
    websocket: WebSocketRecord | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "kind": "http" if self.websocket is None else "websocket",
            "method": self.method,
            "path": self.path,
            "query": self.query,
            "headers": [[name, value] for name, value in self.headers],
            "body_sha256": self.body_sha256,
            "received_at": self.received_at,
            "script": self.script,
            "fixture": self.fixture,
            "cassette": self.cassette,
            "status": self.status,
            "headers_sent_at": self.headers_sent_at,
            "chunks": [
                {"index": c.index, "written_at": c.written_at, "size": c.size} for c in self.chunks
            ],
            "completed": self.completed,
            "disconnected": self.disconnected,
            "disconnected_at": self.disconnected_at,
            "chunks_before_disconnect": self.chunks_before_disconnect,
            "websocket": None if self.websocket is None else self.websocket.to_json(),
        }


class JournalTimeoutError(AssertionError):
    """`Journal.wait_for` ran out of time; the message holds the journal as it was."""


class Journal:
    """Entries in arrival order, at most `limit` (oldest dropped) so a benchmark cannot
    exhaust memory."""

    def __init__(self, limit: int | None = 10_000) -> None:
        self._entries: deque[JournalEntry] = deque(maxlen=limit)
        self._changed = threading.Condition()

    def open(
        self,
        *,
        id: str,
        method: str,
        path: str,
        query: str,
        headers: list[tuple[str, str]],
        body_sha256: str,
    ) -> JournalEntry:
        entry = JournalEntry(
            id=id,
            method=method,
            path=path,
            query=query,
            headers=headers,
            body_sha256=body_sha256,
            received_at=time.time(),
        )
        with self._changed:
            self._entries.append(entry)
            self._changed.notify_all()
        return entry

    def record_script(
        self,
        entry: JournalEntry,
        script: dict[str, Any] | None,
        fixture: str | int | None = None,
    ) -> None:
        """The script chosen, and the fixture rule it came from (its name, else its index)."""
        with self._changed:
            entry.script = script
            entry.fixture = fixture
            self._changed.notify_all()

    def record_cassette(self, entry: JournalEntry, name: str) -> None:
        """The cassette file replayed for the request, or written for it."""
        with self._changed:
            entry.cassette = name
            self._changed.notify_all()

    def record_headers_sent(self, entry: JournalEntry, status: int) -> None:
        with self._changed:
            entry.status = status
            entry.headers_sent_at = time.time()
            self._changed.notify_all()

    def record_chunk(self, entry: JournalEntry, size: int) -> None:
        with self._changed:
            entry.chunks.append(ChunkRecord(len(entry.chunks), time.time(), size))
            self._changed.notify_all()

    def record_completed(self, entry: JournalEntry) -> None:
        with self._changed:
            entry.completed = True
            self._changed.notify_all()

    def record_disconnected(self, entry: JournalEntry) -> None:
        with self._changed:
            entry.disconnected = True
            entry.disconnected_at = time.time()
            entry.chunks_before_disconnect = len(entry.chunks)
            self._changed.notify_all()

    # --- WebSocket sessions (entries opened with `open(...)`, then `start_websocket`) ---

    def start_websocket(self, entry: JournalEntry, subprotocols: list[str]) -> WebSocketRecord:
        with self._changed:
            entry.websocket = WebSocketRecord(subprotocols=list(subprotocols))
            self._changed.notify_all()
            return entry.websocket

    def record_accepted(self, entry: JournalEntry, subprotocol: str | None) -> None:
        """The `101`: `status` and `headers_sent_at` as for HTTP, and the chosen subprotocol."""
        with self._changed:
            now = time.time()
            entry.status = 101
            entry.headers_sent_at = now
            if entry.websocket is not None:
                entry.websocket.subprotocol = subprotocol
                entry.websocket.accepted_at = now
            self._changed.notify_all()

    def record_message(self, entry: JournalEntry, direction: str, data: str | bytes) -> None:
        with self._changed:
            if entry.websocket is not None:
                text = data if isinstance(data, str) else None
                kind = "text" if isinstance(data, str) else "bytes"
                size = len(data.encode()) if isinstance(data, str) else len(data)
                entry.websocket.messages.append(
                    MessageRecord(direction, time.time(), kind, size, text)
                )
            self._changed.notify_all()

    def record_close(self, entry: JournalEntry, side: str, code: int, reason: str) -> None:
        """A close frame `side` ("server" or "client") sent; the client's also marks it gone."""
        with self._changed:
            record = CloseRecord(code, reason, time.time())
            if entry.websocket is not None:
                if side == "server":
                    entry.websocket.server_close = record
                else:
                    entry.websocket.client_close = record
            self._changed.notify_all()

    def record_ending(self, entry: JournalEntry, ending: str) -> None:
        """How the server ended the session on purpose: `close`, `reset`, `stall`."""
        with self._changed:
            if entry.websocket is not None:
                entry.websocket.ending = ending
            self._changed.notify_all()

    def entries(self) -> JournalSnapshot:
        """A JSON-ready copy of every entry, oldest first."""
        with self._changed:
            return [entry.to_json() for entry in self._entries]

    def clear(self) -> None:
        with self._changed:
            self._entries.clear()
            self._changed.notify_all()

    def wait_for(
        self, predicate: Callable[[JournalSnapshot], bool], timeout: float = 5.0
    ) -> JournalSnapshot:
        """Block until `predicate(entries)` is true and return those entries, or raise
        `JournalTimeoutError` after `timeout` seconds with the journal in the message.

        A predicate raising LookupError counts as false, so `lambda j: j[0]["completed"]` can
        be written before the entry exists."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                snapshot = [entry.to_json() for entry in self._entries]
                try:
                    satisfied = predicate(snapshot)
                except LookupError:
                    satisfied = False
                if satisfied:
                    return snapshot
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise JournalTimeoutError(
                        f"journal condition not met within {timeout}s; journal: {snapshot!r}"
                    )
                self._changed.wait(remaining)
