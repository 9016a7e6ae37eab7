"""The official `openai` SDK's Realtime client through the proxy to the fake upstream (issue 12).

`client.realtime.connect(model=...)` opens `ws://<proxy>/v1/realtime?model=...` with the SDK's
own `Authorization`; the proxy relays the session to the fake with its default headers instead.
What the SDK sees is the fake's scripted session: `session.created`, then for `response.create`
the deltas of the script's chunks up to `response.done` with usage.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import openai
import pytest
from openai.resources.realtime.realtime import AsyncRealtimeConnection

from tests.e2e.conftest import CLIENT_KEY, Target
from tests.e2e.fake_client import FakeUpstreamClient

pytestmark = pytest.mark.e2e

DEADLINE = 10.0
MODEL = "gpt-realtime"
CHUNKS = ["Hel", "lo ", "through ", "the ", "proxy", "!"]


async def next_event(connection: AsyncRealtimeConnection) -> Any:
    async with asyncio.timeout(DEADLINE):
        return await connection.recv()


async def until_done(connection: AsyncRealtimeConnection) -> list[Any]:
    """The server events after a `response.create`, up to and including `response.done`."""
    events = [await next_event(connection)]
    while events[-1].type != "response.done":
        events.append(await next_event(connection))
    return events


def session_of(fake: FakeUpstreamClient) -> dict[str, Any]:
    """The one WebSocket session the fake saw, once the proxy closed it."""
    journal = fake.wait_for_journal(
        lambda entries: [e["kind"] for e in entries] == ["websocket"] and entries[0]["disconnected"]
    )
    entry: dict[str, Any] = journal[0]
    return entry


def values_of(entry: dict[str, Any], name: str) -> list[str]:
    return [value for header, value in entry["headers"] if header == name.lower()]


def client_events(entry: dict[str, Any]) -> list[str]:
    """The types of the events the fake received, in order."""
    messages = entry["websocket"]["messages"]
    return [json.loads(m["text"])["type"] for m in messages if m["direction"] == "client_to_server"]


async def test_a_response_streams_its_deltas_up_to_done_with_usage(
    target: Target, fake: FakeUpstreamClient, async_sdk: openai.AsyncOpenAI
) -> None:
    fake.queue({"chunks": CHUNKS})
    async with async_sdk.realtime.connect(model=MODEL) as connection:
        created = await next_event(connection)
        assert created.type == "session.created"
        assert created.session.model == MODEL  # the fake's model comes from the query
        await connection.response.create()
        events = await until_done(connection)
    kinds = [event.type for event in events]
    assert kinds == [
        "response.created",
        *["response.output_text.delta"] * len(CHUNKS),
        "response.done",
    ]
    assert [event.delta for event in events[1:-1]] == CHUNKS
    done = events[-1].response
    assert done.status == "completed"
    assert done.id == events[0].response.id
    assert done.usage is not None
    assert done.usage.output_tokens is not None
    assert done.usage.output_tokens > 0
    assert done.usage.total_tokens == done.usage.input_tokens + done.usage.output_tokens

    entry = session_of(fake)
    assert entry["path"] == "/v1/realtime"
    assert entry["query"] == f"model={MODEL}"
    assert entry["status"] == 101
    assert client_events(entry) == ["response.create"]
    # The proxy's default headers reached the upstream, each once; the SDK's key did not.
    for name, value in target.default_headers.items():
        assert values_of(entry, name) == [value], name
    if "authorization" in {name.lower() for name in target.default_headers}:
        assert CLIENT_KEY not in json.dumps(entry["headers"])
    # The SDK closed normally, and the upstream heard that close, not a lost connection.
    assert entry["websocket"]["client_close"]["code"] == 1000


async def test_a_conversation_reaches_the_upstream_event_by_event(
    target: Target, fake: FakeUpstreamClient, async_sdk: openai.AsyncOpenAI
) -> None:
    fake.queue({"chunks": ["first"]})
    prompt = "Say something about proxies, please, in a few words"
    async with async_sdk.realtime.connect(model=MODEL) as connection:
        assert (await next_event(connection)).type == "session.created"
        await connection.session.update(
            session={"type": "realtime", "instructions": "Be brief.", "output_modalities": ["text"]}
        )
        updated = await next_event(connection)
        assert updated.type == "session.updated"
        assert updated.session.instructions == "Be brief."
        await connection.conversation.item.create(
            item={
                "type": "message",
                "role": "user",
                "content": [{"type": "input_text", "text": prompt}],
            }
        )
        await connection.response.create()
        first = await until_done(connection)
        await connection.response.create()  # a second answer on the same session
        second = await until_done(connection)
    usage = first[-1].response.usage
    assert usage is not None
    assert usage.input_tokens is not None
    assert usage.input_tokens > 0  # the prompt arrived: the fake counts its words
    assert [event.delta for event in first[1:-1]] == ["first"]
    assert second[-1].type == "response.done"
    assert second[-1].response.id != first[-1].response.id

    entry = session_of(fake)
    assert client_events(entry) == [
        "session.update",
        "conversation.item.create",
        "response.create",
        "response.create",
    ]
    (item,) = (
        event
        for event in map(json.loads, (m["text"] for m in entry["websocket"]["messages"]))
        if event["type"] == "conversation.item.create"
    )
    assert item["item"]["content"][0]["text"] == prompt
