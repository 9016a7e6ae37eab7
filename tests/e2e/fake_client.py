"""The fake upstream's control API over HTTP, so the suite also works in contract mode."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

import httpx

Journal = list[dict[str, Any]]


class FakeUpstreamClient:
    """Reads the journal and queues scripts of a fake upstream at `url` (no `/v1`)."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")
        self.base_url = f"{self.url}/v1"
        self._http = httpx.Client(base_url=self.url, timeout=10.0)

    def journal(self) -> Journal:
        response = self._http.get("/_fake/journal")
        response.raise_for_status()
        entries: Journal = response.json()
        return entries

    def queue(self, *scripts: Mapping[str, Any]) -> None:
        self._http.post("/_fake/queue", json={"scripts": list(scripts)}).raise_for_status()

    def clear(self) -> None:
        self._http.delete("/_fake/journal").raise_for_status()
        self._http.delete("/_fake/queue").raise_for_status()

    def wait_for_journal(
        self, predicate: Callable[[Journal], bool], timeout: float = 5.0
    ) -> Journal:
        """Poll the journal until `predicate` holds; fail with the journal after `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            journal = self.journal()
            if predicate(journal):
                return journal
            if time.monotonic() > deadline:
                raise AssertionError(f"journal condition not met within {timeout} s: {journal}")
            time.sleep(0.02)

    def close(self) -> None:
        self._http.close()
