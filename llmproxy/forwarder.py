"""The forwarder: the only place that does I/O with the upstream (DESIGN §3, §4, §5).

It is a raw ASGI application. The FastAPI app hands it every `/v1/...` request before its own
middleware and routing run, because that per-request machinery costs about twice the whole
forwarding work (README, "Design notes"). Everything here is therefore written against ASGI
messages directly: no `Request`, no `StreamingResponse`, no per-request client.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import aiohttp
from starlette.types import Message, Receive, Scope, Send
from yarl import URL

from llmproxy import errors
from llmproxy.config import Configuration
from llmproxy.errors import ProxyError
from llmproxy.headers import filter_response_headers, merge_upstream_headers
from llmproxy.targets import has_dot_segment, is_api_path, upstream_target

logger = logging.getLogger("llmproxy")

# The upstream client must not add anything the client did not send: an `Accept-Encoding` it
# invented would make the upstream compress a body that is then passed through raw.
_SKIP_AUTO_HEADERS = ("Accept", "Accept-Encoding", "User-Agent", "Content-Type")

# Below uvicorn's 5 s keep-alive default, the shortest idle timeout common among
# OpenAI-compatible servers (vLLM, LiteLLM): reusing a connection the upstream is about to
# close would fail a POST that nobody may safely retry.
_POOL_KEEPALIVE_SECONDS = 4.0

# Upper bound on simultaneous upstream connections per process. Far above what one core serves,
# so the pool never queues requests under load; the count of open sockets stays bounded.
_POOL_MAX_CONNECTIONS = 4096

_JSON_HEADERS = [(b"content-type", b"application/json")]


def create_upstream_session(configuration: Configuration) -> aiohttp.ClientSession:
    """The one upstream client of the process, with its pool limits and timeouts."""
    connector = aiohttp.TCPConnector(
        limit=_POOL_MAX_CONNECTIONS,
        limit_per_host=0,
        keepalive_timeout=_POOL_KEEPALIVE_SECONDS,
        ttl_dns_cache=60,
    )
    timeout = aiohttp.ClientTimeout(
        total=None,
        connect=None,  # waiting for a pool slot is bounded by the pool size, not a timer
        sock_connect=configuration.connect_timeout,
        sock_read=configuration.read_timeout,  # between bytes: before headers and in the body
    )
    return aiohttp.ClientSession(
        connector=connector,
        timeout=timeout,
        auto_decompress=False,  # bytes pass through raw; Content-Encoding stays true
        cookie_jar=aiohttp.DummyCookieJar(),  # never carry one client's cookies to another
        skip_auto_headers=_SKIP_AUTO_HEADERS,
        trust_env=False,  # HTTP(S)_PROXY variables must not reroute the upstream
    )


@dataclass(slots=True)
class _Exchange:
    """What one request's disconnect watcher and forwarding task share."""

    response_started: bool = False
    finished: bool = False
    client_gone: bool = False


class Forwarder:
    """ASGI app: forwards one request to the upstream and streams the answer back."""

    def __init__(self, configuration: Configuration, session: aiohttp.ClientSession) -> None:
        self._base_url = configuration.upstream_url
        self._default_headers = configuration.upstream_headers()
        self._session = session

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        raw_path: bytes = scope.get("raw_path") or scope["path"].encode()
        if not is_api_path(raw_path):
            await send_proxy_error(send, errors.NOT_FOUND)
            return
        if has_dot_segment(raw_path):
            await send_proxy_error(send, errors.INVALID_PATH)
            return
        body = await _read_body(receive)
        if body is None:
            return  # the client left while sending its body
        target = upstream_target(self._base_url, raw_path, scope["query_string"])
        headers = merge_upstream_headers(
            [(name.decode("latin-1"), value.decode("latin-1")) for name, value in scope["headers"]],
            self._default_headers,
        )

        exchange = _Exchange()
        task = asyncio.current_task()
        assert task is not None
        watcher = asyncio.create_task(_watch_disconnect(receive, task, exchange))
        try:
            await self._exchange(scope["method"], target, headers, body, send, exchange)
        except asyncio.CancelledError:
            if not exchange.client_gone:
                raise
            # Our own watcher cancelled us: the client left, the upstream response is closed.
            task.uncancel()
            logger.info("client disconnected: %s %s", scope["method"], scope["path"])
        finally:
            exchange.finished = True
            watcher.cancel()

    async def _exchange(
        self,
        method: str,
        target: str,
        headers: list[tuple[str, str]],
        body: bytes,
        send: Send,
        exchange: _Exchange,
    ) -> None:
        try:
            response_context = self._session.request(
                method,
                URL(target, encoded=True),
                headers=headers,
                data=body or None,
                allow_redirects=False,
            )
            # Opened and closed in this one block, so a cancellation (client gone) or an error
            # anywhere below closes the upstream connection instead of leaking it.
            async with response_context as upstream:
                await self._relay(upstream, send, exchange)
        except _PRE_RESPONSE_ERRORS as error:
            if exchange.response_started:
                logger.warning("upstream failed after the response started; aborting")
                return
            await send_proxy_error(send, _proxy_error_for(error))

    async def _relay(
        self, upstream: aiohttp.ClientResponse, send: Send, exchange: _Exchange
    ) -> None:
        response_headers = filter_response_headers(upstream.raw_headers)
        exchange.response_started = True
        await send(
            {"type": "http.response.start", "status": upstream.status, "headers": response_headers}
        )
        try:
            async for chunk in upstream.content.iter_any():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        except _MID_STREAM_ERRORS:
            upstream.close()
            if _can_append_event(upstream):
                exchange.finished = True
                await send(
                    {
                        "type": "http.response.body",
                        "body": errors.STREAM_INTERRUPTED_EVENT,
                        "more_body": False,
                    }
                )
            else:
                # Returning without the final body message makes the server abort the
                # connection, so the client cannot take a truncated body for a whole one.
                logger.warning("upstream failed mid-body; aborting the client connection")
            return
        exchange.finished = True
        await send({"type": "http.response.body", "body": b"", "more_body": False})


_PRE_RESPONSE_ERRORS = (aiohttp.ClientError, asyncio.TimeoutError)
_MID_STREAM_ERRORS = (aiohttp.ClientError, asyncio.TimeoutError, ConnectionError)


def _proxy_error_for(error: BaseException) -> ProxyError:
    """Which of the proxy's own errors answers an upstream failure before the response."""
    if isinstance(error, aiohttp.ConnectionTimeoutError):
        return errors.UPSTREAM_CONNECT_TIMEOUT
    if isinstance(error, aiohttp.ClientConnectorError):
        return errors.UPSTREAM_UNREACHABLE
    if isinstance(error, asyncio.TimeoutError):
        return errors.UPSTREAM_TIMEOUT
    return errors.UPSTREAM_BAD_RESPONSE


def _can_append_event(upstream: aiohttp.ClientResponse) -> bool:
    """An error event can end the stream only on SSE framed without a Content-Length."""
    content_type = upstream.headers.get("Content-Type", "")
    return content_type.startswith("text/event-stream") and "Content-Length" not in upstream.headers


async def _read_body(receive: Receive) -> bytes | None:
    """The whole request body, or None if the client disconnected first."""
    message = await receive()
    if message["type"] == "http.disconnect":
        return None
    body: bytes = message.get("body", b"")
    if not message.get("more_body", False):
        return body
    parts = [body]
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        parts.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(parts)


async def _watch_disconnect(
    receive: Receive, task: asyncio.Task[None], exchange: _Exchange
) -> None:
    """Cancel the forwarding task as soon as the client goes away, before or during the body.

    The ASGI server's `send` is silent after a disconnect, so only `receive` can tell.
    """
    message: Message = {"type": ""}
    while message["type"] != "http.disconnect":
        message = await receive()
    if not exchange.finished:
        exchange.client_gone = True
        task.cancel()


async def send_proxy_error(send: Send, error: ProxyError) -> None:
    """Answer with one of the proxy's own errors, in the OpenAI shape."""
    body = error.body()
    headers = [*_JSON_HEADERS, (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})
