"""The HTTP/1.1 server protocol: uvicorn's httptools protocol with the gaps a proxy cannot leave.

Found by the hostile-input tests (tests/e2e/test_hostile_input.py), each a uvicorn behaviour
that is harmless for an application but not for a proxy that forwards what it receives:

* Trailer fields of a chunked body were appended to the request's header list, so they reached
  the forwarder as headers (a proxy key in a trailer authenticated the request). Trailers are
  now dropped.
* A request offering `Connection: Upgrade` for anything but WebSocket lost its body: the parser
  stops at the upgrade and the body was never delivered (Kludex/uvicorn#2722). RFC 9110 §7.8 lets
  a server ignore the offer; the body is now delivered and the connection closed afterwards.
* No limit on the header block: now at most `MAX_HEADERS` fields and `MAX_HEADER_BYTES`, counted
  as bytes arrive (the request target and trailers included), else 431 (414 for the target).
  httptools holds a field until its line ends and grows it by `bytes +=`, so counting complete
  fields alone let an unterminated 32 MiB value cost 1.6 s of CPU and 34 MB (issue 10).
* No client timeouts: a connection that trickled a head, or sent nothing, was held forever.
  Now `client_header_timeout` runs from the connection's opening (or a kept-alive connection's
  first byte of its next request) to the end of the head, `client_body_timeout` between two
  parts of a body, as nginx's `client_header_timeout` / `client_body_timeout` do (DESIGN §13).
* A 304 answer with a `Content-Length` (RFC 9110 §8.6) made uvicorn wait for that many body
  bytes, log "Response content shorter than Content-Length" and reset the connection.
* `Transfer-Encoding` codings other than a single final `chunked` are refused (RFC 9112 §6.1):
  uvicorn removed only the chunking and the coded bytes would pass on as plain.
* uvicorn's own refusals were `text/plain`; they are now the OpenAI error shape.

It also tells the application when the client leaves (`DisconnectSignal`), which uvicorn only
reports to a task waiting in `receive()`: keeping such a task per request cost more than any
other single part of the proxy's own work (issue 6).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from typing import Any

import httptools
from uvicorn.protocols.http.httptools_impl import (
    STATUS_LINE,
    HttpToolsProtocol,
    RequestResponseCycle,
)

from llmproxy.errors import openai_error_body
from llmproxy.headers import FIELD_NAME_BYTES_FINE, FIELD_VALUE_BYTES_FINE
from llmproxy.metrics import CLIENT_TIMEOUTS

MAX_HEADERS = 100
MAX_HEADER_BYTES = 64 * 1024  # the request line, header fields and trailer fields, each block

DEFAULT_CLIENT_HEADER_TIMEOUT = 60.0  # nginx's client_header_timeout
DEFAULT_CLIENT_BODY_TIMEOUT = 60.0  # nginx's client_body_timeout

# Reads larger than this are fed to the parser in slices of it, so that the head limit holds
# within one slice whatever the read size (see `data_received`); smaller reads, nearly all of
# them, go in whole.
_FEED_SLICE = 16 * 1024

# The app's lifespan state (uvicorn hands it to every connection's protocol as `app_state`)
# carries the configured client timeouts: (header, body) in seconds.
CLIENT_TIMEOUTS_STATE = "llmproxy.client_timeouts"

# ASGI server extension (the spec's `scope["extensions"]`): each request's DisconnectSignal is
# `scope["extensions"][DISCONNECT_EXTENSION]["signal"]`.
DISCONNECT_EXTENSION = "llmproxy.disconnect"

# A key of an `http.response.start` message: true when the sender has already checked every
# header name and value (the forwarder: names as llhttp parsed them from the upstream, values
# scanned for control bytes before it commits to the answer), so the server does not scan
# them again. Other servers ignore unknown keys (ASGI).
HEADERS_CHECKED = "llmproxy.headers_checked"


class DisconnectSignal:
    """Set on the connection's loss: `gone` becomes true and `callback`, if set, is called."""

    __slots__ = ("callback", "gone", "timed_out")

    def __init__(self) -> None:
        self.callback: Callable[[], None] | None = None
        self.gone = False
        self.timed_out = False  # closed by `client_body_timeout`, not by the client

    def fire(self) -> None:
        self.gone = True
        callback, self.callback = self.callback, None
        if callback is not None:
            callback()


class _WritesJoinedPerTurn:
    """A connection's transport whose writes within one turn of the event loop go out as one.

    uvicorn writes a response's head as soon as the app sends it, then each body part: for an
    answer whose body is already there that is two system calls and two TCP segments where one
    does. Joined, nothing waits longer than the current turn of the loop. Every write-like call
    goes through the same list, so bytes can never leave out of order; the list is joined once
    (growing one `bytes` by `+=` was quadratic: 5,000 writes of 200 B took 727 ms).
    """

    __slots__ = ("_eof", "_loop", "_pending", "_transport")

    def __init__(self, transport: Any, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._pending: list[bytes] | None = None
        self._eof = False  # write_eof was called: nothing more may be written

    def write(self, data: bytes) -> None:
        if self._pending is None:
            if data:
                self._pending = [data]
                self._loop.call_soon(self._flush)
        elif data:
            self._pending.append(data)

    def writelines(self, list_of_data: Iterable[bytes]) -> None:
        for data in list_of_data:
            self.write(data)

    def _flush(self) -> None:
        pending, self._pending = self._pending, None
        if pending and not self._eof and not self._transport.is_closing():
            self._transport.write(pending[0] if len(pending) == 1 else b"".join(pending))

    def unwrap(self) -> Any:
        """The transport underneath, once what is pending has been written to it."""
        self._flush()
        return self._transport

    def write_eof(self) -> None:
        self._flush()
        if not self._eof:
            self._eof = True
            self._transport.write_eof()

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def is_closing(self) -> bool:
        return bool(self._transport.is_closing())

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


def disconnect_signal(scope: Any) -> DisconnectSignal | None:
    """The request's DisconnectSignal, if the server is `ProxyHttpProtocol`."""
    extension = scope.get("extensions", {}).get(DISCONNECT_EXTENSION)
    signal = extension.get("signal") if extension is not None else None
    return signal if isinstance(signal, DisconnectSignal) else None


class _RefusedRequestError(Exception):
    """Raised inside a parser callback to refuse the request with `status`."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


_REASONS = {
    400: b"Bad Request",
    408: b"Request Timeout",
    414: b"URI Too Long",
    431: b"Request Header Fields Too Large",
}
_CODES = {
    400: "invalid_http_request",
    408: "request_timeout",
    414: "uri_too_long",
    431: "request_header_fields_too_large",
}

# Where a connection is, for the client timeouts.
_IDLE = 0  # between requests, or the request is whole and being answered: no client timeout
_HEAD = 1  # waiting for, or reading, a request head: `client_header_timeout` from `_since`
_BODY = 2  # reading a request body: `client_body_timeout` of silence since `_since`
_LINGER = 3  # refused: reading and dropping what the client still sends, until `_since` + this

# After a refusal the connection's sending side is shut and what the client still sends is read
# and dropped for up to this long, then it is closed (nginx's lingering close). Closing at once
# with unread bytes makes the kernel send a reset, which can destroy the refusal before the
# client reads it: a client still sending a huge head would see a reset instead of a 431.
LINGER_SECONDS = 2.0


class _ProxyCycle(RequestResponseCycle):
    """uvicorn's request cycle with its `send` written for the proxy's hot path.

    The same ASGI semantics as uvicorn's `RequestResponseCycle.send` (flow control, framing by
    Content-Length or chunked, `Connection: close`, HEAD, completion), with two differences:

    * header names and values are checked by one scan over all names and one over all values
      (the same bytes refused, the same `RuntimeError`), not two searches per header;
    * a 304 may carry the `Content-Length` the full answer would have had (RFC 9110 §8.6) and
      is never followed by a body (RFC 9112 §6.3); uvicorn expected that many bytes and reset
      the connection when they did not come. A 204 has no body either. (HEAD it handles.)

    The test of the first is tests/unit/test_response_start.py (the same bytes, errors and
    state as uvicorn's for the same messages); of the second, the 304 tests of
    tests/e2e/test_hostile_input.py. A sender that checked its headers itself says so with
    `HEADERS_CHECKED` in its message, and they are not scanned again.
    """

    async def send(self, message: Any) -> None:
        if self.flow.write_paused and not self.disconnected:
            await self.flow.drain()
        if self.disconnected:
            return
        if not self.response_started:
            if message["type"] != "http.response.start":
                raise RuntimeError(
                    f"Expected ASGI message 'http.response.start', but got '{message['type']}'."
                )
            if self.access_log:  # (llmproxy serves without uvicorn's access log)
                await super().send(message)
            else:
                self._start_response(
                    message["status"], message.get("headers", ()), HEADERS_CHECKED in message
                )
            if message["status"] in (204, 304):
                self.expected_content_length = 0
                self.chunked_encoding = False
            return
        if self.response_complete:
            raise RuntimeError(
                f"Unexpected ASGI message '{message['type']}' sent, after response already "
                "completed."
            )
        if message["type"] != "http.response.body":
            raise RuntimeError(
                f"Expected ASGI message 'http.response.body', but got '{message['type']}'."
            )
        body = message.get("body", b"")
        more_body = message.get("more_body", False)
        if self.scope["method"] == "HEAD":
            self.expected_content_length = 0
        elif self.chunked_encoding:
            if body:
                self.transport.write(
                    b"%x\r\n%b\r\n0\r\n\r\n" % (len(body), body)
                    if not more_body
                    else b"%x\r\n%b\r\n" % (len(body), body)
                )
            elif not more_body:
                self.transport.write(b"0\r\n\r\n")
        else:
            if len(body) > self.expected_content_length:
                raise RuntimeError("Response content longer than Content-Length")
            self.expected_content_length -= len(body)
            self.transport.write(body)
        if not more_body:
            if self.expected_content_length != 0:
                raise RuntimeError("Response content shorter than Content-Length")
            self.response_complete = True
            self.message_event.set()
            if not self.keep_alive:
                self.transport.close()
            self.on_response()

    def _start_response(
        self, status: int, message_headers: Iterable[Any], checked: bool = False
    ) -> None:
        self.response_started = True
        self.waiting_for_100_continue = False
        headers = [*self.default_headers, *message_headers]
        names = [name.lower() for name, _ in headers]
        values = [value for _, value in headers]
        content = [STATUS_LINE[status]]
        if (
            (
                not checked
                and (
                    b"".join(names).translate(None, FIELD_NAME_BYTES_FINE)
                    or b"".join(values).translate(None, FIELD_VALUE_BYTES_FINE)
                )
            )
            or b"transfer-encoding" in names
            or b"connection" in names
        ):
            # Rare (the forwarder drops both fields, hop-by-hop): uvicorn's walk, in order.
            has_connection_close = self._walk_headers(names, values)
        else:
            has_connection_close = False
            if b"content-length" in names and self.chunked_encoding is None:
                self.expected_content_length = int(values[names.index(b"content-length")].decode())
                self.chunked_encoding = False
        for name, value in zip(names, values, strict=True):
            content += (name, b": ", value, b"\r\n")
        if not self.keep_alive and not has_connection_close:
            content.append(b"connection: close\r\n")
        if (
            self.chunked_encoding is None
            and self.scope["method"] != "HEAD"
            and status not in (204, 304)
        ):
            self.chunked_encoding = True
            content.append(b"transfer-encoding: chunked\r\n")
        content.append(b"\r\n")
        self.transport.write(b"".join(content))

    def _walk_headers(self, names: list[bytes], values: list[bytes]) -> bool:
        """uvicorn's walk over the headers: each checked, then read for framing (the first
        Content-Length unless a `Transfer-Encoding: chunked` came before; chunked wherever it
        comes; `close` in any Connection field), failing where uvicorn fails. Whether a
        Connection field said close."""
        has_connection_close = False
        for name, value in zip(names, values, strict=True):
            if name.translate(None, FIELD_NAME_BYTES_FINE):
                raise RuntimeError("Invalid HTTP header name.")
            if value.translate(None, FIELD_VALUE_BYTES_FINE):
                raise RuntimeError("Invalid HTTP header value.")
            if name == b"content-length" and self.chunked_encoding is None:
                self.expected_content_length = int(value.decode())
                self.chunked_encoding = False
            elif name == b"transfer-encoding" and value.lower() == b"chunked":
                self.expected_content_length = 0
                self.chunked_encoding = True
            elif name == b"connection" and b"close" in [
                token.lower().strip() for token in value.split(b",")
            ]:
                self.keep_alive = False
                has_connection_close = True
        return has_connection_close


class ProxyHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, hardened for forwarding (see the module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_bytes = 0  # bytes of the request line and header (or trailer) fields so far
        self._unparsed = 0  # bytes fed since the head began or body bytes last came
        self._url_parts: list[bytes] | None = None  # a target that arrived in pieces
        self._in_trailers = False
        self._upgrade_body_left: int | None = None  # body bytes still owed after an upgrade offer
        self._header_timeout, self._body_timeout = self.app_state.get(
            CLIENT_TIMEOUTS_STATE, (DEFAULT_CLIENT_HEADER_TIMEOUT, DEFAULT_CLIENT_BODY_TIMEOUT)
        )
        # One timer per connection, re-armed lazily: the phase and `_since` change per request,
        # the timer only when it fires or must fire earlier (SHAPE: nothing per chunk).
        self._phase = _HEAD
        self._since = 0.0
        self._received_any = False  # any byte at all: a head phase entered later began with one
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0

    # -- connection ------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        # Every write of the connection (responses, refusals, 100 Continue) goes through one
        # joining buffer, so they leave in order.
        self.transport = _WritesJoinedPerTurn(transport, self.loop)  # type: ignore[assignment]
        self._since = self.loop.time()
        self._arm(self._since + self._header_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()
        cycle = self.cycle
        super().connection_lost(exc)
        if cycle is not None and cycle.disconnected:  # lost before the response was complete
            signal = disconnect_signal(cycle.scope)
            if signal is not None:
                signal.fire()

    def shutdown(self) -> None:
        if self._phase == _LINGER:  # refused already: nothing left to finish
            self._cancel_timer()
            self.transport.close()
            return
        super().shutdown()

    def _get_upgrade(self) -> bytes | None:
        # uvicorn reads only the last `Connection` field; RFC 9110 §5.3 makes repeated fields
        # one list, so `Connection: Upgrade` then `Connection: x-hop` still offers an upgrade.
        offered = False
        upgrade = None
        for name, value in self.headers:
            if name == b"connection":
                offered = offered or b"upgrade" in (t.strip().lower() for t in value.split(b","))
            elif name == b"upgrade":
                upgrade = value.lower()
        return upgrade if offered else None

    def _should_upgrade(self) -> bool:
        # RFC 6455 §4.1: the opening handshake is a GET. Any other method's offer to upgrade
        # to a WebSocket is served as plain HTTP, its body delivered (RFC 9110 §7.8).
        return self.scope.get("method") == "GET" and super()._should_upgrade()

    def handle_websocket_upgrade(self) -> None:
        if any(
            name == b"transfer-encoding" or (name == b"content-length" and value.strip() != b"0")
            for name, value in self.headers
        ):
            # RFC 6455 §4.1 has no body on the opening handshake; bytes after the head would
            # be read as frames (or dropped), so the request is refused instead.
            self._refuse(400, "A WebSocket upgrade request cannot carry a body.")
            return
        # websockets refuses a handshake with any Content-Length, so an empty one is left out.
        self.scope["headers"] = [h for h in self.scope["headers"] if h[0] != b"content-length"]
        # The connection is the WebSocket protocol's from here on, with the plain transport.
        self._cancel_timer()
        self._phase = _IDLE
        joined = self.transport
        if isinstance(joined, _WritesJoinedPerTurn):
            self.transport = joined.unwrap()
        super().handle_websocket_upgrade()

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: Any) -> None:
        # uvicorn's (newer releases; older ones create the task inline), with one name for
        # all: asyncio formats a "Task-N" name for every unnamed task (~1,500 instructions a
        # request under callgrind).
        if getattr(self.config, "reset_contextvars", False):
            super()._start_asgi_task(cycle, app)
            return
        task = self.loop.create_task(cycle.run_asgi(app), name="llmproxy-request")
        task.add_done_callback(self.tasks.discard)
        self.tasks.add(task)

    # -- parser callbacks ------------------------------------------------------------------
    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.scope["extensions"] = {DISCONNECT_EXTENSION: {"signal": DisconnectSignal()}}
        self._head_bytes = 0
        self._url_parts = None
        self._in_trailers = False

    def on_url(self, url: bytes) -> None:
        self._head_bytes += len(url)
        if self._head_bytes > MAX_HEADER_BYTES:
            raise _RefusedRequestError(
                414, f"The request target is longer than {MAX_HEADER_BYTES} bytes."
            )
        # uvicorn grows the target by `bytes +=`; pieces are joined once instead.
        if self._url_parts is None:
            if not self.url:
                self.url = url  # the common case: the whole target in one piece
                return
            self._url_parts = [self.url]
        self._url_parts.append(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_bytes += len(name) + len(value) + 4
        if self._in_trailers:
            # Trailer fields are not headers: a proxy must not forward them as such. They are
            # counted against the same limit, as a second head.
            if self._head_bytes > MAX_HEADER_BYTES:
                raise _RefusedRequestError(
                    431, f"The request's trailer fields are over {MAX_HEADER_BYTES} bytes."
                )
            return
        # uvicorn's `on_header` inlined (one Python call per header fewer; the canary test
        # in tests/unit/test_server_protocol.py compares the two).
        name = name.lower()
        headers = self.headers
        headers.append((name, value))
        if len(headers) > MAX_HEADERS or self._head_bytes > MAX_HEADER_BYTES:
            raise _RefusedRequestError(
                431,
                f"The request has more than {MAX_HEADERS} header fields or "
                f"{MAX_HEADER_BYTES} bytes of them.",
            )
        if name == b"transfer-encoding":
            if value.strip().lower() != b"chunked":
                raise _RefusedRequestError(400, "Only 'Transfer-Encoding: chunked' is accepted.")
        elif name == b"expect" and value.lower() == b"100-continue":
            self.expect_100_continue = True

    def on_headers_complete(self) -> None:
        self._unparsed = 0
        if self._url_parts is not None:
            self.url = b"".join(self._url_parts)
            self._url_parts = None
        codings = [v for n, v in self.headers if n == b"transfer-encoding"]
        if len(codings) > 1:
            raise _RefusedRequestError(400, "Only 'Transfer-Encoding: chunked' is accepted.")
        super().on_headers_complete()
        self._in_trailers = True
        self._head_bytes = 0  # trailers, if any, start a count of their own
        cycle = self.cycle
        if cycle is not None and type(cycle) is RequestResponseCycle:
            cycle.__class__ = _ProxyCycle  # same attributes; see _ProxyCycle
        # The head is complete: its timeout ends and the body's begins.
        self._phase = _BODY
        self._since = self.loop.time()
        self._arm(self._since + self._body_timeout)

    def on_body(self, body: bytes) -> None:
        self._unparsed = 0
        super().on_body(body)

    def on_message_complete(self) -> None:
        # On an upgrade offer httptools tells the parser to skip the body and completes the
        # message at once; completing it then would let the app read an empty body before the
        # real one arrives. `_ignore_upgrade` completes it once the body is delivered.
        if (
            self._upgrade_body_left is None
            and self.parser.should_upgrade()
            and not self._should_upgrade()
        ):
            return
        self._unparsed = 0
        self._phase = _IDLE  # the request is whole; the answer takes as long as it takes
        super().on_message_complete()

    # -- bytes in --------------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        phase = self._phase
        if phase == _LINGER:
            return  # refused: read and dropped
        if phase == _BODY:
            self._since = self.loop.time()
        elif phase == _IDLE:
            # The first byte of the next request on a kept-alive connection: its head's
            # timeout starts now.
            self._phase = _HEAD
            self._since = self.loop.time()
            self._arm(self._since + self._header_timeout)
        self._received_any = True
        if self._upgrade_body_left is not None:
            # After an ignored upgrade offer the parser is stopped: the body is counted here,
            # and anything past it is dropped (the connection closes after the response).
            self._deliver_upgrade_body(data)
            return
        self._unset_keepalive_if_required()
        # The parser holds a field until its line ends, so the limit must hold on bytes as
        # they arrive: `_unparsed` counts every byte since the head began (or since the last
        # body bytes, for trailers) and only the end of the head or body bytes reset it. What
        # follows the last reset within one feed is counted from the next feed on, so a large
        # read is fed in slices: the limit then holds within one slice.
        view = memoryview(data) if len(data) > _FEED_SLICE else None
        offset = 0
        try:
            if view is None:
                self._unparsed += len(data)
                self.parser.feed_data(data)
            else:
                while offset < len(data) and self._unparsed <= MAX_HEADER_BYTES:
                    piece = view[offset : offset + _FEED_SLICE]
                    self._unparsed += len(piece)
                    self.parser.feed_data(piece)
                    offset += len(piece)
        except httptools.HttpParserCallbackError as error:
            refusal = error.__context__
            if isinstance(refusal, _RefusedRequestError):
                self._refuse(refusal.status, str(refusal))
            else:
                self._refuse(400, "Invalid HTTP request received.")
            return
        except httptools.HttpParserError:
            self._refuse(400, "Invalid HTTP request received.")
            return
        except httptools.HttpParserUpgrade as upgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._ignore_upgrade(data[offset + upgrade.args[0] :])
            return
        if self._unparsed > MAX_HEADER_BYTES:
            # (A target is reported in pieces as it arrives, so on_url alone bounds it.)
            self._refuse(431, f"A header or trailer field is over {MAX_HEADER_BYTES} bytes.")

    # -- client timeouts -------------------------------------------------------------------
    def _arm(self, deadline: float) -> None:
        timer = self._timer
        if timer is not None:
            if self._timer_at <= deadline:
                return  # it fires first and re-arms for whatever the deadline is then
            timer.cancel()
        self._timer_at = deadline
        self._timer = self.loop.call_at(deadline, self._check_client_timeout)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _check_client_timeout(self) -> None:
        self._timer = None
        phase = self._phase
        if phase == _IDLE or self.transport.is_closing():
            return  # re-armed when the next request's first byte arrives
        now = self.loop.time()
        cycle = self.cycle
        if phase == _LINGER:
            if now < self._since + LINGER_SECONDS:
                self._arm(self._since + LINGER_SECONDS)
            else:
                self.transport.close()
            return
        if phase == _HEAD:
            if cycle is not None and not cycle.response_complete:
                # A pipelined head behind an answer still going out: the wait is the proxy's.
                self._since = now
            deadline = self._since + self._header_timeout
        else:
            if self.flow is not None and self.flow.read_paused:
                self._since = now  # reading is paused for the app: the silence is not theirs
            deadline = self._since + self._body_timeout
        if now < deadline:
            self._arm(deadline)
            return
        self._client_timed_out(phase)

    def _client_timed_out(self, phase: int) -> None:
        CLIENT_TIMEOUTS.labels("header" if phase == _HEAD else "body").inc()
        cycle = self.cycle if phase == _BODY else None
        if cycle is not None:
            signal = disconnect_signal(cycle.scope)
            if signal is not None:
                signal.timed_out = True
        answered = cycle is not None and cycle.response_started
        if phase == _HEAD and not self._received_any:
            answered = True  # nothing of a request arrived: nothing to answer, only close
        if answered:
            self.transport.close()
        else:
            what = "head" if phase == _HEAD else "body"
            timeout = self._header_timeout if phase == _HEAD else self._body_timeout
            self._refuse(408, f"The request {what} did not arrive within {timeout:g} s.")

    # -- refusals --------------------------------------------------------------------------
    def _ignore_upgrade(self, rest: bytes) -> None:
        """Serve an upgrade offer as plain HTTP/1.1: deliver the body the parser stopped before."""
        if self.cycle is None or self.cycle.response_complete:
            return
        lengths = [v for n, v in self.headers if n == b"content-length"]
        if any(n == b"transfer-encoding" for n, _ in self.headers) or len(lengths) > 1:
            self._refuse(400, "A chunked body cannot come with an upgrade offer.")
            return
        self.cycle.keep_alive = False  # the parser cannot read another request on it
        self._upgrade_body_left = int(lengths[0]) if lengths else 0
        if self._upgrade_body_left == 0:
            self.on_message_complete()
        else:
            self._deliver_upgrade_body(rest)

    def _deliver_upgrade_body(self, data: bytes) -> None:
        left = self._upgrade_body_left
        if self.cycle is None or not left:
            return
        part = data[:left]
        self._upgrade_body_left = left - len(part)
        if part:
            self.on_body(part)
        if self._upgrade_body_left == 0:
            self.on_message_complete()

    def _refuse(self, status: int, message: str) -> None:
        """Answer `status` in the OpenAI error shape, then close the connection (lingering)."""
        if status == 408:
            # A slow-client attack would be a line per connection: counted in
            # llmproxy_client_timeouts_total instead, and logged only when debugging.
            self.logger.debug("Closed a slow client: %s", message)
        else:
            self.logger.warning("Refused request: %s", message)
        self._phase = _IDLE
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            cycle.keep_alive = False
            if cycle.response_started:  # an answer is already on its way: only close
                self._cancel_timer()
                self.transport.close()
                return
            # For the app the client is gone: its `receive` says so at once, whatever it still
            # sends is dropped, and a forwarding under way is cancelled.
            cycle.disconnected = True
            cycle.message_event.set()
            signal = disconnect_signal(cycle.scope)
            if signal is not None:
                signal.fire()
        body = openai_error_body(message, "invalid_request_error", _CODES[status])
        head = (
            b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
            b"connection: close\r\n\r\n" % (status, _REASONS[status], len(body))
        )
        transport = self.transport
        transport.write(head + body)
        if not transport.can_write_eof():  # TLS: no half-close, so no lingering either
            self._cancel_timer()
            transport.close()
            return
        transport.write_eof()
        self._phase = _LINGER
        self._since = self.loop.time()
        self._arm(self._since + LINGER_SECONDS)


def serves_lifespan(receive: Any) -> bool:
    """Whether the server running this lifespan (its `receive`) speaks `ProxyHttpProtocol`.

    Told by uvicorn's `LifespanOn`, whose bound `receive` carries the server's loaded `Config`;
    any other server, or uvicorn with another protocol, does not serve it.
    """
    config = getattr(getattr(receive, "__self__", None), "config", None)
    protocol = getattr(config, "http_protocol_class", None)
    return isinstance(protocol, type) and issubclass(protocol, ProxyHttpProtocol)
