"""`ScriptedResponse`: plays a plan over the connection while watching for the client leaving.

Written as a raw ASGI response rather than sse-starlette's `EventSourceResponse` because a script
must control every response byte: EventSourceResponse adds `Connection` and `X-Accel-Buffering`
headers and takes headers as a mapping (no repeated names), and it consumes `receive()` itself,
while the journal needs the one `receive()` listener to time disconnects from before the headers
to the end of a stall. Event framing still comes from sse-starlette (see `sse.py`).
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Sequence
from typing import Any, Final

import anyio
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from fake_upstream.journal import Journal, JournalEntry
from fake_upstream.plan import Close, Pause, Reset, Stall, Step, Write

TRANSPORT_EXTENSION: Final = "fake_upstream.transport"
"""ASGI scope extension under which `server.TransportExposingProtocol` puts the connection's
asyncio transport: `scope["extensions"][TRANSPORT_EXTENSION]["transport"]`."""

# After aborting the connection ourselves, how long to wait for the server to notice, so the
# app does not return first and make uvicorn log "returned without completing response".
_ABORT_NOTICE_TIMEOUT: Final = 1.0


class ScriptedConnectionEndError(ConnectionError):
    """A scripted `reset` or `close` on a server that does not expose its transport.

    Only `fake_upstream.server` (and the CLI and pytest plugin built on it) can send a real TCP
    reset; elsewhere raising is the closest the app can get: the server aborts the response.
    """


def transport_of(scope: Scope) -> Any:
    extension = scope.get("extensions", {}).get(TRANSPORT_EXTENSION)
    return None if extension is None else extension.get("transport")


def reset_transport(transport: Any) -> None:
    """Drop the connection with a TCP RST: SO_LINGER {on, 0 s} makes close() discard and reset."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


class ScriptedResponse(Response):
    """Wait `delay`, send status and headers, then play `steps`, journaling every write."""

    def __init__(
        self,
        *,
        status: int,
        headers: Sequence[tuple[str, str]],
        steps: Sequence[Step],
        delay: float,
        journal: Journal,
        entry: JournalEntry,
    ) -> None:
        # Response.__init__ would render a body; this response has none of its own.
        self.status_code = status
        self.raw_headers = [(n.lower().encode("latin-1"), v.encode("latin-1")) for n, v in headers]
        self.background = None
        self._steps = steps
        self._delay = delay
        self._journal = journal
        self._entry = entry
        self._ending_on_purpose = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        client_gone = anyio.Event()
        async with anyio.create_task_group() as task_group:

            async def watch_for_disconnect() -> None:
                # The request body has been read by now, so the next message that matters is
                # http.disconnect; uvicorn delivers it as soon as the socket closes.
                while (await receive())["type"] != "http.disconnect":
                    pass
                client_gone.set()
                if not self._ending_on_purpose and not self._entry.completed:
                    self._journal.record_disconnected(self._entry)
                    task_group.cancel_scope.cancel()

            task_group.start_soon(watch_for_disconnect)
            # Assigned before the play, because a client disconnect cancels it mid-way.
            unplayable = None
            unplayable = await self._play(scope, send, client_gone)
            task_group.cancel_scope.cancel()
        if unplayable is not None:
            # Raised outside the task group so callers see this error, not an ExceptionGroup.
            raise ScriptedConnectionEndError(
                f"scripted {type(unplayable).__name__.lower()}: this server does not expose its "
                "transport; serve the app with fake_upstream.server for a real TCP reset"
            )

    async def _play(
        self, scope: Scope, send: Send, client_gone: anyio.Event
    ) -> Reset | Close | None:
        """Play the plan; return the Reset/Close step it could not perform, if any."""
        if self._delay > 0:
            await anyio.sleep(self._delay)
        await send(
            {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
        )
        self._journal.record_headers_sent(self._entry, self.status_code)
        for step in self._steps:
            if isinstance(step, Write):
                await send({"type": "http.response.body", "body": step.data, "more_body": True})
                self._journal.record_chunk(self._entry, len(step.data))
            elif isinstance(step, Pause):
                await anyio.sleep(step.seconds)
            elif isinstance(step, Stall):
                await anyio.sleep_forever()
            elif isinstance(step, Reset | Close):
                transport = transport_of(scope)
                if transport is None:
                    return step
                await self._end_connection(transport, step, client_gone)
                return None
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        self._journal.record_completed(self._entry)
        return None

    async def _end_connection(
        self, transport: Any, step: Reset | Close, client_gone: anyio.Event
    ) -> None:
        self._ending_on_purpose = True
        self._journal.record_completed(self._entry)
        if isinstance(step, Reset):
            reset_transport(transport)
        else:
            transport.close()
        with anyio.move_on_after(_ABORT_NOTICE_TIMEOUT):
            await client_gone.wait()
