"""Secrets never leave (issue 5): watch every byte the suite's proxies send and every log line.

`SecretsGuard.wrap` is ASGI middleware put around each proxy the end-to-end suite starts; a log
handler on the root logger sees every record. Both note any configured secret they find; the
session fixture fails the run if there is any. Answers to the fake's `echo` scenario are
skipped: there the *upstream* chose to send back what it received, which a proxy must pass on.
"""

from __future__ import annotations

import logging
import threading

from starlette.types import ASGIApp, Message, Receive, Scope, Send

ECHO_MARKERS = (b"x-fake-scenario", b"x-fake-script")


class SecretsGuard(logging.Handler):
    """Collects places where a secret appeared in a response or a log record."""

    def __init__(self, secrets: list[str]) -> None:
        super().__init__(level=logging.DEBUG)
        self.secrets = [s.encode() for s in secrets if s]
        self.violations: list[str] = []
        self.responses_checked = 0
        self.records_checked = 0
        self._lock = threading.Lock()

    def _check(self, data: bytes, where: str) -> None:
        for secret in self.secrets:
            if secret in data:
                with self._lock:
                    self.violations.append(f"{where}: contains {secret[:6]!r}...")

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if record.exc_info:
            text += logging.Formatter().formatException(record.exc_info)
        self.records_checked += 1
        self._check(text.encode(errors="replace"), f"log {record.name}")

    def wrap(self, app: ASGIApp) -> ASGIApp:
        """ASGI middleware checking each response message (headers and body) as it is sent."""

        async def guarded(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != "http":
                await app(scope, receive, send)
                return
            headers = scope.get("headers", [])
            echoing = any(name in ECHO_MARKERS and b"echo" in value for name, value in headers)
            where = f"response to {scope['method']} {scope['path']}"

            async def checking_send(message: Message) -> None:
                if message["type"] == "http.response.start":
                    self.responses_checked += 1
                    for name, value in message.get("headers", []):
                        self._check(name + b": " + value, where + " (headers)")
                elif message["type"] == "http.response.body" and not echoing:
                    self._check(message.get("body", b""), where)
                await send(message)

            await app(scope, receive, checking_send)

        return guarded
