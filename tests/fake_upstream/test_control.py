"""Scripting by header and by queue, the control API, echo, and the journal over HTTP."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from fake_upstream import FakeUpstreamServer, ScriptError, create_app
from fake_upstream.journal import JournalTimeoutError
from fake_upstream.responses import ScriptedConnectionEndError


@pytest.fixture
def http(fake_upstream: FakeUpstreamServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=fake_upstream.url, timeout=10) as client:
        yield client


CHAT_BODY = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hi"}]}

# (request headers, what the 400 message must say)
BAD_HEADER_SCRIPTS: list[tuple[dict[str, str], str]] = [
    ({"x-fake-scenario": "nope"}, "x-fake-scenario: unknown scenario 'nope'; known scenarios:"),
    ({"x-fake-script": "{not json"}, "x-fake-script: not valid JSON"),
    ({"x-fake-script": "[1, 2]"}, "x-fake-script: a script must be a JSON object"),
    ({"x-fake-script": '{"stauts": 429}'}, "x-fake-script: unknown field 'stauts'"),
    ({"x-fake-script": '{"status": "429"}'}, "field 'status' must be an integer"),
    ({"x-fake-script": '{"status": 700}'}, "field 'status' must be an integer between 200"),
    ({"x-fake-script": '{"delay_per_chunk": -0.5}'}, "field 'delay_per_chunk' must be a finite"),
    ({"x-fake-script": '{"ending": "boom"}'}, "field 'ending' must be one of done, close"),
    ({"x-fake-script": '{"chunks": [1]}'}, "field 'chunks' must be a list of strings"),
    ({"x-fake-script": '{"headers": {"a b": "1"}}'}, "'a b' is not a valid header name"),
    ({"x-fake-script": '{"headers": 5}'}, "field 'headers' must be an object or a list"),
    ({"x-fake-script": '{"echo": 1}'}, "field 'echo' must be a boolean"),
    (
        {"x-fake-scenario": "rate_limited", "x-fake-script": '{"after_chunks": "2"}'},
        "field 'after_chunks' must be an integer",
    ),
]


@pytest.mark.parametrize(("headers", "message"), BAD_HEADER_SCRIPTS)
def test_bad_header_script_is_a_400_saying_why(
    http: httpx.Client, fake_upstream: FakeUpstreamServer, headers: dict[str, str], message: str
) -> None:
    response = http.post("/v1/chat/completions", json=CHAT_BODY, headers=headers)
    assert response.status_code == 400
    error = response.json()["error"]
    assert message in error["message"], error["message"]
    assert error["type"] == "invalid_request_error"
    assert error["code"] == "invalid_fake_script"
    assert fake_upstream.journal()[0]["status"] == 400


def test_repeated_script_header_is_refused(http: httpx.Client) -> None:
    response = http.post(
        "/v1/chat/completions",
        json=CHAT_BODY,
        headers=[("x-fake-script", "{}"), ("x-fake-script", "{}")],
    )
    assert response.status_code == 400
    assert "x-fake-script: sent 2 times" in response.json()["error"]["message"]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"scripts": [{}, {"status": True}]}, "scripts[1]: field 'status' must be an integer"),
        ({"scripts": ["nope"]}, "scripts[0]: unknown scenario 'nope'"),
        ({"scripts": {}}, "'scripts' must be a list"),
        ({"script": []}, 'the body must be a JSON object {"scripts": [script, ...]}'),
    ],
)
def test_bad_queue_request_is_a_400_and_queues_nothing(
    http: httpx.Client, body: Any, message: str
) -> None:
    response = http.post("/_fake/queue", json=body)
    assert response.status_code == 400
    assert message in response.json()["error"]["message"]
    assert http.get("/_fake/queue").json() == {"pending": []}


def test_queue_429_503_200_in_order(http: httpx.Client, fake_upstream: FakeUpstreamServer) -> None:
    response = http.post(
        "/_fake/queue", json={"scripts": ["rate_limited", {"status": 503}, {"chunks": ["ok"]}]}
    )
    assert response.json() == {"queued": 3, "pending": 3}
    statuses = [http.post("/v1/chat/completions", json=CHAT_BODY) for _ in range(4)]
    assert [r.status_code for r in statuses] == [429, 503, 200, 200]
    assert statuses[0].json()["error"]["code"] == "rate_limit_exceeded"
    assert statuses[0].headers["retry-after"] == "1"
    assert statuses[2].json()["choices"][0]["message"]["content"] == "ok"
    assert statuses[3].json()["choices"][0]["message"]["content"] == "Hello from fake upstream!"
    assert [e["status"] for e in fake_upstream.journal()] == [429, 503, 200, 200]


def test_header_script_does_not_consume_the_queue(
    http: httpx.Client, fake_upstream: FakeUpstreamServer
) -> None:
    fake_upstream.queue({"status": 503})
    assert http.get("/v1/models", headers={"x-fake-scenario": "echo"}).status_code == 200
    assert http.get("/v1/models").status_code == 503


def test_queue_clear_over_http(http: httpx.Client) -> None:
    http.post("/_fake/queue", json={"scripts": [{"status": 500}]})
    assert len(http.get("/_fake/queue").json()["pending"]) == 1
    assert http.delete("/_fake/queue").status_code == 204
    assert http.get("/v1/models").status_code == 200


def test_python_queue_refuses_bad_scripts(fake_upstream: FakeUpstreamServer) -> None:
    with pytest.raises(ScriptError, match=r"scripts\[1\]: unknown field 'x'"):
        fake_upstream.queue({}, {"x": 1})


def test_echo_reports_exactly_what_arrived(http: httpx.Client) -> None:
    body = b'{"any": "bytes"}'
    response = http.request(
        "PATCH",
        "/v1/some/where%2Fodd?b=2&a=1&a=%20",
        content=body,
        headers=[
            ("x-fake-scenario", "echo"),
            ("X-Repeat", "one"),
            ("Authorization", "Bearer sk-x"),
            ("x-repeat", "two"),
        ],
    )
    echo = response.json()
    assert response.status_code == 200
    assert echo["method"] == "PATCH"
    assert echo["path"] == "/v1/some/where/odd"
    assert echo["raw_path"] == "/v1/some/where%2Fodd"
    assert echo["query"] == "b=2&a=1&a=%20"
    assert echo["body_length"] == len(body)
    assert echo["body_sha256"] == hashlib.sha256(body).hexdigest()
    names = [name for name, _ in echo["headers"]]
    assert names.index("x-fake-scenario") < names.index("x-repeat") < names.index("authorization")
    assert [v for n, v in echo["headers"] if n == "x-repeat"] == ["one", "two"]


def test_scripted_status_body_and_headers(http: httpx.Client) -> None:
    script = {
        "status": 418,
        "body": "short and stout",
        "headers": [["x-a", "1"], ["x-a", "2"], ["x-request-id", "req_fixed"]],
    }
    response = http.post("/v1/embeddings", json={}, headers={"x-fake-script": json.dumps(script)})
    assert response.status_code == 418
    assert response.text == "short and stout"
    assert response.headers.get_list("x-a") == ["1", "2"]
    assert response.headers.get_list("x-request-id") == ["req_fixed"]


def test_unknown_path_and_bad_body(http: httpx.Client) -> None:
    missing = http.post("/v1/nothing/here", json={})
    assert missing.status_code == 404
    assert missing.json()["error"]["message"] == "Invalid URL (POST /v1/nothing/here)"
    bad = http.post("/v1/chat/completions", content=b"{nope")
    assert bad.status_code == 400
    assert "could not parse the JSON body" in bad.json()["error"]["message"]


def test_journal_over_http(http: httpx.Client, fake_upstream: FakeUpstreamServer) -> None:
    http.get("/v1/models?x=1", headers={"x-trace": "a"})
    http.get("/_fake/scenarios")  # control calls are not journaled
    (entry,) = http.get("/_fake/journal").json()
    assert set(entry) >= {
        "id",
        "method",
        "path",
        "query",
        "headers",
        "body_sha256",
        "received_at",
        "chunks",
        "completed",
        "disconnected",
        "disconnected_at",
        "chunks_before_disconnect",
    }
    assert (entry["method"], entry["path"], entry["query"]) == ("GET", "/v1/models", "x=1")
    assert ["x-trace", "a"] in entry["headers"]
    assert entry["body_sha256"] == hashlib.sha256(b"").hexdigest()
    assert entry == fake_upstream.journal()[0]
    assert http.delete("/_fake/journal").status_code == 204
    assert http.get("/_fake/journal").json() == []


def test_wait_for_journal_times_out_with_the_journal(fake_upstream: FakeUpstreamServer) -> None:
    with pytest.raises(JournalTimeoutError, match=r"within 0.05s; journal: \[\]"):
        fake_upstream.wait_for_journal(lambda j: len(j) > 0, timeout=0.05)


def test_wait_for_journal_treats_lookup_errors_as_not_yet(
    http: httpx.Client, fake_upstream: FakeUpstreamServer
) -> None:
    with pytest.raises(JournalTimeoutError):
        fake_upstream.wait_for_journal(lambda j: j[0]["completed"], timeout=0.05)
    http.get("/v1/models")
    assert fake_upstream.wait_for_journal(lambda j: j[0]["completed"])[0]["status"] == 200


async def test_reset_without_the_runner_raises_in_the_app() -> None:
    """Served by anything but fake_upstream.server there is no transport to reset; the app
    raises instead, which the server turns into an aborted response."""
    transport = httpx.ASGITransport(app=create_app())
    async with httpx.AsyncClient(transport=transport, base_url="http://fake") as client:
        with pytest.raises(ScriptedConnectionEndError, match="serve the app with fake_upstream"):
            await client.get("/v1/models", headers={"x-fake-script": '{"ending": "reset"}'})


async def test_apps_do_not_share_state() -> None:
    first, second = create_app(), create_app()
    transport = httpx.ASGITransport(app=first)
    async with httpx.AsyncClient(transport=transport, base_url="http://fake") as client:
        response = await client.post("/v1/chat/completions", json=CHAT_BODY)
    assert response.json()["choices"][0]["message"]["content"] == "Hello from fake upstream!"
    assert len(first.state.journal.entries()) == 1
    assert second.state.journal.entries() == []


def test_latency_delays_headers() -> None:
    with FakeUpstreamServer(latency=0.2) as server, httpx.Client(timeout=10) as client:
        client.get(f"{server.url}/v1/models")
        (entry,) = server.journal()
    assert entry["headers_sent_at"] - entry["received_at"] >= 0.18
    with pytest.raises(ValueError, match="latency must be"):
        create_app(-1)
