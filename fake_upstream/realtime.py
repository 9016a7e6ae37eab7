"""WebSocket endpoints (`/v1/realtime`, and `/v1/responses` in WebSocket mode): a scripted
Realtime session.

On connect the server sends `session.created`; for each client `response.create` it sends
`response.created`, one `response.output_text.delta` per script chunk (each after
`delay_per_chunk`) and `response.done` whose `response.usage` holds the tokens. `session.update`
is answered with `session.updated`; a `fake.echo` event and every binary message are sent back
unchanged (to test a relay byte for byte); other client events are journaled and left
unanswered.

The script comes from the handshake's `x-fake-script` / `x-fake-scenario` headers, else the
queue, else the fixture rules, as for HTTP. What applies to a WebSocket:

- `status` and/or `body` refuse the upgrade: the handshake gets that HTTP response (`headers`
  added, `echo` as its body), after `delay_before_headers`.
- `echo`: the first event is `{"type": "fake.echo", ...}` with the handshake's path, query,
  headers (in arrival order) and offered subprotocols.
- `ending`: `done` (the default: answer until the client leaves), `close` (a close frame with
  `close_code`, default 1000, and `close_reason`), `reset` (a TCP RST) or `stall` (send nothing
  more, keep reading), after `after_chunks` server events (every message the server sent counts,
  `session.created` included; default: after the first `response.done`).
- `chunks`, `model`, `id` (the first response's id), `reasoning_tokens` shape the answers.

The subprotocol `realtime` is accepted when offered; nothing else is.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Iterator
from typing import Any, Final

import anyio
from starlette.requests import HTTPConnection
from starlette.types import Receive, Scope, Send

from fake_upstream import wire
from fake_upstream.fixtures import NoFixtureMatchedError
from fake_upstream.journal import Journal, JournalEntry
from fake_upstream.responses import ScriptedConnectionEndError, reset_transport, transport_of
from fake_upstream.scripts import Script, ScriptError

WEBSOCKET_PATHS: Final = ("/v1/realtime", "/v1/responses")
WEBSOCKET_ENDINGS: Final = ("done", "close", "reset", "stall")
SUBPROTOCOL: Final = "realtime"
DEFAULT_REALTIME_MODEL: Final = "gpt-realtime"
_CLIENT: Final = "client_to_server"
_SERVER: Final = "server_to_client"
# After a scripted reset, how long to wait for the server to notice the connection is gone.
_ABORT_NOTICE_TIMEOUT: Final = 1.0


class _SessionEndedError(Exception):
    """The script's ending was played; stop sending."""


def _event_id() -> str:
    return f"event_{uuid.uuid4().hex[:20]}"


def _texts(value: object) -> Iterator[str]:
    """Every string under a `text`, `instructions` or `input` key of a client event."""
    if isinstance(value, dict):
        for key, item in value.items():
            if key in ("text", "instructions", "input") and isinstance(item, str):
                yield item
            else:
                yield from _texts(item)
    elif isinstance(value, list):
        for item in value:
            yield from _texts(item)


def realtime_usage(input_tokens: int, output_tokens: int) -> dict[str, Any]:
    """`response.usage` as the Realtime API reports it (text only: no audio tokens)."""
    return {
        "total_tokens": input_tokens + output_tokens,
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "input_token_details": {"text_tokens": input_tokens, "audio_tokens": 0, "cached_tokens": 0},
        "output_token_details": {"text_tokens": output_tokens, "audio_tokens": 0},
    }


class _Session:
    def __init__(
        self,
        script: Script,
        send: Send,
        scope: Scope,
        journal: Journal,
        entry: JournalEntry,
        model: str,
    ) -> None:
        self.script = script
        self._send = send
        self._scope = scope
        self._journal = journal
        self._entry = entry
        self._model = model
        self.sent = 0
        self._responses = 0
        self._prompt: list[str] = []
        self._session_id = f"sess_{uuid.uuid4().hex[:20]}"
        ending = script.ending
        self._limit = None if ending == "done" else script.after_chunks

    async def end_if_due(self, *, response_done: bool = False) -> None:
        """Play the ending when the count of sent events reaches `after_chunks` (or, without
        one, after the first `response.done`)."""
        if self.script.ending == "done":
            return
        due = self.sent >= self._limit if self._limit is not None else response_done
        if due:
            await self._end()

    async def emit(self, event: dict[str, Any]) -> None:
        text = wire.compact_json(event)
        await self._send({"type": "websocket.send", "text": text})
        self._journal.record_message(self._entry, _SERVER, text)
        self.sent += 1
        await self.end_if_due()

    async def _end(self) -> None:
        ending = self.script.ending
        self._journal.record_ending(self._entry, ending)
        if ending == "close":
            code = self.script.close_code or 1000
            reason = self.script.close_reason
            await self._send({"type": "websocket.close", "code": code, "reason": reason})
            self._journal.record_close(self._entry, "server", code, reason)
            self._journal.record_completed(self._entry)
        elif ending == "reset":
            transport = transport_of(self._scope)
            if transport is None:
                raise ScriptedConnectionEndError(
                    "scripted reset: this server does not expose its transport; serve the app "
                    "with fake_upstream.server for a real TCP reset"
                )
            self._journal.record_completed(self._entry)
            reset_transport(transport)
        raise _SessionEndedError  # `stall`: the reader keeps journaling until the client leaves

    async def start(self, arrival_echo: dict[str, Any] | None) -> None:
        await self.end_if_due()  # after_chunks 0: before anything is sent
        if arrival_echo is not None:
            await self.emit({"type": "fake.echo", "event_id": _event_id(), **arrival_echo})
        await self.emit(
            {
                "type": "session.created",
                "event_id": _event_id(),
                "session": self._session_object(),
            }
        )

    def _session_object(self) -> dict[str, Any]:
        return {
            "type": "realtime",
            "object": "realtime.session",
            "id": self._session_id,
            "model": self._model,
            "output_modalities": ["text"],
            "instructions": "",
            "tools": [],
            "tool_choice": "auto",
            "max_output_tokens": "inf",
        }

    async def echo(self, data: str | bytes) -> None:
        """Send a client's message back unchanged: a relay's byte-exactness test."""
        if isinstance(data, bytes):
            await self._send({"type": "websocket.send", "bytes": data})
        else:
            await self._send({"type": "websocket.send", "text": data})
        self._journal.record_message(self._entry, _SERVER, data)
        self.sent += 1
        await self.end_if_due()

    async def handle(self, data: str | bytes) -> None:
        """Answer one client message."""
        if isinstance(data, bytes):
            await self.echo(data)  # the Realtime API has no binary events: echoed as they came
            return
        try:
            event = json.loads(data)
        except json.JSONDecodeError as exc:
            await self.emit(_error_event(f"Invalid JSON: {exc}", "invalid_json", None))
            return
        if not isinstance(event, dict):
            await self.emit(_error_event("An event must be a JSON object.", "invalid_event", None))
            return
        self._prompt.extend(_texts(event))
        kind = event.get("type")
        if kind == "session.update":
            session = self._session_object()
            update = event.get("session")
            if isinstance(update, dict):
                session.update(update)
            updated = {"type": "session.updated", "event_id": _event_id(), "session": session}
            await self.emit(updated)
        elif kind == "response.create":
            await self._respond()
        elif kind == "fake.echo":
            await self.echo(data)  # the very text that came, not a re-encoding of it

    async def _respond(self) -> None:
        script = self.script
        first = self._responses == 0
        self._responses += 1
        response_id = script.id if first and script.id else f"resp_{uuid.uuid4().hex[:20]}"
        item_id = f"item_{uuid.uuid4().hex[:20]}"
        chunks = script.chunks if script.chunks is not None else wire.DEFAULT_CHUNKS
        response: dict[str, Any] = {
            "object": "realtime.response",
            "id": response_id,
            "status": "in_progress",
            "status_details": None,
            "output": [],
            "conversation_id": "conv_" + hashlib.sha256(self._session_id.encode()).hexdigest()[:20],
            "output_modalities": ["text"],
            "usage": None,
        }
        await self.emit({"type": "response.created", "event_id": _event_id(), "response": response})
        for chunk in chunks:
            if script.delay_per_chunk:
                await anyio.sleep(script.delay_per_chunk)
            await self.emit(
                {
                    "type": "response.output_text.delta",
                    "event_id": _event_id(),
                    "response_id": response_id,
                    "item_id": item_id,
                    "output_index": 0,
                    "content_index": 0,
                    "delta": chunk,
                }
            )
        text = "".join(chunks)
        input_tokens = wire.estimate_tokens(" ".join(self._prompt))
        output_tokens = wire.estimate_tokens(text) + script.reasoning_tokens if chunks else 0
        done = {
            **response,
            "status": "completed",
            "output": [
                {
                    "id": item_id,
                    "type": "message",
                    "object": "realtime.item",
                    "status": "completed",
                    "role": "assistant",
                    "content": [{"type": "output_text", "text": text}],
                }
            ],
            "usage": realtime_usage(input_tokens, output_tokens),
        }
        await self.emit({"type": "response.done", "event_id": _event_id(), "response": done})
        await self.end_if_due(response_done=True)


def _error_event(message: str, code: str, event_id: str | None) -> dict[str, Any]:
    return {
        "type": "error",
        "event_id": _event_id(),
        "error": {
            "type": "invalid_request_error",
            "code": code,
            "message": message,
            "param": None,
            "event_id": event_id,
        },
    }


class RealtimeEndpoint:
    """The raw ASGI WebSocket endpoint (a class, so starlette's router passes it the raw
    `receive`/`send` instead of wrapping it in its `WebSocket` state machine)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # Imported here: app.py imports this module to route to it.
        from fake_upstream.app import Arrival, journal_of, script_for

        connection = HTTPConnection(scope)
        app = scope["app"]
        journal = journal_of(app)
        message = await receive()
        if message["type"] != "websocket.connect":
            return
        arrival = Arrival(
            method="GET",
            path=scope["path"],
            raw_path=(scope.get("raw_path") or scope["path"].encode()).decode("latin-1"),
            query=scope["query_string"].decode("latin-1"),
            headers=[(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]],
            body=b"",
            body_sha256=hashlib.sha256(b"").hexdigest(),
        )
        request_id = wire.new_request_id()
        entry = journal.open(
            id=request_id,
            method="GET",
            path=arrival.path,
            query=arrival.query,
            headers=arrival.headers,
            body_sha256=arrival.body_sha256,
        )
        offered = list(scope.get("subprotocols", []))
        journal.start_websocket(entry, offered)
        try:
            script, fixture = script_for(connection, arrival)
            if script.ending not in WEBSOCKET_ENDINGS:
                raise ScriptError(
                    f"field 'ending': {script.ending!r} does not apply to a WebSocket; "
                    f"use one of {', '.join(WEBSOCKET_ENDINGS)}"
                )
        except (ScriptError, NoFixtureMatchedError) as exc:
            code = "no_fixture_matched" if isinstance(exc, NoFixtureMatchedError) else None
            error = wire.request_error(str(exc), code=code or "invalid_fake_script")
            await _refuse(send, journal, entry, 400, wire.pretty_json(error), [], request_id)
            return
        journal.record_script(entry, script.as_json(), fixture)
        delay = app.state.latency + script.delay_before_headers
        if delay > 0:
            await anyio.sleep(delay)
        echo = {**arrival.echo(), "subprotocols": offered}
        if script.status is not None or script.body is not None:
            status = script.status or 200
            if script.echo:
                body = wire.pretty_json(echo)
            elif isinstance(script.body, str):
                body = script.body.encode()
            elif script.body is not None:
                body = wire.pretty_json(script.body)
            elif status >= 400:
                body = wire.pretty_json(wire.error_object(status, script.error))
            else:
                body = b""
            content_type = (
                "text/plain; charset=utf-8" if isinstance(script.body, str) else "application/json"
            )
            headers = wire.merge_headers([("content-type", content_type)], script.headers)
            await _refuse(send, journal, entry, status, body, headers, request_id)
            return
        subprotocol = SUBPROTOCOL if SUBPROTOCOL in offered else None
        accept_headers = wire.merge_headers(
            wire.default_response_headers(request_id, round(delay * 1000)), script.headers
        )
        accept: dict[str, Any] = {
            "type": "websocket.accept",
            "headers": [(n.encode("latin-1"), v.encode("latin-1")) for n, v in accept_headers],
        }
        if subprotocol is not None:
            accept["subprotocol"] = subprotocol
        await send(accept)
        journal.record_accepted(entry, subprotocol)
        model = connection.query_params.get("model") or script.model or DEFAULT_REALTIME_MODEL
        session = _Session(script, send, scope, journal, entry, model)
        await _run(session, receive, journal, entry, echo if script.echo else None)


async def _run(
    session: _Session,
    receive: Receive,
    journal: Journal,
    entry: JournalEntry,
    echo: dict[str, Any] | None,
) -> None:
    """Read the client (journaling every message) while the session answers, until the client
    leaves or the script ends the session."""
    inbox_send, inbox = anyio.create_memory_object_stream[str | bytes](max_buffer_size=1000)
    ended = anyio.Event()  # the server played its ending: the client's close is its reply

    async def read() -> None:
        while True:
            message = await receive()
            if message["type"] == "websocket.disconnect":
                if not ended.is_set() or session.script.ending == "stall":
                    code = message.get("code", 1005)
                    journal.record_close(entry, "client", code, message.get("reason") or "")
                    journal.record_disconnected(entry)
                return
            data = message.get("text")
            if data is None:
                data = message.get("bytes") or b""
            journal.record_message(entry, _CLIENT, data)
            if not ended.is_set():
                inbox_send.send_nowait(data)

    async def answer() -> None:
        try:
            await session.start(echo)
            async for data in inbox:
                await session.handle(data)
        except OSError:
            # The client left while an event was going out (uvicorn's ClientDisconnected):
            # nobody to answer; the reader journals the leaving and ends the session.
            with anyio.move_on_after(_ABORT_NOTICE_TIMEOUT):
                await anyio.sleep_forever()
        except _SessionEndedError:
            ended.set()
            if session.script.ending == "stall":
                await anyio.sleep_forever()  # the reader ends the session when the client goes
            with anyio.move_on_after(_ABORT_NOTICE_TIMEOUT):
                await anyio.sleep_forever()  # give the reader the connection's end

    async with inbox_send, inbox, anyio.create_task_group() as tasks:

        async def read_then_stop() -> None:
            await read()
            tasks.cancel_scope.cancel()

        async def answer_then_stop() -> None:
            await answer()
            tasks.cancel_scope.cancel()

        tasks.start_soon(read_then_stop)
        tasks.start_soon(answer_then_stop)


async def _refuse(
    send: Send,
    journal: Journal,
    entry: JournalEntry,
    status: int,
    body: bytes,
    headers: list[tuple[str, str]],
    request_id: str,
) -> None:
    """Answer the handshake with a plain HTTP response instead of the `101`."""
    if not any(name.lower() == "content-type" for name, _ in headers):
        headers = [("content-type", "application/json"), *headers]
    merged = wire.merge_headers(wire.default_response_headers(request_id, 0), headers)
    merged.append(("content-length", str(len(body))))
    raw = [(n.lower().encode("latin-1"), v.encode("latin-1")) for n, v in merged]
    await send({"type": "websocket.http.response.start", "status": status, "headers": raw})
    journal.record_headers_sent(entry, status)
    await send({"type": "websocket.http.response.body", "body": body, "more_body": False})
    journal.record_completed(entry)
