"""Who spent what on a Realtime session (DESIGN §11, issue 13 item 2): through the real proxy,
every `response.done` of a WebSocket session is read as it passes, and the session's one access
line and `/metrics` carry the tokens of all of them, summed, under the key's name and the model
that `session.created` / `session.updated` named; a session whose response never ended says
`usage=unknown` and is counted as such.

What the upstream reported is what the client received (the relay passes every text message
unchanged): the expected sums are taken from the `response.done` events the client read, never
from the proxy. The real fake upstream reports neither cached nor reasoning tokens, so one
test puts a small aiohttp WebSocket server behind the proxy that reports both.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from aiohttp import WSMsgType, web
from websockets.asyncio.client import connect

from llmproxy.access import AccessKey, key_digest
from llmproxy.limits import KeyLimits
from llmproxy.testing import ProxyServer
from tests.e2e.conftest import GUARD, Target, start_proxy
from tests.e2e.fake_client import FakeUpstreamClient
from tests.e2e.test_usage_e2e import (
    DEADLINE,
    PROXY_KEY,
    TEAM,
    UNNAMED_KEY,
    UNNAMED_NAME,
    Samples,
    access_line,
    assert_no_key_in,
    assert_unknown,
    fields_of,
    metric_samples,
    proxy_with_both_keys,
    sample,
    token_deltas,
)
from tests.e2e.test_websocket_relay import closed_by_peer, recv_event, round_trip, ws_url
from tests.support import ThrowawayUpstream

pytestmark = pytest.mark.e2e

REASONS = ("not_reported", "client_disconnect", "upstream_error")
Usage = dict[str, Any]


# --- the proxy, and what to read back ------------------------------------------------------------


@pytest.fixture(scope="module")
def realtime_proxy(target: Target) -> Iterator[ProxyServer]:
    """A proxy in front of the fake with the named key (a `[keys.<name>]` table, by digest)
    and one key given without a table (LLMPROXY_ACCESS_KEYS), as the HTTP usage tests'."""
    yield from proxy_with_both_keys(target)


@pytest.fixture
def access(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger="llmproxy.access")
    return caplog


def team_headers(request_id: str, **script: Any) -> dict[str, str]:
    """The handshake of the named key's session: its key, its request id, the fake's script."""
    headers = {"Authorization": f"Bearer {PROXY_KEY}", "x-request-id": request_id}
    if script:
        headers["x-fake-script"] = json.dumps(script)
    return headers


# The helpers of test_usage_e2e poll with time.sleep: run in a thread, so that this event loop
# keeps serving whatever the proxy still exchanges with an upstream of the test's own.
async def metrics_of(proxy: ProxyServer) -> Samples:
    return await asyncio.to_thread(metric_samples, proxy)


async def line_of(caplog: pytest.LogCaptureFixture, request_id: str) -> str:
    return await asyncio.to_thread(access_line, caplog, request_id)


def summed(usages: list[Usage]) -> dict[str, int]:
    """The four kinds of tokens of these `response.usage` objects, added up as reported."""
    return {
        "input": sum(usage["input_tokens"] for usage in usages),
        "output": sum(usage["output_tokens"] for usage in usages),
        "cached_input": sum(
            usage.get("input_token_details", {}).get("cached_tokens", 0) for usage in usages
        ),
        "reasoning": sum(
            usage.get("output_token_details", {}).get("reasoning_tokens", 0) for usage in usages
        ),
    }


def assert_line_has(fields: dict[str, str], key: str, model: str, sums: dict[str, int]) -> None:
    assert fields["key"] == key
    assert fields["model"] == model
    assert int(fields["input_tokens"]) == sums["input"]
    assert int(fields["output_tokens"]) == sums["output"]
    assert int(fields["cached_input_tokens"]) == sums["cached_input"]
    assert int(fields["reasoning_tokens"]) == sums["reasoning"]
    assert "usage" not in fields  # `usage=unknown` only when unknown


def unknown_counts(samples: Samples, key: str) -> dict[str, float]:
    return {
        reason: sample(samples, "llmproxy_usage_unknown_total", key=key, reason=reason)
        for reason in REASONS
    }


def user_message(text: str) -> str:
    item = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}
    return json.dumps({"type": "conversation.item.create", "item": item})


# --- usage known: every response.done, summed -------------------------------------------------


async def test_two_responses_usage_is_summed_into_the_session_s_line_and_metrics(
    realtime_proxy: ProxyServer, fake: FakeUpstreamClient, access: pytest.LogCaptureFixture
) -> None:
    model = "rt-usage-e2e-two-responses"
    request_id = "rt-usage-two-responses"
    before = await metrics_of(realtime_proxy)
    url = ws_url(realtime_proxy.url, query=f"model={model}")
    headers = team_headers(request_id, chunks=["Two ", "answers ", "here"])
    async with connect(url, additional_headers=headers) as ws:
        created = await recv_event(ws)
        assert created["type"] == "session.created"
        assert created["session"]["model"] == model
        await ws.send(user_message("Count the tokens of this prompt, every one of them"))
        first = await round_trip(ws)
        await ws.send(user_message("And once more, with a longer prompt this second time"))
        second = await round_trip(ws)
    usages = [first[-1]["response"]["usage"], second[-1]["response"]["usage"]]
    sums = summed(usages)
    # Both responses reported, and differently: a line holding one of them would not pass.
    assert all(usage["input_tokens"] > 0 and usage["output_tokens"] > 0 for usage in usages)
    assert usages[0]["input_tokens"] != usages[1]["input_tokens"]

    line = await line_of(access, request_id)
    assert f"{request_id} WS /v1/realtime 101 " in line
    assert_line_has(fields_of(line), TEAM, model, sums)
    after = await metrics_of(realtime_proxy)
    assert token_deltas(before, after, TEAM, model) == sums
    assert unknown_counts(after, TEAM) == unknown_counts(before, TEAM)
    assert_no_key_in(line, access.text)


async def test_the_model_counted_is_the_one_session_updated_names_last(
    realtime_proxy: ProxyServer, fake: FakeUpstreamClient, access: pytest.LogCaptureFixture
) -> None:
    created_model = "rt-usage-e2e-created-model"
    updated_model = "rt-usage-e2e-updated-model"
    request_id = "rt-usage-updated-model"
    before = await metrics_of(realtime_proxy)
    url = ws_url(realtime_proxy.url, query=f"model={created_model}")
    async with connect(url, additional_headers=team_headers(request_id)) as ws:
        assert (await recv_event(ws))["session"]["model"] == created_model
        await ws.send(json.dumps({"type": "session.update", "session": {"model": updated_model}}))
        updated = await recv_event(ws)
        assert (updated["type"], updated["session"]["model"]) == ("session.updated", updated_model)
        done = (await round_trip(ws))[-1]
    sums = summed([done["response"]["usage"]])

    line = await line_of(access, request_id)
    assert_line_has(fields_of(line), TEAM, updated_model, sums)
    after = await metrics_of(realtime_proxy)
    assert token_deltas(before, after, TEAM, updated_model) == sums
    assert set(token_deltas(before, after, TEAM, created_model).values()) == {0}


# A Realtime upstream of the test's own: `session.created`, then for each `response.create` a
# `response.created` and a `response.done` with the next of these usages (cached and reasoning
# tokens included, which the fake never reports), as the Realtime API spells them.
SCRIPTED_MODEL = "rt-usage-e2e-scripted"
SCRIPTED_USAGES: list[Usage] = [
    {
        "total_tokens": 165,
        "input_tokens": 120,
        "output_tokens": 45,
        "input_token_details": {
            "text_tokens": 100,
            "audio_tokens": 20,
            "image_tokens": 0,
            "cached_tokens": 64,
            "cached_tokens_details": {"text_tokens": 64, "audio_tokens": 0, "image_tokens": 0},
        },
        "output_token_details": {"text_tokens": 45, "audio_tokens": 0, "reasoning_tokens": 12},
    },
    {
        "total_tokens": 110,
        "input_tokens": 80,
        "output_tokens": 30,
        "input_token_details": {"text_tokens": 80, "audio_tokens": 0, "cached_tokens": 32},
        "output_token_details": {"text_tokens": 20, "audio_tokens": 10, "reasoning_tokens": 8},
    },
]


async def scripted_realtime(request: web.Request) -> web.StreamResponse:
    ws = web.WebSocketResponse(protocols=("realtime",))
    await ws.prepare(request)
    session = {"object": "realtime.session", "id": "sess_scripted", "model": SCRIPTED_MODEL}
    await ws.send_str(json.dumps({"type": "session.created", "session": session}))
    usages = iter(SCRIPTED_USAGES)
    async for message in ws:
        if message.type != WSMsgType.TEXT or json.loads(message.data)["type"] != "response.create":
            continue
        response: dict[str, Any] = {"object": "realtime.response", "id": "resp_scripted"}
        created = {**response, "status": "in_progress", "usage": None}
        await ws.send_str(json.dumps({"type": "response.created", "response": created}))
        done = {**response, "status": "completed", "usage": next(usages)}
        await ws.send_str(json.dumps({"type": "response.done", "response": done}))
    return ws


@pytest.fixture
async def scripted_upstream(self_hosted: Target) -> AsyncIterator[ThrowawayUpstream]:
    upstream = ThrowawayUpstream()
    upstream.handler = scripted_realtime
    await upstream.start()
    yield upstream
    await upstream.stop()


async def json_line(caplog: pytest.LogCaptureFixture, request_id: str) -> dict[str, Any]:
    """The session's JSON access line, once the proxy has written it."""
    give_up = time.monotonic() + DEADLINE
    while True:
        for record in list(caplog.records):
            if record.name == "llmproxy.access" and f'"request_id":"{request_id}"' in (
                text := record.getMessage()
            ):
                line: dict[str, Any] = json.loads(text)
                return line
        assert time.monotonic() < give_up, f"no access line for {request_id}: {caplog.text}"
        await asyncio.sleep(0.01)  # polling for a line the proxy's thread writes, with a deadline


async def test_cached_and_reasoning_tokens_are_summed_too_under_a_key_without_a_table(
    scripted_upstream: ThrowawayUpstream, access: pytest.LogCaptureFixture
) -> None:
    """The key proves itself as a browser does (the key subprotocol); it has no table, so its
    name is `key-` + 8 hex digits of its SHA-256; the line is JSON, with the counts as fields."""
    request_id = "rt-usage-scripted"
    GUARD.secrets.append(UNNAMED_KEY.encode())
    try:
        with start_proxy(
            f"{scripted_upstream.url}/v1", access_keys=(UNNAMED_KEY,), log_format="json"
        ) as proxy:
            before = await metrics_of(proxy)
            async with connect(
                ws_url(proxy.url),
                subprotocols=["realtime", f"openai-insecure-api-key.{UNNAMED_KEY}"],  # type: ignore[list-item]
                additional_headers={"x-request-id": request_id},
            ) as ws:
                assert ws.subprotocol == "realtime"
                assert (await recv_event(ws))["type"] == "session.created"
                dones = [(await round_trip(ws))[-1] for _ in SCRIPTED_USAGES]
            line = await json_line(access, request_id)
            after = await metrics_of(proxy)
    finally:
        GUARD.secrets.remove(UNNAMED_KEY.encode())
    received = [done["response"]["usage"] for done in dones]
    assert received == SCRIPTED_USAGES  # passed unchanged
    sums = summed(received)
    assert sums == {"input": 200, "output": 75, "cached_input": 96, "reasoning": 20}
    assert line["kind"] == "websocket"
    assert (line["status"], line["key"], line["usage"]) == (101, UNNAMED_NAME, "known")
    assert line["model"] == SCRIPTED_MODEL
    assert [line[name] for name in ("input_tokens", "output_tokens")] == [200, 75]
    assert [line[name] for name in ("cached_input_tokens", "reasoning_tokens")] == [96, 20]
    assert line["usage_unknown_reason"] is None
    assert token_deltas(before, after, UNNAMED_NAME, SCRIPTED_MODEL) == sums
    assert unknown_counts(after, UNNAMED_NAME) == unknown_counts(before, UNNAMED_NAME)
    assert_no_key_in(json.dumps(line), access.text)


async def test_a_session_without_a_response_reports_no_usage_at_all(
    realtime_proxy: ProxyServer, fake: FakeUpstreamClient, access: pytest.LogCaptureFixture
) -> None:
    model = "rt-usage-e2e-no-response"
    request_id = "rt-usage-no-response"
    before = await metrics_of(realtime_proxy)
    url = ws_url(realtime_proxy.url, query=f"model={model}")
    async with connect(url, additional_headers=team_headers(request_id)) as ws:
        assert (await recv_event(ws))["type"] == "session.created"
    fields = fields_of(await line_of(access, request_id))
    assert fields["key"] == TEAM
    assert "usage" not in fields  # no response was due, so none is unknown
    assert "input_tokens" not in fields
    after = await metrics_of(realtime_proxy)
    assert unknown_counts(after, TEAM) == unknown_counts(before, TEAM)
    assert set(token_deltas(before, after, TEAM, model).values()) == {0}


# --- usage unknown: a response created and never done ------------------------------------------


async def begin_response(ws: Any) -> None:
    """Ask for a response and see it begin (`response.created`)."""
    await ws.send(json.dumps({"type": "response.create"}))
    assert (await recv_event(ws))["type"] == "response.created"


async def response_under_way(ws: Any) -> None:
    """A session opened (`session.created`) and a response begun in it."""
    assert (await recv_event(ws))["type"] == "session.created"
    await begin_response(ws)


async def test_an_upstream_reset_after_response_created_is_unknown_upstream_error(
    realtime_proxy: ProxyServer, fake: FakeUpstreamClient, access: pytest.LogCaptureFixture
) -> None:
    model = "rt-usage-e2e-reset"
    request_id = "rt-usage-reset"
    before = await metrics_of(realtime_proxy)
    url = ws_url(realtime_proxy.url, query=f"model={model}")
    # Two server events (session.created, response.created), then a TCP reset.
    headers = team_headers(request_id, ending="reset", after_chunks=2)
    async with connect(url, additional_headers=headers) as ws:
        await response_under_way(ws)
        assert (await closed_by_peer(ws)).code == 1014
    line = await asyncio.to_thread(
        assert_unknown, realtime_proxy, access, request_id, "upstream_error", before, model
    )
    assert "ending=upstream_error" in line


async def test_a_client_lost_mid_response_is_unknown_client_disconnect(
    realtime_proxy: ProxyServer, fake: FakeUpstreamClient, access: pytest.LogCaptureFixture
) -> None:
    model = "rt-usage-e2e-client-lost"
    request_id = "rt-usage-client-lost"
    before = await metrics_of(realtime_proxy)
    url = ws_url(realtime_proxy.url, query=f"model={model}")
    headers = team_headers(request_id, chunks=["tick"] * 50, delay_per_chunk=0.2)
    async with connect(url, additional_headers=headers) as ws:
        await response_under_way(ws)
        ws.transport.abort()  # TCP gone, no close frame, the response still going
    line = await asyncio.to_thread(
        assert_unknown, realtime_proxy, access, request_id, "client_disconnect", before, model
    )
    assert "ending=client_disconnect" in line


async def test_a_client_that_closes_mid_response_is_unknown_client_disconnect(
    realtime_proxy: ProxyServer, fake: FakeUpstreamClient, access: pytest.LogCaptureFixture
) -> None:
    """The client closes the session (a close frame) while a response is still streaming: the
    answer was cut by the client, as when an HTTP client leaves mid-stream. `not_reported` is
    for an answer that was whole and named no usage (access_log.NOT_REPORTED), which would
    tell an operator the upstream does not report usage: this one never got to."""
    model = "rt-usage-e2e-client-closed"
    request_id = "rt-usage-client-closed"
    before = await metrics_of(realtime_proxy)
    url = ws_url(realtime_proxy.url, query=f"model={model}")
    headers = team_headers(request_id, chunks=["tick"] * 50, delay_per_chunk=0.2)
    async with connect(url, additional_headers=headers) as ws:
        await response_under_way(ws)
        await ws.close(1000)
    (entry,) = await asyncio.to_thread(
        fake.wait_for_journal, lambda journal: len(journal) == 1 and journal[0]["disconnected"]
    )
    done = [m for m in entry["websocket"]["messages"] if '"response.done"' in str(m.get("text"))]
    assert done == []  # the response never ended
    await asyncio.to_thread(
        assert_unknown, realtime_proxy, access, request_id, "client_disconnect", before, model
    )


@pytest.mark.parametrize("last_response", ["done", "cut"])
async def test_tokens_a_session_s_finished_responses_reported_are_charged_to_its_key(
    self_hosted: Target,
    fake: FakeUpstreamClient,
    access: pytest.LogCaptureFixture,
    last_response: str,
) -> None:
    """A key with tokens_per_minute = 50: its session's first response reports well over 50
    tokens, so its next request is refused (tokens are charged when the usage is known, DESIGN
    §11). `cut`: the client then closes while a second response is under way. The first
    response's usage did arrive all the same: dropping it would let a client spend any number
    of tokens by never letting the last response of a session finish."""
    limited = AccessKey(TEAM, key_digest(PROXY_KEY), KeyLimits(tokens_per_minute=50))
    model = f"rt-usage-e2e-charged-{last_response}"
    request_id = f"rt-usage-charged-{last_response}"
    GUARD.secrets.append(PROXY_KEY.encode())
    try:
        with start_proxy(fake.base_url, named_keys=(limited,), read_timeout=10.0) as proxy:
            url = ws_url(proxy.url, query=f"model={model}")
            # Each response: one delta 0.3 s on, and 100 reasoning tokens in its output.
            headers = team_headers(
                request_id, chunks=["slow"], delay_per_chunk=0.3, reasoning_tokens=100
            )
            async with connect(url, additional_headers=headers) as ws:
                assert (await recv_event(ws))["type"] == "session.created"
                usage = (await round_trip(ws))[-1]["response"]["usage"]
                assert usage["input_tokens"] + usage["output_tokens"] > 50
                if last_response == "cut":
                    await begin_response(ws)
                await ws.close(1000)
            await line_of(access, request_id)  # the session is over, its limits released
            refused = await asyncio.to_thread(
                httpx.post,
                f"{proxy.base_url}/chat/completions",
                json={"model": model, "messages": [{"role": "user", "content": "hi"}]},
                headers={"Authorization": f"Bearer {PROXY_KEY}"},
                timeout=DEADLINE,
            )
    finally:
        GUARD.secrets.remove(PROXY_KEY.encode())
    assert refused.status_code == 429, refused.text
    assert refused.json()["error"]["type"] == "tokens"
    assert "tokens_per_minute" in refused.json()["error"]["message"]
