"""The HTTP/1.1 server protocol: uvicorn's httptools protocol with the gaps a proxy cannot leave.

Found by the hostile-input tests (tests/e2e/test_hostile_input.py), each a uvicorn behaviour
that is harmless for an application but not for a proxy that forwards what it receives:

* Trailer fields of a chunked body were appended to the request's header list, so they reached
  the forwarder as headers (a proxy key in a trailer authenticated the request). Trailers are
  now dropped.
* A request offering `Connection: Upgrade` for anything but WebSocket lost its body: the parser
  stops at the upgrade and the body was never delivered (Kludex/uvicorn#2722). RFC 9110 §7.8 lets
  a server ignore the offer; the body is now delivered and the connection closed afterwards.
* No limit on the header block: now at most `MAX_HEADERS` fields and `MAX_HEADER_BYTES`, else 431.
* `Transfer-Encoding` codings other than a single final `chunked` are refused (RFC 9112 §6.1):
  uvicorn removed only the chunking and the coded bytes would pass on as plain.
* uvicorn's own refusals were `text/plain`; they are now the OpenAI error shape.

It also tells the application when the client leaves (`DisconnectSignal`), which uvicorn only
reports to a task waiting in `receive()`: keeping such a task per request cost more than any
other single part of the proxy's own work (issue 6).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import httptools
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

MAX_HEADERS = 100
MAX_HEADER_BYTES = 64 * 1024

# ASGI server extension (the spec's `scope["extensions"]`): each request's DisconnectSignal is
# `scope["extensions"][DISCONNECT_EXTENSION]["signal"]`.
DISCONNECT_EXTENSION = "llmproxy.disconnect"


class DisconnectSignal:
    """Set on the connection's loss: `gone` becomes true and `callback`, if set, is called."""

    __slots__ = ("callback", "gone")

    def __init__(self) -> None:
        self.callback: Callable[[], None] | None = None
        self.gone = False

    def fire(self) -> None:
        self.gone = True
        callback, self.callback = self.callback, None
        if callback is not None:
            callback()


class _WritesJoinedPerTurn:
    """A request cycle's transport whose writes within one turn of the event loop go out as one.

    uvicorn writes a response's head as soon as the app sends it, then each body part: for an
    answer whose body is already there that is two system calls and two TCP segments where one
    does. Joined, nothing waits longer than the current turn of the loop.
    """

    __slots__ = ("_loop", "_pending", "_transport")

    def __init__(self, transport: Any, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._pending: bytes | None = None

    def write(self, data: bytes) -> None:
        if self._pending is None:
            if data:
                self._pending = data
                self._loop.call_soon(self._flush)
        else:
            self._pending += data

    def _flush(self) -> None:
        data, self._pending = self._pending, None
        if data and not self._transport.is_closing():
            self._transport.write(data)

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


_REASONS = {400: b"Bad Request", 431: b"Request Header Fields Too Large"}


class ProxyHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, hardened for forwarding (see the module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_count = 0
        self._header_bytes = 0
        self._in_trailers = False
        self._refusal: _RefusedRequestError | None = None
        self._upgrade_body_left: int | None = None  # body bytes still owed after an upgrade offer

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.scope["extensions"] = {DISCONNECT_EXTENSION: {"signal": DisconnectSignal()}}
        self._header_count = 0
        self._header_bytes = 0
        self._in_trailers = False

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._in_trailers:
            return  # trailer fields are not headers; a proxy must not forward them as such
        self._header_count += 1
        self._header_bytes += len(name) + len(value) + 4
        if self._header_count > MAX_HEADERS or self._header_bytes > MAX_HEADER_BYTES:
            raise _RefusedRequestError(
                431,
                f"The request has more than {MAX_HEADERS} header fields or "
                f"{MAX_HEADER_BYTES} bytes of them.",
            )
        if name.lower() == b"transfer-encoding" and value.strip().lower() != b"chunked":
            raise _RefusedRequestError(400, "Only 'Transfer-Encoding: chunked' is accepted.")
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        codings = [v for n, v in self.headers if n == b"transfer-encoding"]
        if len(codings) > 1:
            raise _RefusedRequestError(400, "Only 'Transfer-Encoding: chunked' is accepted.")
        super().on_headers_complete()
        self._in_trailers = True
        cycle = self.cycle
        if cycle is not None and cycle.transport is self.transport:  # a new cycle
            cycle.transport = _WritesJoinedPerTurn(self.transport, self.loop)  # type: ignore[assignment]

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
        super().on_message_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        cycle = self.cycle
        super().connection_lost(exc)
        if cycle is not None and cycle.disconnected:  # lost before the response was complete
            signal = disconnect_signal(cycle.scope)
            if signal is not None:
                signal.fire()

    def data_received(self, data: bytes) -> None:
        if self._upgrade_body_left is not None:
            # After an ignored upgrade offer the parser is stopped: the body is counted here,
            # and anything past it is dropped (the connection closes after the response).
            self._deliver_upgrade_body(data)
            return
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as error:
            refusal = error.__context__
            if isinstance(refusal, _RefusedRequestError):
                self._refuse(refusal.status, str(refusal))
            else:
                self._refuse(400, "Invalid HTTP request received.")
        except httptools.HttpParserError:
            self._refuse(400, "Invalid HTTP request received.")
        except httptools.HttpParserUpgrade as upgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._ignore_upgrade(data[upgrade.args[0] :])

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
        self.logger.warning("Refused request: %s", message)
        body = json.dumps(
            {
                "error": {
                    "message": message,
                    "type": "invalid_request_error",
                    "param": None,
                    "code": "request_header_fields_too_large"
                    if status == 431
                    else "invalid_http_request",
                }
            },
            separators=(",", ":"),
        ).encode()
        head = (
            b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
            b"connection: close\r\n\r\n" % (status, _REASONS[status], len(body))
        )
        self.transport.write(head + body)
        self.transport.close()
