"""The client side of WebSocket sessions: uvicorn's sans-I/O `websockets` protocol, adjusted.

uvicorn hands a connection here once `ProxyHttpProtocol` has seen a WebSocket upgrade. Three
things about uvicorn's protocol do not fit a relay (DESIGN §10), so they are changed here:

* A connection lost without a close frame was reported to the app as `1005` (no status), the
  code a client's empty close frame also gives; the relay must tell them apart, to close the
  upstream with `1001` only when the client went away. It is reported as `1006` here.
* A message over the size limit (or any protocol error) was reported with the code the server
  sent, indistinguishable from a client closing with that code; such disconnects are marked
  `"llmproxy.server_closed": True` here, so the relay closes the upstream with `1001`.
* On shutdown, open sessions were closed at once with `1012`; here they stay open through the
  drain, like requests in flight, and the relay closes them with `1001` at its deadline.

Handshakes that fail before the app sees them (no `Sec-WebSocket-Key`, a version other than 13)
are answered in the OpenAI error shape rather than websockets' plain text.
"""

from __future__ import annotations

import http
import logging
from typing import Any

from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.datastructures import Headers
from websockets.exceptions import InvalidHeaderValue, SecurityError
from websockets.extensions.permessage_deflate import ServerPerMessageDeflateFactory
from websockets.http11 import Request, Response
from websockets.server import ServerProtocol
from websockets.typing import StatusLike

from llmproxy.errors import openai_error_body

# uvicorn and websockets log each session's opening and refusal at INFO; the relay's access
# line says it all once, so their lines go to a logger that shows only warnings and errors.
PROTOCOL_LOGGER = logging.getLogger("llmproxy.websocket")
PROTOCOL_LOGGER.setLevel(logging.WARNING)

SERVER_CLOSED = "llmproxy.server_closed"  # key of a disconnect message: the server closed it
CONNECTION_LOST = 1006  # RFC 6455 §7.1.5: closed without a close frame (never sent on the wire)


class _JsonRefusingServerProtocol(ServerProtocol):
    """websockets' server handshake, refusing in the OpenAI error shape."""

    def accept(self, request: Request) -> Response:
        versions = request.headers.get_all("Sec-WebSocket-Version")
        if len(versions) == 1 and versions[0].strip() != "13":
            # websockets answers 400; RFC 6455 §4.2.2 asks for an error such as 426 with the
            # versions the server speaks, so that a client can retry with one of them.
            self.handshake_exc = InvalidHeaderValue("Sec-WebSocket-Version", versions[0])
            response = self.reject(
                http.HTTPStatus.UPGRADE_REQUIRED,
                "Unsupported Sec-WebSocket-Version: this server speaks version 13.",
            )
            response.headers["Sec-WebSocket-Version"] = "13"
            return response
        return super().accept(request)

    def reject(self, status: StatusLike, text: str) -> Response:
        response = super().reject(status, text)
        code = "websocket_upgrade_invalid" if response.status_code < 500 else "internal_error"
        kind = "invalid_request_error" if response.status_code < 500 else "proxy_error"
        body = openai_error_body(text.strip() or response.reason_phrase, kind, code)
        headers = Headers(
            (name, value)
            for name, value in response.headers.raw_items()
            if name.lower() not in ("content-length", "content-type")
        )
        headers["Content-Type"] = "application/json"
        headers["Content-Length"] = str(len(body))
        return Response(response.status_code, response.reason_phrase, headers, body)


class ProxyWebSocketProtocol(WebSocketsSansIOProtocol):
    """uvicorn's WebSocket protocol with the relay's close codes and drain (module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.logger = PROTOCOL_LOGGER
        extensions = []
        if self.config.ws_per_message_deflate:
            # The settings uvicorn uses (its own protocol builds the same factory).
            extensions = [
                ServerPerMessageDeflateFactory(
                    server_max_window_bits=12,
                    client_max_window_bits=12,
                    compress_settings={"memLevel": 5},
                )
            ]
        self.conn = _JsonRefusingServerProtocol(
            extensions=extensions, max_size=self.config.ws_max_size, logger=PROTOCOL_LOGGER
        )

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        failure = self.conn.handshake_exc
        if failure is not None and not self.handshake_initiated and not self.close_sent:
            # websockets could not read the request (a line over 8 KiB, a body it refuses...):
            # it only stops reading, and uvicorn, which looks at parse errors of frames alone,
            # would leave the client waiting for ever.
            self._refuse_unreadable_handshake(failure)

    def _refuse_unreadable_handshake(self, failure: Exception) -> None:
        too_large = isinstance(failure.__cause__, SecurityError)
        status = 431 if too_large else 400
        message = (
            "The WebSocket handshake has a header line over 8 KiB or too many header lines."
            if too_large
            else "The WebSocket handshake request cannot be read."
        )
        response = self.conn.reject(status, message)
        self.handshake_initiated = self.handshake_complete = self.close_sent = True
        self.transport.write(response.serialize())
        self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        # Queued before uvicorn's own `1005`: the relay reads up to the first disconnect, and
        # one already queued (a close frame, the server's close) stays first.
        self.queue.put_nowait({"type": "websocket.disconnect", "code": CONNECTION_LOST})
        super().connection_lost(exc)
        # Nothing is decoded any more; the zlib streams of permessage-deflate are most of a
        # session's memory, and the protocol object may wait for a full collection (cycles).
        self.conn.extensions = []

    def handle_parser_exception(self) -> None:
        close = self.conn.close_sent
        assert close is not None
        message: Any = {
            "type": "websocket.disconnect",
            "code": close.code,
            "reason": close.reason,
            SERVER_CLOSED: True,
        }
        self.queue.put_nowait(message)
        self.transport.write(b"".join(self.conn.data_to_send()))
        self.close_sent = True
        self.transport.close()

    async def send(self, message: Any) -> None:
        await super().send(message)
        if message["type"] == "websocket.http.response.body" and not message.get("more_body"):
            # uvicorn leaves this unset after a refusal, then logs an error as the app returns.
            self.handshake_complete = True

    def shutdown(self) -> None:
        if self.handshake_complete and not self.close_sent and not self.disconnected:
            # An open session drains like a request in flight: the relay closes it with 1001
            # when the drain deadline cancels it.
            self.stop_keepalive()
            return
        super().shutdown()


def frame_size_limit(max_message_bytes: int) -> int:
    """The size websockets is told to refuse above, for a message limit of `max_message_bytes`.

    websockets compares a compressed frame's length with its limit before inflating it, and
    deflate makes incompressible data slightly larger (stored blocks: 5 bytes per 64 KiB, and
    the frame's own header); with the limit as such, a message of exactly the limit would be
    refused. It gets this headroom instead, and the relay checks each message's real size.
    """
    return max_message_bytes + max_message_bytes // 256 + 1024


def websocket_server_options(max_message_bytes: int) -> dict[str, Any]:
    """uvicorn's WebSocket options for serving the proxy (`llmproxy serve`, `ProxyServer`)."""
    return {
        "ws": ProxyWebSocketProtocol,
        # A client message over the limit: 1009, by websockets or by the relay (DESIGN §10).
        "ws_max_size": frame_size_limit(max_message_bytes),
        "ws_per_message_deflate": True,  # negotiated with the client; the upstream hop apart
    }
