"""Scripts queued for the next requests (`POST /_fake/queue`), consumed one per request."""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterable

from fake_upstream.scripts import Script


class ScriptQueue:
    """FIFO of validated scripts. Thread-safe: tests push from their own thread."""

    def __init__(self) -> None:
        self._scripts: deque[Script] = deque()
        self._lock = threading.Lock()

    def push(self, scripts: Iterable[Script]) -> int:
        """Append scripts; return how many are now pending."""
        with self._lock:
            self._scripts.extend(scripts)
            return len(self._scripts)

    def pop(self) -> Script | None:
        with self._lock:
            return self._scripts.popleft() if self._scripts else None

    def clear(self) -> None:
        with self._lock:
            self._scripts.clear()

    def pending(self) -> list[Script]:
        with self._lock:
            return list(self._scripts)
