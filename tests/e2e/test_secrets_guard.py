"""The secrets guard itself can fail: it notices a secret in headers, bodies and log records."""

from __future__ import annotations

import logging

from starlette.types import Receive, Scope, Send

from tests.e2e.secrets_guard import SecretsGuard


async def leaky_app(scope: Scope, receive: Receive, send: Send) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": [(b"x-k", b"sk-LEAK")]})
    await send({"type": "http.response.body", "body": b"key=sk-LEAK", "more_body": False})


async def test_guard_sees_secrets_in_headers_and_bodies_but_not_in_echoes() -> None:
    guard = SecretsGuard(["sk-LEAK"])
    sent: list[object] = []

    async def send(message: object) -> None:
        sent.append(message)

    async def receive() -> dict[str, object]:
        return {"type": "http.disconnect"}

    scope = {"type": "http", "method": "GET", "path": "/v1/x", "headers": []}
    await guard.wrap(leaky_app)(scope, receive, send)  # type: ignore[arg-type]
    assert len(guard.violations) == 2
    assert len(sent) == 2  # the messages still went through

    echo = guard.wrap(leaky_app)
    echo_scope = scope | {"headers": [(b"x-fake-scenario", b"echo")]}
    await echo(echo_scope, receive, send)  # type: ignore[arg-type]
    assert len(guard.violations) == 3  # the header still counts; the echoed body does not


def test_guard_sees_secrets_in_log_records() -> None:
    guard = SecretsGuard(["sk-LEAK"])
    logger = logging.getLogger("test.secrets_guard")
    logger.addHandler(guard)
    try:
        logger.warning("nothing here")
        logger.warning("upstream said %s", "sk-LEAK")
    finally:
        logger.removeHandler(guard)
    assert guard.records_checked == 2
    assert len(guard.violations) == 1
