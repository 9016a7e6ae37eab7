"""Responses the fake produced, kept so `GET /v1/responses/{id}` can answer for them (and replay
their events with `?stream=true&starting_after=N`)."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any


class ResponseStore:
    """The events of the last `limit` responses, by response id. Thread-safe.

    A stream cut by the script (close, reset, stall) is stored whole, as the real API keeps
    generating a response its client lost: resuming it with `starting_after` gets the rest."""

    def __init__(self, limit: int = 1_000) -> None:
        self._events: OrderedDict[str, list[dict[str, Any]]] = OrderedDict()
        self._limit = limit
        self._lock = threading.Lock()

    def put(self, response_id: str, events: Sequence[dict[str, Any]]) -> None:
        with self._lock:
            self._events[response_id] = list(events)
            self._events.move_to_end(response_id)
            while len(self._events) > self._limit:
                self._events.popitem(last=False)

    def events(self, response_id: str) -> list[dict[str, Any]] | None:
        with self._lock:
            found = self._events.get(response_id)
            return None if found is None else list(found)

    def clear(self) -> None:
        with self._lock:
            self._events.clear()


def last_response_object(events: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The response as its latest lifecycle event shows it (completed, failed, incomplete, or
    still in progress when the stream ended in an error event)."""
    for event in reversed(events):
        response = event.get("response")
        if isinstance(response, dict):
            return response
    raise ValueError("no lifecycle event among the events")
