"""The FastAPI application: lifespan, the hot-path dispatch to the forwarder, operational routes.

`create_app()` builds one; `app` is the module-level one that ASGI servers find by name.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.types import Receive, Scope, Send

from llmproxy import errors, metrics
from llmproxy.access_log import flush_request_log
from llmproxy.config import Configuration, get_configuration
from llmproxy.descriptors import DescriptorWatch
from llmproxy.errors import ProxyError
from llmproxy.forwarder import Forwarder, create_upstream_client, send_proxy_error
from llmproxy.protocol import CLIENT_TIMEOUTS_STATE, serves_lifespan
from llmproxy.ws_relay import WebSocketRelay, send_upgrade_refusal

NOT_READY = ProxyError(
    503, "proxy_not_ready", "The proxy is starting or stopping; try again.", "proxy_error"
)
# One line at start-up when another server (or uvicorn with its own protocol) runs the app.
UNHARDENED_WARNING = (
    "llmproxy: not served by its hardened HTTP protocol, so request trailers pass as headers, "
    "non-WebSocket Upgrade requests lose their body, head limits and client timeouts are off "
    "and each request needs a disconnect watcher task; `llmproxy serve` is the supported way"
)


class ProxyApp(FastAPI):
    """FastAPI app whose `/v1` requests go straight to the forwarder.

    FastAPI's middleware stack, router and `Request` objects stay in place for everything else
    (health, errors), but the hot path skips them: measured, they cost twice the forwarding.
    """

    forwarder: Forwarder | None = None
    websocket_relay: WebSocketRelay | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            forwarder = self.forwarder
            if forwarder is None:
                await send_proxy_error(send, NOT_READY)
            else:
                await forwarder(scope, receive, send)
            return
        if scope["type"] == "websocket":
            # Every upgrade, whatever its path: the relay refuses those outside /v1 with 404.
            relay = self.websocket_relay
            if relay is None:
                await send_upgrade_refusal(send, scope, NOT_READY)
            else:
                await relay(scope, receive, send)
            return
        if scope["type"] == "lifespan" and not serves_lifespan(receive):
            logging.getLogger("llmproxy").warning(UNHARDENED_WARNING)
        await super().__call__(scope, receive, send)


def resolve_configuration(app: FastAPI) -> Configuration:
    """`get_configuration` as FastAPI would inject it, honouring `app.dependency_overrides`.

    Resolved once at start-up rather than per request: the configuration is immutable.
    """
    provider: Callable[[], Configuration] = app.dependency_overrides.get(
        get_configuration, get_configuration
    )
    return provider()


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
    assert isinstance(app, ProxyApp)
    configuration = resolve_configuration(app)
    client = create_upstream_client(configuration)
    app.forwarder = Forwarder(configuration, client)
    app.websocket_relay = WebSocketRelay(configuration, app.forwarder)
    watch = DescriptorWatch(asyncio.get_running_loop())
    watch.start()
    try:
        # The lifespan state reaches every connection's server protocol (`app_state`), which is
        # how `ProxyHttpProtocol` learns the client timeouts of this app's configuration.
        yield {
            CLIENT_TIMEOUTS_STATE: (
                configuration.client_header_timeout,
                configuration.client_body_timeout,
            )
        }
    finally:
        watch.stop()
        redis_limiter = app.forwarder.redis_limiter
        app.forwarder = None
        app.websocket_relay = None
        if redis_limiter is not None:
            await redis_limiter.close()
        await client.close()
        flush_request_log()


def _error_response(error: ProxyError) -> Response:
    return Response(error.body(), status_code=error.status, media_type="application/json")


async def _http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        return _error_response(errors.NOT_FOUND)
    if exc.status_code == 405:
        return _error_response(errors.METHOD_NOT_ALLOWED)
    return _error_response(ProxyError(exc.status_code, "http_error", "The request failed."))


async def _validation_error(request: Request, exc: Exception) -> Response:
    return _error_response(
        ProxyError(400, "invalid_request", "The request is not valid.", "invalid_request_error")
    )


async def _unexpected_error(request: Request, exc: Exception) -> Response:
    return _error_response(errors.INTERNAL_ERROR)


def create_app() -> ProxyApp:
    """A new proxy app; its configuration comes from `get_configuration` at start-up."""
    app = ProxyApp(
        title="llmproxy",
        lifespan=_lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.add_exception_handler(HTTPException, _http_exception)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Exception, _unexpected_error)

    # Each route answers with a `Response` of its own: a model-typed return would make FastAPI
    # build a response field, whose first build imports pydantic.v1 (24 ms of every import).
    @app.get("/healthz")
    async def healthz() -> Response:
        """The process is up."""
        return Response(b'{"status":"ok"}', media_type="application/json")

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        """Prometheus metrics, summed over worker processes."""
        body, content_type = metrics.exposition()
        return Response(body, media_type=content_type)

    @app.get("/readyz")
    async def readyz() -> Response:
        """The upstream client is ready to forward."""
        if app.forwarder is None:
            return _error_response(NOT_READY)
        return Response(b'{"status":"ready"}', media_type="application/json")

    return app


# The app that `uvicorn llmproxy.app:app` and `fastapi run llmproxy/app.py` find. Like any
# `create_app()`, it reads its configuration at start-up, not at import. `llmproxy serve` builds
# its own (`llmproxy.cli:create_served_app`), served by the hardened protocol.
app = create_app()
