"""The forwarder: the only place that does I/O with the upstream (DESIGN §3, §4, §5).

It is a raw ASGI application. The FastAPI app hands it every `/v1/...` request before its own
middleware and routing run, because that per-request machinery costs about twice the whole
forwarding work (README, "Design notes"). Everything here is therefore written against ASGI
messages directly: no `Request`, no `StreamingResponse`, no per-request client.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import random
import secrets
import ssl
import time
from dataclasses import dataclass, replace
from urllib.parse import urlsplit

from starlette.types import Message, Receive, Scope, Send

from llmproxy import errors, metrics
from llmproxy.access import AccessKey, KeyRing, usable_request_id
from llmproxy.access_log import (
    CLIENT_DISCONNECT,
    CLIENT_TIMEOUT,
    PROXY_ERROR,
    UPSTREAM_ERROR,
    RequestRecord,
    format_json,
    format_text,
    log_request,
)
from llmproxy.bodies import BodyTooLargeError, ClientGoneError, StreamedBody, read_body
from llmproxy.config import Configuration
from llmproxy.errors import ProxyError
from llmproxy.headers import (
    filter_response_headers,
    has_control_bytes,
    merge_upstream_headers,
    wire_headers,
)
from llmproxy.limiter import LimitRefusal, MemoryLimiter, RedisLimiter
from llmproxy.protocol import HEADERS_CHECKED, disconnect_signal
from llmproxy.retry import AttemptOutcome, RetryDecision, decide, next_upstream
from llmproxy.targets import has_dot_segment, is_api_path, request_target
from llmproxy.tls import upstream_ssl_context
from llmproxy.upstream_client import (
    ConnectFailedError,
    ConnectionClosedError,
    ConnectTimeoutError,
    EgressProxyError,
    Origin,
    ReadTimeoutError,
    UnsendableRequestError,
    UpstreamClient,
    UpstreamError,
    UpstreamResponse,
)
from llmproxy.usage import UsageTap, record_usage, tap_for, usage_due
from llmproxy.usage_injection import (
    INJECTED_PATHS,
    CodingError,
    remover_for,
    request_with_usage,
)

logger = logging.getLogger("llmproxy")

_INTERRUPTED_MESSAGE: Message = {
    "type": "http.response.body",
    "body": errors.STREAM_INTERRUPTED_EVENT,
    "more_body": False,
}
_JSON_HEADERS = [(b"content-type", b"application/json")]


def create_limiter(
    configuration: Configuration,
) -> tuple[MemoryLimiter | None, RedisLimiter | None]:
    """The store of the per-key limits: none if no key has limits, else Redis or the process."""
    if not any(key.limits.any for key in configuration.proxy_access_keys()):
        return None, None
    if configuration.redis_url is not None:
        return None, RedisLimiter(
            configuration.redis_url,
            configuration.redis_timeout,
            fail_closed=configuration.redis_failure == "closed",
        )
    return MemoryLimiter(), None


def create_upstream_client(configuration: Configuration) -> UpstreamClient:
    """The one upstream client of the process, with its timeouts (pool limits: its defaults)."""
    return UpstreamClient(
        connect_timeout=configuration.connect_timeout,
        read_timeout=configuration.read_timeout,  # between bytes: before headers and in the body
        ssl_context=upstream_ssl_context(
            configuration.upstream_ca_bundle,
            configuration.upstream_client_cert,
            configuration.upstream_client_key,
        ),
    )


@dataclass(frozen=True, slots=True)
class Route:
    """One upstream as the forwarder and the WebSocket relay use it: where to connect, the
    base path, its headers."""

    origin: Origin
    base_path: str
    headers: tuple[tuple[str, str], ...]


@dataclass(slots=True)
class _Exchange:
    """One request as it goes: shared by the forwarding task and whoever reports a disconnect."""

    record: RequestRecord
    started: float  # perf_counter() when the request arrived
    request_id_header: tuple[bytes, bytes] = (b"x-llmproxy-request-id", b"")
    usage_due: bool = False  # a request whose answer reports token usage (DESIGN §11)
    finished: bool = False
    client_gone: bool = False
    task: asyncio.Task[None] | None = None  # the forwarding task, cancelled if the client goes
    tap: UsageTap | None = None  # reads the answer's token usage, when one is due
    limited_key: AccessKey | None = None  # holds a slot of its key's limits until released
    limit_slot: str = ""  # the slot's own id: never the client's x-request-id, which repeats
    usage_injected: bool = False  # the proxy asked for the usage: its chunk is removed

    def elapsed_ms(self) -> float:
        return (time.perf_counter() - self.started) * 1000

    def client_left(self) -> None:
        """Cancel the forwarding, unless the answer is already complete."""
        if not self.finished and self.task is not None:
            self.client_gone = True
            self.task.cancel()


class Forwarder:
    """ASGI app: forwards one request to the upstream and streams the answer back."""

    def __init__(self, configuration: Configuration, client: UpstreamClient) -> None:
        self.routes = tuple(
            Route(
                replace(
                    Origin.from_url(upstream.base_url),
                    via=configuration.egress_proxy(upstream.base_url),
                ),
                urlsplit(upstream.base_url).path.rstrip("/"),
                wire_headers(upstream.headers),
            )
            for upstream in configuration.upstreams()
        )
        self.retry_policy = configuration.retry_policy()
        self._keepalive = configuration.sse_keepalive
        self.keys = KeyRing(configuration.proxy_access_keys())
        self._memory_limiter, self.redis_limiter = create_limiter(configuration)
        self._max_body_bytes = configuration.max_body_bytes
        self._request_buffer_bytes = configuration.request_buffer_bytes
        self._usage_injection = configuration.usage_injection
        self._max_concurrent = configuration.max_concurrent_requests
        self._format_log = format_json if configuration.log_format == "json" else format_text
        self._client = client
        self.active_requests = 0
        # Request ids: a random prefix per process and a counter; unique without a system call.
        self._id_prefix = secrets.token_hex(8)
        self._id_counter = itertools.count()

    @property
    def upstream_client(self) -> UpstreamClient:
        return self._client

    @property
    def ssl_context(self) -> ssl.SSLContext | None:
        """The TLS context of `https://` upstreams (None: the system's trust store)."""
        return self._client.ssl_context

    def new_request_id(self) -> str:
        """A request id for a request that came without a usable `x-request-id`."""
        return f"{self._id_prefix}{next(self._id_counter):016x}"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # One flat coroutine up to the attempts: every resumption of the innermost await passes
        # through each coroutine level above it, and the profile showed that cost.
        exchange = _Exchange(RequestRecord(scope["method"], scope["path"]), time.perf_counter())
        record = exchange.record
        try:
            # Latin-1 maps each byte to one character and back, so obs-text (RFC 9110 §5.5)
            # and UTF-8 alike go out as the bytes that came in (the upstream client encodes
            # the head with latin-1 again).
            client_headers = [
                (n.decode("latin-1"), v.decode("latin-1")) for n, v in scope["headers"]
            ]
            request_id = client_request_id(client_headers)
            if request_id is None:
                request_id = self.new_request_id()
                client_headers = [(n, v) for n, v in client_headers if n != "x-request-id"]
                client_headers.append(("x-request-id", request_id))
            record.request_id = request_id
            exchange.request_id_header = (b"x-llmproxy-request-id", request_id.encode())

            raw_path: bytes = scope.get("raw_path") or scope["path"].encode()
            if not is_api_path(raw_path):
                await self._refuse(send, errors.NOT_FOUND, exchange)
                return
            if has_dot_segment(raw_path):
                await self._refuse(send, errors.INVALID_PATH, exchange)
                return
            exchange.usage_due = usage_due(scope["method"], raw_path)
            if self.keys:
                authenticated = self.keys.authenticate(client_headers)
                if authenticated is None:
                    await self._refuse(send, errors.INVALID_PROXY_KEY, exchange)
                    return
                key, client_headers = authenticated
                record.key = key.name
            else:
                key = None
            declared = _declared_length(scope["headers"])
            if declared is not None and declared > self._max_body_bytes:
                await self._refuse(send, errors.REQUEST_TOO_LARGE, exchange)  # before reading
                return
            if self._max_concurrent is not None and self.active_requests >= self._max_concurrent:
                await self._refuse(send, errors.PROXY_OVERLOADED, exchange)
                return
            try:
                body = await read_body(
                    receive, self._max_body_bytes, self._request_buffer_bytes, declared
                )
            except BodyTooLargeError:
                await self._refuse(send, errors.REQUEST_TOO_LARGE, exchange)
                return
            if body is None:
                # The client left while sending its body, or `client_body_timeout` closed it.
                signal = disconnect_signal(scope)
                if signal is not None and signal.timed_out:
                    record.status = 408
                    record.ending = CLIENT_TIMEOUT
                else:
                    record.ending = CLIENT_DISCONNECT
                return
            streamed = isinstance(body, StreamedBody)
            if isinstance(body, StreamedBody):
                record.bytes_in = body.size  # so far; all of it once sent (below)
            else:
                if self._usage_injection and exchange.usage_due and raw_path in INJECTED_PATHS:
                    asking = request_with_usage(body)
                    if asking is not None:  # the opt-in that changes bytes (DESIGN §11)
                        body = asking
                        exchange.usage_injected = True
                record.bytes_in = len(body)
            if key is not None and key.limits.any:
                # The per-key limits (DESIGN §11): the gate that takes something, so the last.
                exchange.limit_slot = self.new_request_id()
                refused = await self.check_limits(key, exchange.limit_slot)
                if refused is not None:
                    await self._refuse_over_limit(send, refused, exchange)
                    return
                exchange.limited_key = key

            task = exchange.task = asyncio.current_task()
            assert task is not None
            # Cancel the task as soon as the client goes away, before or during the answer:
            # told by the server protocol if it is ours, else by a task waiting in `receive`.
            signal = disconnect_signal(scope)
            watcher: asyncio.Task[None] | None = None
            if signal is None:
                if not streamed:  # (a streamed body's own reads of `receive` tell of one)
                    watcher = asyncio.create_task(_watch_disconnect(receive, exchange))
            elif signal.gone:
                record.ending = CLIENT_DISCONNECT
                return
            else:
                signal.callback = exchange.client_left
            self.active_requests += 1
            try:
                await self.proxy_chat_completions(
                    scope["method"],
                    raw_path,
                    scope["query_string"],
                    client_headers,
                    body,
                    send,
                    exchange,
                )
            except asyncio.CancelledError:
                if not exchange.client_gone:
                    raise
                # Cancelled because the client left (see `_Exchange.client_left`): the attempt's
                # `finally` aborted the upstream connection, so the upstream stops generating.
                task.uncancel()
                record.ending = CLIENT_DISCONNECT
            finally:
                if isinstance(body, StreamedBody):
                    record.bytes_in = body.size
                    if (
                        record.ending == CLIENT_DISCONNECT
                        and signal is not None
                        and signal.timed_out
                    ):
                        record.status = 408  # `client_body_timeout` mid-upload
                        record.ending = CLIENT_TIMEOUT
                self.active_requests -= 1
                exchange.finished = True
                if watcher is not None:
                    watcher.cancel()
                elif signal is not None:
                    signal.callback = None
        finally:
            record.total_ms = exchange.elapsed_ms()
            if exchange.tap is not None:
                record_usage(record, exchange.tap.usage())
            elif exchange.usage_due and record.ending == CLIENT_DISCONNECT and record.attempts:
                # Gone before the answer's head: the upstream may bill for what it began.
                record_usage(record, None)
            if exchange.limited_key is not None:
                self.release_limits(exchange.limited_key, exchange.limit_slot, record.tokens)
            log_request(record, self._format_log)
            metrics.observe(record)

    async def proxy_chat_completions(
        self,
        method: str,
        raw_path: bytes,
        query_string: bytes,
        client_headers: list[tuple[str, str]],
        body: bytes | StreamedBody,
        send: Send,
        exchange: _Exchange,
    ) -> None:
        """Forward one request: the loop of attempts (DESIGN §6), try, ask `decide`, wait, retry.

        Named for the endpoint the proxy began with; every forwarded `/v1` request, chat
        completions or any other, comes here straight from `__call__`, with no wrapper in
        between: each coroutine level costs on every resumption of the innermost await.

        The `while True` is bounded: `decide` allows no attempt past `max_attempts`, and starts
        no wait that would end at or past `retry_deadline` (counted from the first attempt);
        each attempt is bounded by the upstream client's connect and read timeouts. Every path
        but a granted retry returns. An unbounded loop would be a defect: a down or
        rate-limiting upstream would hold the client, a connection and a concurrency slot
        without end, and multiply the load on an upstream that is already failing.
        """
        record = exchange.record
        loop_started = time.monotonic()
        index = 0
        attempt = 0
        while True:
            attempt += 1
            record.attempts = attempt
            route = self.routes[index]
            decision: RetryDecision | None = None
            try:
                response = await self._client.request(
                    route.origin,
                    method,
                    request_target(route.base_path, raw_path, query_string),
                    merge_upstream_headers(client_headers, route.headers),
                    body,
                )
            except UnsendableRequestError:
                await self._refuse(send, errors.INVALID_HEADER, exchange)
                return
            except BodyTooLargeError:  # a streamed body went over the limit as it came
                await self._refuse(send, errors.REQUEST_TOO_LARGE, exchange)
                return
            except ClientGoneError:  # the client left (or timed out) mid-upload
                record.ending = CLIENT_DISCONNECT
                return
            except UpstreamError as error:
                record.stale_retries += error.stale_retries
                outcome = (
                    AttemptOutcome.connect_failed()
                    if isinstance(error, ConnectFailedError)
                    else AttemptOutcome.failed_after_send()
                )
                decision = self.decide_retry(attempt, outcome, loop_started)
                # Not retried: a streamed body already sent, and the egress proxy's refusal
                # (asking again with the same credentials can lock a directory account).
                if (
                    not decision.retry
                    or _sent_streamed(body)
                    or isinstance(error, EgressProxyError)
                ):
                    await self._refuse(send, proxy_error_for(error), exchange)
                    return
            else:
                # Closed in this one block, so a cancellation (client gone) or an error below
                # closes the upstream connection instead of leaking it.
                try:
                    record.upstream_status = response.status
                    record.stale_retries += response.stale_retries
                    if (
                        response.status == 407
                        and route.origin.via is not None
                        and route.origin.scheme == "http"
                    ):
                        # The forward proxy's own refusal, not the upstream's answer (in a
                        # CONNECT tunnel, TLS end to end, only the upstream can answer).
                        via = route.origin.via.shown
                        await self._refuse(
                            send,
                            errors.upstream_proxy_error(
                                f"the egress proxy {via} asked for credentials (407)"
                            ),
                            exchange,
                        )
                        return
                    record.upstream_headers_ms = exchange.elapsed_ms()
                    if response.status in self.retry_policy.retry_statuses and not _sent_streamed(
                        body
                    ):
                        outcome = AttemptOutcome.response(
                            response.status, response.headers_as_text()
                        )
                        decision = self.decide_retry(attempt, outcome, loop_started)
                    if decision is None or not decision.retry:
                        await self._relay(response, send, exchange)
                        return
                finally:
                    response.close()
            logger.info("retrying in %.3fs: %s", decision.delay, decision.reason)
            await asyncio.sleep(decision.delay)
            index = next_upstream(index, len(self.routes))

    def decide_retry(
        self, attempt: int, outcome: AttemptOutcome, loop_started: float
    ) -> RetryDecision:
        """`retry.decide` for this proxy's policy, now (the WebSocket relay asks it too)."""
        return decide(
            self.retry_policy,
            attempt,
            outcome,
            elapsed=time.monotonic() - loop_started,
            now=time.time(),
            random_fraction=random.random(),  # noqa: S311 - jitter, not cryptography
        )

    async def _relay(self, upstream: UpstreamResponse, send: Send, exchange: _Exchange) -> None:
        record = exchange.record
        response_headers = filter_response_headers(upstream.raw_headers, upstream.names)
        response_headers.append(exchange.request_id_header)
        if has_control_bytes(upstream.raw_headers):
            await self._refuse(send, errors.UPSTREAM_BAD_RESPONSE, exchange)
            return
        content_type = upstream.header(b"content-type") or b""
        is_sse = content_type.startswith(b"text/event-stream")
        encoding = upstream.header(b"content-encoding")
        remover = remover_for(encoding) if exchange.usage_injected and is_sse else None
        if remover is not None:
            # What the remover takes out changes the length, and a coded stream goes out
            # decoded (`InflatingUsageChunkRemover`): neither header would be true any more.
            changed = {b"content-length", b"content-encoding"} if encoding else {b"content-length"}
            response_headers = [h for h in response_headers if h[0].lower() not in changed]
        # Bytes of the proxy's own (keep-alive comments, the error event) can go only into a
        # plain SSE body of no announced length, or one the remover decodes and re-frames.
        plain = encoding is None or encoding.strip().lower() == b"identity"
        can_end_with_event = is_sse and (
            remover is not None or (plain and upstream.header(b"content-length") is None)
        )
        await send(
            {
                "type": "http.response.start",
                "status": upstream.status,
                "headers": response_headers,
                HEADERS_CHECKED: True,  # names parsed by llhttp, values scanned just above
            }
        )
        record.status = upstream.status
        tap = exchange.tap = tap_for(exchange.usage_due, upstream.status, content_type, encoding)
        # Keep-alive comments go between the upstream's chunks, so only into a plain stream
        # (a coded one is decoded by the remover after they would have been put in).
        chunks: UpstreamResponse | _WithKeepalive = (
            _WithKeepalive(upstream, self._keepalive)
            if can_end_with_event and plain and self._keepalive is not None
            else upstream
        )
        metrics.ACTIVE_STREAMS.inc()
        try:
            async for chunk in chunks:
                if record.first_byte_ms is None:
                    record.first_byte_ms = exchange.elapsed_ms()
                if tap is not None:
                    tap.feed(chunk)
                if remover is not None:
                    chunk = remover.feed(chunk)
                    if not chunk:
                        continue
                record.bytes_out += len(chunk)
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            if remover is not None and (rest := remover.flush()):
                record.bytes_out += len(rest)
                await send({"type": "http.response.body", "body": rest, "more_body": True})
        except asyncio.CancelledError:
            # Cancelled by the server's drain deadline on shutdown (a client disconnect needs
            # no answer): tell the client the stream was cut rather than let it look whole.
            if not exchange.client_gone and can_end_with_event:
                exchange.finished = True
                record.ending = UPSTREAM_ERROR
                with contextlib.suppress(Exception):
                    await send(_INTERRUPTED_MESSAGE)
            raise
        except (UpstreamError, CodingError):
            upstream.close()
            record.ending = UPSTREAM_ERROR
            if can_end_with_event:
                exchange.finished = True
                await send(_INTERRUPTED_MESSAGE)
            else:
                # Returning without the final body message makes the server abort the
                # connection, so the client cannot take a truncated body for a whole one.
                logger.warning("upstream failed mid-body; aborting the client connection")
            return
        finally:
            metrics.ACTIVE_STREAMS.dec()
        exchange.finished = True
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def check_limits(self, key: AccessKey, slot: str) -> LimitRefusal | ProxyError | None:
        """Whether a request of `key` may go (its concurrency slot `slot` then taken); the
        refusal if not. `slot` must be unique (`new_request_id()`): a client's own
        x-request-id may repeat, and two requests in one slot would count once.

        Only the Redis store awaits: the in-process one answers at once.
        """
        memory = self._memory_limiter
        if memory is not None:
            return memory.check(key, slot)
        assert self.redis_limiter is not None
        return await self.redis_limiter.check(key, slot)

    def release_limits(
        self, key: AccessKey, slot: str, tokens: tuple[str | None, int, int, int, int] | None
    ) -> None:
        """Give back the key's concurrency slot and pay the tokens the answer reported."""
        used = tokens[1] + tokens[2] if tokens is not None else 0  # input + output
        if self._memory_limiter is not None:
            self._memory_limiter.release(key, slot, used)
        elif self.redis_limiter is not None:
            self.redis_limiter.release(key, slot, used)

    async def _refuse_over_limit(
        self, send: Send, refused: LimitRefusal | ProxyError, exchange: _Exchange
    ) -> None:
        if isinstance(refused, ProxyError):  # the limiter's store failed, and fails closed
            await self._refuse(send, refused, exchange)
            return
        error = refused.error()
        exchange.record.status = error.status
        exchange.record.ending = PROXY_ERROR
        await send_proxy_error(send, error, *refused.headers, exchange.request_id_header)

    async def _refuse(self, send: Send, error: ProxyError, exchange: _Exchange) -> None:
        exchange.record.status = error.status
        exchange.record.ending = PROXY_ERROR
        await send_proxy_error(send, error, exchange.request_id_header)


def proxy_error_for(error: UpstreamError) -> ProxyError:
    """Which of the proxy's own errors answers an upstream failure before the response."""
    if isinstance(error, EgressProxyError):
        return errors.upstream_proxy_error(str(error))
    if isinstance(error, ConnectTimeoutError):
        return errors.UPSTREAM_CONNECT_TIMEOUT
    if isinstance(error, ConnectFailedError):
        return errors.UPSTREAM_UNREACHABLE
    if isinstance(error, ReadTimeoutError):
        return errors.UPSTREAM_TIMEOUT
    if isinstance(error, ConnectionClosedError):
        return errors.UPSTREAM_CONNECTION_CLOSED
    return errors.UPSTREAM_BAD_RESPONSE


_KEEPALIVE_COMMENT = b": keep-alive\n\n"
_EVENT_ENDINGS = (b"\n\n", b"\r\n\r\n", b"\r\r")


class _WithKeepalive:
    """The body's chunks, with `: keep-alive` comments during silences of `interval` seconds.

    A comment goes out only where an event has just ended, never inside one, so no SSE parser
    sees a change in the events (WHATWG HTML §9.2.6: lines starting with ':' are ignored).
    """

    def __init__(self, content: UpstreamResponse, interval: float) -> None:
        self._content = content
        self._interval = interval
        self._at_event_boundary = True

    def __aiter__(self) -> _WithKeepalive:
        return self

    async def __anext__(self) -> bytes:
        while True:
            try:
                async with asyncio.timeout(self._interval):
                    chunk = await self._content.read_chunk()
            except TimeoutError:  # the interval; the read timeout is a ReadTimeoutError
                if self._at_event_boundary:
                    return _KEEPALIVE_COMMENT
                continue
            if not chunk:
                raise StopAsyncIteration
            self._at_event_boundary = chunk.endswith(_EVENT_ENDINGS)
            return chunk


def _sent_streamed(body: bytes | StreamedBody) -> bool:
    """Whether the body is streamed and its first byte has gone: it cannot be sent again."""
    return isinstance(body, StreamedBody) and body.started


def _declared_length(headers: list[tuple[bytes, bytes]]) -> int | None:
    """The request's Content-Length (the server has already rejected malformed ones)."""
    for name, value in headers:
        if name == b"content-length":
            return int(value)
    return None


def client_request_id(client_headers: list[tuple[str, str]]) -> str | None:
    """The client's `x-request-id`, if it is one the proxy may log and forward."""
    for name, value in client_headers:
        if name == "x-request-id":
            return usable_request_id(value)
    return None


async def _watch_disconnect(receive: Receive, exchange: _Exchange) -> None:
    """Tell the exchange when the client goes away (under servers other than ours).

    The ASGI server's `send` is silent after a disconnect, so only `receive` can tell.
    """
    message: Message = {"type": ""}
    while message["type"] != "http.disconnect":
        message = await receive()
    exchange.client_left()


async def send_proxy_error(send: Send, error: ProxyError, *extra: tuple[bytes, bytes]) -> None:
    """Answer with one of the proxy's own errors, in the OpenAI shape."""
    body = error.body()
    headers = [*_JSON_HEADERS, (b"content-length", str(len(body)).encode()), *extra]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})
