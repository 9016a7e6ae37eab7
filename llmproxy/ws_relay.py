"""The WebSocket relay (DESIGN §10): each client session gets one upstream session, messages
are copied both ways, and whichever side ends first has its ending passed to the other.

A sibling of the forwarder, sharing its routes, retry policy, access keys and concurrency
count. The client side is the ASGI WebSocket interface (`websocket_protocol.py` adjusts
uvicorn's implementation of it); the upstream side is `websockets`' client connection over a
socket this module dials, so the handshake's headers are written byte for byte as the policy
made them (websockets would re-encode them as UTF-8) and nothing is taken from the process's
environment (websockets would follow `HTTPS_PROXY` and redirects on its own).

Messages, not bytes, are relayed: the message limit and permessage-deflate are per hop (each
side negotiates its own compression), which a byte tunnel could not do without parsing frames.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import time
from dataclasses import dataclass
from typing import Any

from starlette.types import Message, Receive, Scope, Send
from websockets.asyncio.client import ClientConnection
from websockets.client import ClientProtocol
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus
from websockets.extensions.permessage_deflate import enable_client_permessage_deflate
from websockets.frames import Close
from websockets.http11 import Request, Response
from websockets.typing import Subprotocol
from websockets.uri import WebSocketURI

from llmproxy import errors, metrics
from llmproxy.access import AccessKey
from llmproxy.access_log import (
    CLIENT_CLOSED,
    CLIENT_DISCONNECT,
    MESSAGE_TOO_BIG,
    PROXY_ERROR,
    SHUTDOWN,
    UPSTREAM_CLOSED,
    UPSTREAM_ERROR,
    UPSTREAM_REFUSED,
    SessionRecord,
    format_session_json,
    format_session_text,
    log_request,
)
from llmproxy.config import Configuration
from llmproxy.egress import EgressProxy
from llmproxy.errors import ProxyError
from llmproxy.forwarder import Forwarder, Route, client_request_id, proxy_error_for
from llmproxy.headers import filter_response_headers, merge_upstream_headers
from llmproxy.limiter import LimitRefusal
from llmproxy.retry import AttemptOutcome, RetryDecision, next_upstream
from llmproxy.targets import has_dot_segment, is_api_path, request_target
from llmproxy.upstream_client import (
    ConnectFailedError,
    ConnectTimeoutError,
    EgressProxyError,
    Origin,
    UpstreamError,
    default_ssl_context,
)
from llmproxy.usage import RealtimeUsageTap, record_usage
from llmproxy.websocket_protocol import (
    CONNECTION_LOST,
    PROTOCOL_LOGGER,
    SERVER_CLOSED,
    frame_size_limit,
)

logger = logging.getLogger("llmproxy")

GOING_AWAY = 1001  # RFC 6455 §7.4.1: an endpoint is going away
MESSAGE_TOO_BIG_CODE = 1009
BAD_GATEWAY = 1014  # IANA WebSocket close code registry: "Bad Gateway"
NO_STATUS = 1005  # a close frame without a code; sent as an empty close frame
CLOSE_TIMEOUT = 10.0  # for the other side's close reply (websockets' default)
_CLOSE_ON_SHUTDOWN_SECONDS = 1.0

# Handshake fields that belong to one hop: each side's are negotiated with that side.
_HANDSHAKE_HEADERS = frozenset(
    {
        "sec-websocket-key",
        "sec-websocket-version",
        "sec-websocket-extensions",
        "sec-websocket-protocol",
        "sec-websocket-accept",
    }
)
_HANDSHAKE_HEADER_BYTES = frozenset(name.encode() for name in _HANDSHAKE_HEADERS)


# -- close codes: pure rules ------------------------------------------------------------------
def close_towards_upstream(code: int, reason: str, server_closed: bool) -> tuple[int | None, str]:
    """The close the upstream gets when the client's side ended with `code`.

    `server_closed`: the proxy closed the client (its message was over the limit, or it broke
    the protocol), so the upstream hears that the client is going away. None: an empty close
    frame, the client's own when it sent one without a code.
    """
    if server_closed or code == CONNECTION_LOST:
        return GOING_AWAY, ""
    if code == NO_STATUS:
        return None, ""
    return code, reason


def close_towards_client(
    received: Close | None, sent: Close | None, proxy_closed_first: bool
) -> tuple[int | None, str]:
    """The close the client gets when the upstream's side ended.

    `received`/`sent`: the close frames the proxy got from and sent to the upstream, if any.
    The upstream's own close passes unchanged; a message of its over the limit is the upstream
    going away for the client; a lost connection or a broken protocol is a bad gateway.
    """
    if received is not None and not proxy_closed_first:
        if received.code == NO_STATUS:
            return None, ""
        return received.code, received.reason
    if sent is not None and sent.code == MESSAGE_TOO_BIG_CODE:
        return GOING_AWAY, ""
    return BAD_GATEWAY, ""


def text_size(text: str) -> int:
    """The UTF-8 length of a text message (without encoding it when it is ASCII)."""
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


# -- the upstream side ------------------------------------------------------------------------
class _UpstreamHandshake(ClientProtocol):
    """websockets' client protocol, writing the handshake request head as the proxy built it."""

    def __init__(
        self,
        origin: Origin,
        target: str,
        headers: list[tuple[str, str]],
        subprotocols: list[str],
        max_size: int,
    ) -> None:
        uri = WebSocketURI(origin.scheme == "https", origin.host, origin.port, target, "")
        super().__init__(
            uri,
            extensions=enable_client_permessage_deflate(None),
            subprotocols=[Subprotocol(name) for name in subprotocols] or None,
            max_size=frame_size_limit(max_size),  # the exact limit is the relay's to check
            logger=PROTOCOL_LOGGER,
        )
        self._host_header = origin.host_header
        self._headers = headers

    def send_request(self, request: Request) -> None:
        # websockets' own fields (Upgrade, Connection, Sec-WebSocket-*) after Host, then the
        # client's headers as the policy merged them, one byte per character.
        lines = [f"GET {request.path} HTTP/1.1\r\nHost: {self._host_header}\r\n"]
        lines.extend(
            f"{name}: {value}\r\n"
            for name, value in request.headers.raw_items()
            if name.lower() != "host"
        )
        lines.extend(f"{name}: {value}\r\n" for name, value in self._headers)
        lines.append("\r\n")
        text = "".join(lines)
        if text.count("\n") != len(lines) + 1 or text.count("\r") != len(lines) + 1:
            raise _UnsendableHandshakeError("a header or the target holds a line break")
        try:
            self.writes.append(text.encode("latin-1"))
        except UnicodeEncodeError:
            raise _UnsendableHandshakeError("a header holds a character above U+00FF") from None


class _UnsendableHandshakeError(Exception):
    """The handshake request cannot be written safely (see `UnsendableRequestError`)."""


class _HandshakeTimeoutError(Exception):
    """The upstream sent no handshake answer within `read_timeout`."""


async def _dial(origin: Origin, seconds: float) -> socket.socket:
    """A connected non-blocking socket to the origin: directly, or through a `CONNECT` tunnel
    of the egress proxy (DESIGN §12; WebSockets always tunnel, `ws://` and `wss://` alike)."""
    via = origin.via
    try:
        async with asyncio.timeout(seconds):
            if via is None:
                return await _connect_socket(origin.host, origin.port)
            try:
                sock = await _connect_socket(via.host, via.port)
            except OSError as error:
                raise EgressProxyError(
                    f"cannot connect to the egress proxy {via.shown}: {error.strerror or error}"
                ) from None
            try:
                await _open_tunnel(sock, origin, via)
            except BaseException:
                sock.close()
                raise
            return sock
    except TimeoutError:
        if via is not None:
            raise EgressProxyError(
                f"no tunnel from the egress proxy {via.shown} to {origin.host_header} "
                f"within {seconds:g} s"
            ) from None
        raise ConnectTimeoutError(
            f"no connection to {origin.host_header} within {seconds:g} s"
        ) from None
    except OSError as error:
        raise ConnectFailedError(f"cannot connect to {origin.host_header}: {error}") from None


async def _connect_socket(host: str, port: int) -> socket.socket:
    """A connected non-blocking socket, trying each address of `host` in turn."""
    loop = asyncio.get_running_loop()
    addresses = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    failure: OSError = OSError(f"no address for {host}")
    for family, kind, proto, _, address in addresses:
        sock = socket.socket(family, kind, proto)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, address)
        except OSError as error:
            sock.close()
            failure = error
            continue
        except BaseException:
            sock.close()
            raise
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock
    raise failure


async def _open_tunnel(sock: socket.socket, origin: Origin, via: EgressProxy) -> None:
    """Ask the egress proxy for a tunnel to the origin; raises unless it answers 200."""
    loop = asyncio.get_running_loop()
    host = f"[{origin.host}]" if ":" in origin.host else origin.host
    authority = f"{host}:{origin.port}"
    request = f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n"
    if via.authorization is not None:
        request += f"Proxy-Authorization: {via.authorization}\r\n"
    await loop.sock_sendall(sock, (request + "\r\n").encode("latin-1"))
    head = b""
    while b"\r\n\r\n" not in head:  # the server speaks first in no WebSocket: nothing after
        data = await loop.sock_recv(sock, 4096)
        if not data or len(head) > 65536:
            raise EgressProxyError(
                f"the egress proxy {via.shown} closed the tunnel to {authority} unanswered"
            )
        head += data
    status_line = head.split(b"\r\n", 1)[0].split()
    status = status_line[1].decode("ascii", "replace") if len(status_line) > 1 else "?"
    if status != "200":
        raise EgressProxyError(
            f"the egress proxy {via.shown} answered CONNECT {authority} with {status}"
        )


@dataclass(slots=True)
class _Opened:
    """The upstream session once its handshake succeeded."""

    connection: ClientConnection
    subprotocol: str | None
    headers: list[tuple[bytes, bytes]]  # the 101's headers for the client (no hop's own)


@dataclass(slots=True)
class _Upgrade:
    """One client's upgrade request, as the relay answers it."""

    scope: Scope
    send: Send
    record: SessionRecord
    id_header: tuple[bytes, bytes] = (b"x-llmproxy-request-id", b"")

    async def refuse(self, error: ProxyError) -> None:
        """Answer with one of the proxy's own errors instead of upgrading."""
        self.record.status = error.status
        self.record.ending = PROXY_ERROR
        await send_upgrade_refusal(self.send, self.scope, error, self.id_header)

    async def refuse_over_limit(self, refused: LimitRefusal | ProxyError) -> None:
        """Answer 429 (a limit of the key) or 503 (the limiter's store failed closed)."""
        if isinstance(refused, ProxyError):
            await self.refuse(refused)
            return
        error = refused.error()
        self.record.status = error.status
        self.record.ending = PROXY_ERROR
        await send_upgrade_refusal(self.send, self.scope, error, *refused.headers, self.id_header)

    async def pass_refusal(self, response: Response) -> None:
        """The upstream's non-101 answer, as it came (its hop-by-hop headers aside)."""
        raw = [
            (name.encode("ascii", "surrogateescape"), value.encode("ascii", "surrogateescape"))
            for name, value in response.headers.raw_items()
        ]
        headers = filter_response_headers(raw)
        if not any(name.lower() == b"content-length" for name, _ in headers):
            headers.append((b"content-length", str(len(response.body)).encode()))
        headers.append(self.id_header)
        self.record.status = response.status_code
        self.record.ending = UPSTREAM_REFUSED
        await _answer_http(self.send, self.scope, response.status_code, headers, response.body)


class WebSocketRelay:
    """ASGI app for `websocket` scopes: one upstream session per client session."""

    def __init__(self, configuration: Configuration, forwarder: Forwarder) -> None:
        self._forwarder = forwarder  # its routes, and its count of requests (sessions count)
        self._max_concurrent = configuration.max_concurrent_requests
        self._connect_timeout = configuration.connect_timeout
        self._handshake_timeout = configuration.read_timeout
        self._max_message = configuration.max_ws_message_bytes
        self._format_log = (
            format_session_json if configuration.log_format == "json" else format_session_text
        )
        # The upstream client's (upstream_ca_bundle, client certificate); None: the system's.
        self.ssl_context: ssl.SSLContext | None = forwarder.ssl_context

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        record = SessionRecord(scope["path"])
        started = time.perf_counter()
        try:
            message = await receive()
            if message["type"] == "websocket.connect":
                await self._serve(scope, receive, send, record)
            else:
                record.ending = CLIENT_DISCONNECT
        finally:
            record.total_ms = (time.perf_counter() - started) * 1000
            log_request(record, self._format_log)
            metrics.observe_session(record)

    async def _serve(
        self, scope: Scope, receive: Receive, send: Send, record: SessionRecord
    ) -> None:
        client_headers = [(n.decode("latin-1"), v.decode("latin-1")) for n, v in scope["headers"]]
        request_id = client_request_id(client_headers)
        if request_id is None:
            request_id = self._forwarder.new_request_id()
            client_headers = [(n, v) for n, v in client_headers if n != "x-request-id"]
            client_headers.append(("x-request-id", request_id))
        record.request_id = request_id
        upgrade = _Upgrade(scope, send, record, (b"x-llmproxy-request-id", request_id.encode()))
        subprotocols: list[str] = list(scope.get("subprotocols", ()))

        raw_path: bytes = scope.get("raw_path") or scope["path"].encode()
        if not is_api_path(raw_path):
            await upgrade.refuse(errors.NOT_FOUND)
            return
        if has_dot_segment(raw_path):
            await upgrade.refuse(errors.INVALID_PATH)
            return
        keys = self._forwarder.keys
        key: AccessKey | None = None
        if keys:
            by_header = keys.authenticate(client_headers)
            by_subprotocol = keys.authenticate_subprotocols(subprotocols)
            if by_header is None and by_subprotocol is None:
                await upgrade.refuse(errors.INVALID_PROXY_KEY)
                return
            if by_header is not None:
                key, client_headers = by_header
                record.key = key.name
            if by_subprotocol is not None:
                key, subprotocols = by_subprotocol
                record.key = key.name
        forwarder = self._forwarder
        if self._max_concurrent is not None and forwarder.active_requests >= self._max_concurrent:
            await upgrade.refuse(errors.PROXY_OVERLOADED)
            return
        limited = key if key is not None and key.limits.any else None
        if limited is not None:
            slot = forwarder.new_request_id()  # unique, whatever x-request-id the client sent
            refused = await forwarder.check_limits(limited, slot)
            if refused is not None:
                await upgrade.refuse_over_limit(refused)
                return
        headers = [
            (name, value)
            for name, value in client_headers
            if name.lower() not in _HANDSHAKE_HEADERS
        ]
        forwarder.active_requests += 1
        tap = RealtimeUsageTap()
        try:
            opened = await self._open(
                upgrade, raw_path, scope["query_string"], headers, subprotocols
            )
            if opened is None:
                return
            try:
                await send(
                    {
                        "type": "websocket.accept",
                        "subprotocol": opened.subprotocol,
                        "headers": [*opened.headers, upgrade.id_header],
                    }
                )
                record.status = 101
                metrics.WEBSOCKET_SESSIONS_ACTIVE.inc()
                try:
                    await self._relay(receive, send, opened.connection, record, tap)
                finally:
                    metrics.WEBSOCKET_SESSIONS_ACTIVE.dec()
            finally:
                _release(opened.connection)
        finally:
            forwarder.active_requests -= 1
            if record.status == 101:
                usage = tap.usage()
                if usage is not None or tap.responses:
                    record_usage(record, usage)
                    if usage is None and record.ending == CLIENT_CLOSED:
                        # Closed by the client mid-response: the answer was cut by the
                        # client, not whole and unreported (`not_reported`).
                        record.usage_unknown_reason = CLIENT_DISCONNECT
            if limited is not None:
                forwarder.release_limits(limited, slot, record.tokens)

    # -- the handshake ----------------------------------------------------------------------
    async def _open(
        self,
        upgrade: _Upgrade,
        raw_path: bytes,
        query_string: bytes,
        headers: list[tuple[str, str]],
        subprotocols: list[str],
    ) -> _Opened | None:
        """The upstream session, with failover and retries (DESIGN §6); None if answered."""
        record = upgrade.record
        routes = self._forwarder.routes
        loop_started = time.monotonic()
        index = 0
        attempt = 0
        while True:
            attempt += 1
            record.attempts = attempt
            route = routes[index]
            target = request_target(route.base_path, raw_path, query_string)
            try:
                opened = await self._handshake(
                    route, target, merge_upstream_headers(headers, route.headers), subprotocols
                )
            except InvalidStatus as refused:
                response = refused.response
                record.upstream_status = response.status_code
                decision: RetryDecision | None = None
                if response.status_code in self._forwarder.retry_policy.retry_statuses:
                    outcome = AttemptOutcome.response(
                        response.status_code, dict(response.headers.raw_items())
                    )
                    decision = self._forwarder.decide_retry(attempt, outcome, loop_started)
                if decision is None or not decision.retry:
                    await upgrade.pass_refusal(response)
                    return None
            except _UnsendableHandshakeError:
                await upgrade.refuse(errors.INVALID_HEADER)
                return None
            except (ConnectFailedError, _HandshakeTimeoutError, InvalidHandshake) as error:
                outcome = (
                    AttemptOutcome.connect_failed()
                    if isinstance(error, ConnectFailedError)
                    else AttemptOutcome.failed_after_send()
                )
                decision = self._forwarder.decide_retry(attempt, outcome, loop_started)
                if not decision.retry or isinstance(error, EgressProxyError):  # as for HTTP
                    logger.warning("WebSocket upstream failed: %s", error)
                    await upgrade.refuse(_proxy_error_for(error))
                    return None
            else:
                record.upstream_status = 101
                return opened
            logger.info("retrying in %.3fs: %s", decision.delay, decision.reason)
            await asyncio.sleep(decision.delay)
            index = next_upstream(index, len(routes))

    async def _handshake(
        self, route: Route, target: str, headers: list[tuple[str, str]], subprotocols: list[str]
    ) -> _Opened:
        origin = route.origin
        sock = await _dial(origin, self._connect_timeout)
        protocol = _UpstreamHandshake(origin, target, headers, subprotocols, self._max_message)
        # At most a few frames wait for a slow client: with the message limit, that bounds
        # what a session can hold (websockets' default is 16).
        connection = ClientConnection(
            protocol, close_timeout=CLOSE_TIMEOUT, max_queue=(4, 1), write_limit=2**16
        )
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._handshake_timeout):
                if origin.scheme == "https":
                    await loop.create_connection(
                        lambda: connection,
                        sock=sock,
                        ssl=self.ssl_context or default_ssl_context(),
                        server_hostname=origin.host,
                    )
                else:
                    await loop.create_connection(lambda: connection, sock=sock)
                await connection.handshake(user_agent_header=None)
        except TimeoutError:
            _abort(connection, sock)
            raise _HandshakeTimeoutError(
                f"no handshake answer from {origin.host_header} "
                f"within {self._handshake_timeout:g} s"
            ) from None
        except OSError as error:  # TLS failures, resets while connecting
            _abort(connection, sock)
            raise ConnectFailedError(f"cannot connect to {origin.host_header}: {error}") from None
        except BaseException:
            _abort(connection, sock)
            raise
        connection.start_keepalive()
        response = connection.response
        assert response is not None
        answer = [
            (name.encode("ascii", "surrogateescape"), value.encode("ascii", "surrogateescape"))
            for name, value in response.headers.raw_items()
        ]
        kept = [
            (name, value)
            for name, value in filter_response_headers(answer)
            if name.lower() not in _HANDSHAKE_HEADER_BYTES
        ]
        return _Opened(connection, connection.subprotocol, kept)

    # -- the session ------------------------------------------------------------------------
    async def _relay(
        self,
        receive: Receive,
        send: Send,
        upstream: ClientConnection,
        record: SessionRecord,
        tap: RealtimeUsageTap,
    ) -> None:
        """Copy both ways until one side ends, then close the other side accordingly."""
        limit = self._max_message
        to_upstream = asyncio.create_task(_client_to_upstream(receive, upstream, record, limit))
        to_client = asyncio.create_task(_upstream_to_client(upstream, send, record, limit, tap))
        pending: set[asyncio.Task[Any]] = {to_upstream, to_client}
        try:
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                if to_upstream in done and (ended := to_upstream.result()) is not None:
                    to_client.cancel()
                    await self._client_ended(ended, upstream, send, record)
                    return
                if to_client in done and (closed := to_client.result()) is not None:
                    to_upstream.cancel()
                    await self._upstream_ended(closed, send, record)
                    return
        except asyncio.CancelledError:
            # The drain deadline of a shutdown: both sides hear that the proxy goes away.
            to_upstream.cancel()
            to_client.cancel()
            record.ending = SHUTDOWN
            record.client_close_code = record.upstream_close_code = GOING_AWAY
            with contextlib.suppress(Exception):
                await send({"type": "websocket.close", "code": GOING_AWAY, "reason": ""})
            with contextlib.suppress(Exception):
                async with asyncio.timeout(_CLOSE_ON_SHUTDOWN_SECONDS):
                    await upstream.close(GOING_AWAY, "")
            raise

    async def _client_ended(
        self, ended: Message, upstream: ClientConnection, send: Send, record: SessionRecord
    ) -> None:
        code: int = ended.get("code", 1000)
        server_closed = bool(ended.get(SERVER_CLOSED))
        if ended is _CLIENT_MESSAGE_TOO_BIG:
            with contextlib.suppress(OSError):  # the client left meanwhile
                await send(ended)  # it is also the close message the client gets
        record.client_close_code = code
        if code == CONNECTION_LOST:
            record.ending = CLIENT_DISCONNECT
        elif server_closed:
            record.ending = MESSAGE_TOO_BIG if code == MESSAGE_TOO_BIG_CODE else PROXY_ERROR
        else:
            record.ending = CLIENT_CLOSED
        reason = ended.get("reason") or ""
        upstream_code, reason = close_towards_upstream(code, reason, server_closed)
        record.upstream_close_code = upstream_code or NO_STATUS
        # Sends the close frame at once; then waits (bounded) for the upstream's reply.
        await upstream.close(upstream_code, reason)  # type: ignore[arg-type]

    async def _upstream_ended(
        self, ending: _UpstreamEnding, send: Send, record: SessionRecord
    ) -> None:
        received, sent = ending.received, ending.sent
        proxy_closed_first = ending.proxy_closed_first
        code, reason = close_towards_client(received, sent, proxy_closed_first)
        if received is not None and not proxy_closed_first:
            record.upstream_close_code = received.code
            record.ending = UPSTREAM_CLOSED
        elif sent is not None and sent.code == MESSAGE_TOO_BIG_CODE:
            record.upstream_close_code = MESSAGE_TOO_BIG_CODE
            record.ending = MESSAGE_TOO_BIG
        else:
            record.upstream_close_code = sent.code if sent is not None else CONNECTION_LOST
            record.ending = UPSTREAM_ERROR
        record.client_close_code = code or NO_STATUS
        message: Message = {"type": "websocket.close", "code": code, "reason": reason}
        with contextlib.suppress(OSError):  # the client left meanwhile
            await send(message)


# A client message over the limit that websockets let through (see `frame_size_limit`): the
# relay closes the client with this, and reports it as the client side's ending.
_CLIENT_MESSAGE_TOO_BIG: Message = {
    "type": "websocket.close",
    "code": MESSAGE_TOO_BIG_CODE,
    "reason": "message too big",
    SERVER_CLOSED: True,
}


async def _client_to_upstream(
    receive: Receive, upstream: ClientConnection, record: SessionRecord, limit: int
) -> Message | None:
    """Client messages to the upstream; the client's disconnect message when it ends, or None
    when the upstream side broke first (its own task reports how)."""
    messages = metrics.WEBSOCKET_MESSAGES_TO_UPSTREAM
    sizes = metrics.WEBSOCKET_BYTES_TO_UPSTREAM
    while True:
        message = await receive()
        if message["type"] != "websocket.receive":
            return message  # websocket.disconnect
        text = message.get("text")
        data: str | bytes
        if text is not None:
            data, size = text, text_size(text)
        else:
            data = message.get("bytes") or b""
            size = len(data)
        if size > limit:
            return _CLIENT_MESSAGE_TOO_BIG
        try:
            await upstream.send(data)
        except ConnectionClosed:
            return None
        record.messages_to_upstream += 1
        record.bytes_to_upstream += size
        messages.inc()
        sizes.inc(size)


@dataclass(frozen=True, slots=True)
class _UpstreamEnding:
    """How the upstream session ended: the close frames each way, and who closed first."""

    received: Close | None
    sent: Close | None
    proxy_closed_first: bool


async def _upstream_to_client(
    upstream: ClientConnection,
    send: Send,
    record: SessionRecord,
    limit: int,
    tap: RealtimeUsageTap,
) -> _UpstreamEnding | None:
    """Upstream messages to the client; how the upstream session ended, or None when the
    client side broke first (its disconnect message reports how)."""
    messages = metrics.WEBSOCKET_MESSAGES_TO_CLIENT
    sizes = metrics.WEBSOCKET_BYTES_TO_CLIENT
    while True:
        try:
            data = await upstream.recv()
        except ConnectionClosed as closed:
            # The facts, not the exception: its traceback would hold this frame, and with it
            # the connection, in a reference cycle that only a full collection frees.
            return _UpstreamEnding(closed.rcvd, closed.sent, closed.rcvd_then_sent is False)
        message: Message
        if isinstance(data, str):
            message = {"type": "websocket.send", "text": data}
            size = text_size(data)
            tap.feed(data)
        else:
            message = {"type": "websocket.send", "bytes": data}
            size = len(data)
        if size > limit:  # one websockets let through (see `frame_size_limit`)
            closing = Close(MESSAGE_TOO_BIG_CODE, "message too big")
            await upstream.close(closing.code, closing.reason)
            return _UpstreamEnding(None, closing, proxy_closed_first=True)
        try:
            await send(message)
        except OSError:  # uvicorn's ClientDisconnected: the client went away
            return None
        record.messages_to_client += 1
        record.bytes_to_client += size
        messages.inc()
        sizes.inc(size)


async def _answer_http(
    send: Send, scope: Scope, status: int, headers: list[tuple[bytes, bytes]], body: bytes
) -> None:
    """Refuse the upgrade with an HTTP response (ASGI's WebSocket Denial Response extension)."""
    if "websocket.http.response" in scope.get("extensions", {}):
        await send({"type": "websocket.http.response.start", "status": status, "headers": headers})
        await send({"type": "websocket.http.response.body", "body": body, "more_body": False})
    else:  # a server without the extension can only refuse with 403
        await send({"type": "websocket.close", "code": 1008})


async def send_upgrade_refusal(
    send: Send, scope: Scope, error: ProxyError, *extra: tuple[bytes, bytes]
) -> None:
    """Refuse a WebSocket upgrade with one of the proxy's own errors, in the OpenAI shape."""
    body = error.body()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        *extra,
    ]
    await _answer_http(send, scope, error.status, headers, body)


def _release(connection: ClientConnection) -> None:
    """End the upstream session for good, and let go of its compression state now.

    The connection is closed by now on every ending but an error or the drain deadline; it is
    never left open behind the client's. websockets' connection objects end in reference
    cycles (its keep-alive task's cancellation holds the connection) that wait for a full
    garbage collection, which the proxy's collector settings make rare; dropping the
    permessage-deflate state (two zlib streams, the bulk of a session's memory) frees that at
    once.
    """
    connection.transport.abort()
    connection.protocol.extensions = []


def _abort(connection: ClientConnection, sock: socket.socket) -> None:
    transport = getattr(connection, "transport", None)
    if transport is not None:
        transport.abort()
    else:
        sock.close()


def _proxy_error_for(error: Exception) -> ProxyError:
    """The refusal for a failed upstream handshake: connecting fails as for HTTP."""
    if isinstance(error, UpstreamError):
        return proxy_error_for(error)
    if isinstance(error, _HandshakeTimeoutError):
        return errors.UPSTREAM_HANDSHAKE_TIMEOUT
    return errors.UPSTREAM_BAD_HANDSHAKE
