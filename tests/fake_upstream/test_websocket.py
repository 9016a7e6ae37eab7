"""The fake's WebSocket endpoints (`/v1/realtime`, `/v1/responses`) driven by a real WebSocket
client against the fake as a real server. No sleeps: waits are on messages or on the journal,
with deadlines."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import openai
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosedError, ConnectionClosedOK, InvalidStatus
from websockets.protocol import State

from fake_upstream import FakeUpstreamServer
from fake_upstream.journal import JournalSnapshot
from fake_upstream.scripts import ScriptError, parse_script

DEADLINE = 5.0


def ws_url(fake: FakeUpstreamServer, path: str = "/v1/realtime", query: str = "") -> str:
    return fake.url.replace("http://", "ws://", 1) + path + (f"?{query}" if query else "")


def script(**fields: Any) -> dict[str, str]:
    return {"x-fake-script": json.dumps(fields)}


async def recv_event(ws: ClientConnection) -> dict[str, Any]:
    async with asyncio.timeout(DEADLINE):
        event: dict[str, Any] = json.loads(await ws.recv())
    return event


async def wait_journal(fake: FakeUpstreamServer, predicate: Any) -> JournalSnapshot:
    return await asyncio.to_thread(fake.wait_for_journal, predicate, DEADLINE)


async def round_trip(ws: ClientConnection) -> list[dict[str, Any]]:
    """Send `response.create`; return the events up to and including `response.done`."""
    await ws.send(json.dumps({"type": "response.create"}))
    events = [await recv_event(ws)]
    while events[-1]["type"] != "response.done":
        events.append(await recv_event(ws))
    return events


@pytest.mark.parametrize("path", ["/v1/realtime", "/v1/responses"])
async def test_session_created_then_a_scripted_response(
    fake_upstream: FakeUpstreamServer, path: str
) -> None:
    headers = script(chunks=["Hel", "lo", "!"])
    async with connect(
        ws_url(fake_upstream, path, "model=gpt-realtime"), additional_headers=headers
    ) as ws:
        created = await recv_event(ws)
        assert created["type"] == "session.created"
        assert created["session"]["model"] == "gpt-realtime"
        await ws.send(
            json.dumps(
                {
                    "type": "conversation.item.create",
                    "item": {
                        "type": "message",
                        "role": "user",
                        "content": [{"type": "input_text", "text": "Say hello to me, please"}],
                    },
                }
            )
        )
        events = await round_trip(ws)
    assert [e["type"] for e in events] == [
        "response.created",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.done",
    ]
    assert [e["delta"] for e in events[1:-1]] == ["Hel", "lo", "!"]
    response_id = events[0]["response"]["id"]
    assert {e["response_id"] for e in events[1:-1]} == {response_id}
    done = events[-1]["response"]
    assert done["id"] == response_id
    assert done["status"] == "completed"
    assert done["output"][0]["content"] == [{"type": "output_text", "text": "Hello!"}]
    usage = done["usage"]
    # ~4 characters per token: the user's 23 characters, the answer's 6.
    assert (usage["input_tokens"], usage["output_tokens"]) == (5, 1)
    assert usage["total_tokens"] == 6


async def test_each_response_create_gets_its_own_response(
    fake_upstream: FakeUpstreamServer,
) -> None:
    async with connect(ws_url(fake_upstream)) as ws:
        await recv_event(ws)
        first, second = await round_trip(ws), await round_trip(ws)
    assert "".join(e["delta"] for e in first[1:-1]) == "Hello from fake upstream!"
    assert first[0]["response"]["id"] != second[0]["response"]["id"]


async def test_delay_per_chunk_spaces_the_deltas(fake_upstream: FakeUpstreamServer) -> None:
    async with connect(
        ws_url(fake_upstream), additional_headers=script(chunks=["a", "b"], delay_per_chunk=0.2)
    ) as ws:
        await recv_event(ws)
        await round_trip(ws)
    [entry] = fake_upstream.journal()
    sent = [m for m in entry["websocket"]["messages"] if m["direction"] == "server_to_client"]
    deltas = [m["at"] for m in sent if '"response.output_text.delta"' in m["text"]]
    assert deltas[1] - deltas[0] >= 0.19


async def test_close_with_code_and_reason_after_n_events(fake_upstream: FakeUpstreamServer) -> None:
    headers = script(ending="close", after_chunks=3, close_code=4001, close_reason="scripted")
    async with connect(ws_url(fake_upstream), additional_headers=headers) as ws:
        await ws.send(json.dumps({"type": "response.create"}))
        received = [(await recv_event(ws))["type"] for _ in range(3)]
        with pytest.raises(ConnectionClosedError) as closed:
            await recv_event(ws)
    assert received == ["session.created", "response.created", "response.output_text.delta"]
    assert closed.value.rcvd is not None
    assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (4001, "scripted")
    [entry] = await wait_journal(fake_upstream, lambda j: j[0]["websocket"]["server_close"])
    assert entry["websocket"]["server_close"]["code"] == 4001
    assert entry["websocket"]["server_close"]["reason"] == "scripted"
    assert entry["websocket"]["ending"] == "close"
    assert entry["websocket"]["client_close"] is None  # the client's frame only answered ours


async def test_close_without_a_count_comes_after_the_first_response(
    fake_upstream: FakeUpstreamServer,
) -> None:
    async with connect(ws_url(fake_upstream), additional_headers=script(ending="close")) as ws:
        await recv_event(ws)
        events = await round_trip(ws)
        with pytest.raises(ConnectionClosedOK) as closed:
            await recv_event(ws)
    assert events[-1]["type"] == "response.done"
    assert closed.value.rcvd is not None
    assert closed.value.rcvd.code == 1000


async def test_reset_after_n_events(fake_upstream: FakeUpstreamServer) -> None:
    headers = script(ending="reset", after_chunks=1)
    async with connect(ws_url(fake_upstream), additional_headers=headers) as ws:
        assert (await recv_event(ws))["type"] == "session.created"
        with pytest.raises(ConnectionClosedError) as closed:
            await recv_event(ws)
    assert closed.value.rcvd is None  # no close frame: the connection was reset
    [entry] = fake_upstream.journal()
    assert entry["websocket"]["ending"] == "reset"
    assert entry["websocket"]["server_close"] is None


async def test_stall_keeps_the_session_open_and_silent(fake_upstream: FakeUpstreamServer) -> None:
    async with connect(
        ws_url(fake_upstream), additional_headers=script(ending="stall", after_chunks=1)
    ) as ws:
        await recv_event(ws)
        await ws.send(json.dumps({"type": "response.create"}))
        # The stall is journaled, and the request it left unanswered too.
        await wait_journal(
            fake_upstream,
            lambda j: (
                j[0]["websocket"]["ending"] == "stall"
                and any(m["direction"] == "client_to_server" for m in j[0]["websocket"]["messages"])
            ),
        )
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.5):
                await ws.recv()
        assert ws.state is State.OPEN
        await ws.close(1000, "bored")
    [entry] = await wait_journal(fake_upstream, lambda j: j[0]["disconnected"])
    assert entry["websocket"]["client_close"]["code"] == 1000
    assert entry["websocket"]["client_close"]["reason"] == "bored"


@pytest.mark.parametrize(
    ("headers", "status", "expected_body"),
    [
        ({"x-fake-scenario": "rate_limited"}, 429, "rate_limit_exceeded"),
        (script(status=503, body="upstream busy"), 503, "upstream busy"),
        (script(body={"refused": True}), 200, '"refused": true'),
        (script(ending="split_event"), 400, "does not apply to a WebSocket"),
        ({"x-fake-script": "{not json"}, 400, "invalid_fake_script"),
    ],
)
async def test_a_refusal_is_the_handshakes_http_response(
    fake_upstream: FakeUpstreamServer, headers: dict[str, str], status: int, expected_body: str
) -> None:
    with pytest.raises(InvalidStatus) as refused:
        async with connect(ws_url(fake_upstream), additional_headers=headers):
            pass
    response = refused.value.response
    assert response.status_code == status
    assert expected_body in response.body.decode()
    assert response.headers["x-request-id"].startswith("req_")
    if status == 429:
        assert response.headers["retry-after"] == "1"
    [entry] = fake_upstream.journal()
    assert entry["kind"] == "websocket"
    assert entry["status"] == status
    assert entry["websocket"]["accepted_at"] is None


async def test_echo_sends_the_handshake_first(fake_upstream: FakeUpstreamServer) -> None:
    headers = [("OpenAI-Beta", "realtime=v1"), ("x-custom", "one"), ("x-custom", "two")]
    headers += list(script(echo=True).items())
    url = ws_url(fake_upstream, query="model=gpt-realtime&x=%2F1")
    async with connect(url, additional_headers=headers, subprotocols=["realtime"]) as ws:
        echo = await recv_event(ws)
        assert (await recv_event(ws))["type"] == "session.created"
    assert echo["type"] == "fake.echo"
    assert echo["path"] == "/v1/realtime"
    assert echo["query"] == "model=gpt-realtime&x=%2F1"
    assert echo["subprotocols"] == ["realtime"]
    names = [name for name, _ in echo["headers"]]
    assert ["openai-beta", "realtime=v1"] in echo["headers"]
    custom = [value for name, value in echo["headers"] if name == "x-custom"]
    assert custom == ["one", "two"]
    assert names.index("openai-beta") < names.index("x-custom")


@pytest.mark.parametrize(
    ("offered", "chosen"),
    [
        (["realtime"], "realtime"),
        (["openai-insecure-api-key.sk-x", "realtime"], "realtime"),
        (None, None),
    ],
)
async def test_the_realtime_subprotocol_is_echoed_when_offered(
    fake_upstream: FakeUpstreamServer, offered: list[str] | None, chosen: str | None
) -> None:
    async with connect(ws_url(fake_upstream), subprotocols=offered) as ws:  # type: ignore[arg-type]
        assert ws.subprotocol == chosen
        assert ws.response is not None
        assert ws.response.headers.get("sec-websocket-protocol") == chosen
        assert ws.response.headers["x-request-id"].startswith("req_")
    [entry] = fake_upstream.journal()
    assert entry["websocket"]["subprotocols"] == (offered or [])
    assert entry["websocket"]["subprotocol"] == chosen


async def test_the_queue_scripts_a_session(fake_upstream: FakeUpstreamServer) -> None:
    fake_upstream.queue({"chunks": ["queued"]})
    async with connect(ws_url(fake_upstream)) as ws:
        await recv_event(ws)
        events = await round_trip(ws)
    assert [e["delta"] for e in events[1:-1]] == ["queued"]
    assert fake_upstream.journal()[0]["script"] == {"chunks": ["queued"]}


async def test_the_journal_records_the_session(fake_upstream: FakeUpstreamServer) -> None:
    url = ws_url(fake_upstream, query="model=m")
    headers = {"OpenAI-Beta": "realtime=v1", **script(chunks=["x"])}
    async with connect(url, additional_headers=headers) as ws:
        await recv_event(ws)
        await round_trip(ws)
        await ws.send(b"\x00\x01")
        async with asyncio.timeout(DEADLINE):
            assert await ws.recv() == b"\x00\x01"  # binary messages come back unchanged
        await ws.close(4000, "done here")
    [entry] = await wait_journal(fake_upstream, lambda j: j[0]["disconnected"])
    assert entry["kind"] == "websocket"
    assert (entry["method"], entry["path"], entry["query"]) == ("GET", "/v1/realtime", "model=m")
    assert ["openai-beta", "realtime=v1"] in entry["headers"]
    assert entry["status"] == 101
    session = entry["websocket"]
    messages = session["messages"]
    directions = [m["direction"] for m in messages]
    assert directions == ["server_to_client", "client_to_server"] + ["server_to_client"] * 3 + [
        "client_to_server",
        "server_to_client",
    ]
    assert json.loads(messages[1]["text"]) == {"type": "response.create"}
    assert messages[-2] == {**messages[-2], "kind": "bytes", "size": 2, "text": None}
    assert messages[-1] == {**messages[-1], "kind": "bytes", "size": 2, "text": None}
    times = [m["at"] for m in messages]
    assert times == sorted(times)
    assert session["accepted_at"] <= times[0] <= entry["disconnected_at"]
    assert session["client_close"]["code"] == 4000
    assert session["client_close"]["reason"] == "done here"
    assert session["server_close"] is None
    assert entry["script"] == {"chunks": ["x"]}


async def test_a_client_that_vanishes_is_journaled(fake_upstream: FakeUpstreamServer) -> None:
    async with connect(ws_url(fake_upstream)) as ws:
        await recv_event(ws)
        ws.transport.abort()  # no close frame
    [entry] = await wait_journal(fake_upstream, lambda j: j[0]["disconnected"])
    assert entry["websocket"]["client_close"]["code"] in (1005, 1006)


def test_close_fields_are_validated() -> None:
    assert parse_script({"close_code": 4001, "close_reason": "ok"}).close_code == 4001
    for bad in ({"close_code": 1006}, {"close_code": 999}, {"close_reason": "x" * 124}):
        with pytest.raises(ScriptError, match="close_"):
            parse_script(bad)


async def test_the_sdks_realtime_client_drives_the_fake(fake_upstream: FakeUpstreamServer) -> None:
    fake_upstream.queue({"chunks": ["Hi", " there"]})
    client = openai.AsyncOpenAI(base_url=fake_upstream.base_url, api_key="sk-test")
    deltas: list[str] = []
    async with client.realtime.connect(model="gpt-realtime") as connection:
        await connection.response.create()
        async with asyncio.timeout(DEADLINE):
            async for event in connection:
                if event.type == "response.output_text.delta":
                    deltas.append(event.delta)
                elif event.type == "response.done":
                    assert event.response.usage is not None
                    assert event.response.usage.output_tokens == 2
                    break
    await client.close()
    assert deltas == ["Hi", " there"]
    [entry] = fake_upstream.journal()
    assert entry["query"] == "model=gpt-realtime"
    assert ["authorization", "Bearer sk-test"] in entry["headers"]


async def test_a_client_gone_as_an_event_goes_out_ends_the_session_quietly() -> None:
    # The race a real server makes rare: the connection is lost between the 101 and the first
    # event, so uvicorn's `send` raises ClientDisconnected (an OSError) before `receive` has
    # reported the disconnect. Driven over ASGI directly to make it happen every time.
    from fake_upstream.app import create_app, journal_of

    app = create_app()
    gone = asyncio.Event()
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        if not sent:
            return {"type": "websocket.connect"}
        await gone.wait()
        return {"type": "websocket.disconnect", "code": 1006}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)
        if message["type"] == "websocket.send":
            gone.set()
            raise OSError("the client is gone")  # what uvicorn's ClientDisconnected is

    scope = {
        "type": "websocket",
        "path": "/v1/realtime",
        "raw_path": b"/v1/realtime",
        "query_string": b"",
        "headers": [],
        "subprotocols": [],
        "app": app,
    }
    async with asyncio.timeout(DEADLINE):
        await app(scope, receive, send)  # returns: no exception escapes the session
    [entry] = journal_of(app).entries()
    assert entry["disconnected"]
    assert entry["websocket"]["client_close"]["code"] == 1006
