"""Who spent what (DESIGN §11, issue 13): through the official SDK, the proxy and the fake
upstream, every answer kind's token usage reaches the access line and `/metrics` under the
key's name, exactly as the upstream reported it, and the client gets every byte unchanged.

What the upstream reported is read from the fake's own answer to the same request sent to it
directly (ids and timestamps pinned, so both answers are the same bytes); it is never taken
from the proxy.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
import logging
import re
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import httpx2
import openai
import pytest
from aiohttp import web
from openai.types.chat import ChatCompletionMessageParam
from prometheus_client.parser import text_string_to_metric_families

from llmproxy.access import AccessKey
from llmproxy.config import load_configuration
from llmproxy.testing import ProxyServer
from tests.e2e.conftest import GUARD, Target, start_proxy
from tests.e2e.fake_client import FakeUpstreamClient, Journal
from tests.support import ThrowawayUpstream
from tests.unit.test_usage import reference_of_body, reference_of_stream

pytestmark = pytest.mark.e2e

TEAM = "team-usage"
PROXY_KEY = "sk-proxy-usage-e2e-SECRET-team"
UNNAMED_KEY = "sk-proxy-usage-e2e-SECRET-unnamed"
UNNAMED_NAME = "key-" + hashlib.sha256(UNNAMED_KEY.encode()).hexdigest()[:8]
KEY_TRACES = [
    text
    for key in (PROXY_KEY, UNNAMED_KEY)
    for text in (key, hashlib.sha256(key.encode()).hexdigest())
]
PINNED = {"created": 1_700_000_000}
DEADLINE = 5.0
KINDS = ("input", "output", "cached_input", "reasoning")
TOKEN_FIELDS = ("input_tokens", "output_tokens", "cached_input_tokens", "reasoning_tokens")
Tokens = tuple[str | None, int, int, int, int]


# --- the proxy, a recording SDK, and what to read back ------------------------------------------


def usage_named_keys() -> tuple[AccessKey, ...]:
    """The named key as a `[keys.<name>]` table of LLMPROXY_KEYS_FILE gives it (by digest)."""
    with tempfile.TemporaryDirectory() as directory:
        keys_file = Path(directory) / "keys.toml"
        digest = hashlib.sha256(PROXY_KEY.encode()).hexdigest()
        keys_file.write_text(f'[keys.{TEAM}]\nkey_sha256 = "{digest}"\n')
        return load_configuration({"LLMPROXY_KEYS_FILE": str(keys_file)}).named_keys_from_file


@pytest.fixture(scope="module")
def usage_proxy(target: Target) -> Iterator[ProxyServer]:
    """A proxy with one named key (a `[keys.<name>]` table, by digest) and one unnamed key."""
    yield from proxy_with_both_keys(target)


def proxy_with_both_keys(target: Target) -> Iterator[ProxyServer]:
    """The body of `usage_proxy` (the Realtime usage tests' fixture runs it too)."""
    if not target.self_hosted:
        pytest.skip("needs a proxy started by the suite")
    named = usage_named_keys()
    GUARD.secrets.extend(key.encode() for key in (PROXY_KEY, UNNAMED_KEY))
    try:
        with start_proxy(
            target.fake.base_url,
            named_keys_from_file=named,
            access_keys=(UNNAMED_KEY,),
            read_timeout=10.0,
        ) as proxy:
            yield proxy
    finally:
        for key in (PROXY_KEY, UNNAMED_KEY):
            GUARD.secrets.remove(key.encode())


@dataclass
class Exchange:
    """One request as the SDK sent it and the body bytes as they arrived."""

    request: httpx2.Request
    status: int = 0
    body: bytearray = field(default_factory=bytearray)


class _Tee(httpx2.SyncByteStream):
    def __init__(self, inner: httpx2.SyncByteStream, sink: bytearray) -> None:
        self._inner = inner
        self._sink = sink

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self._inner:
            self._sink += chunk
            yield chunk

    def close(self) -> None:
        self._inner.close()


class RecordingTransport(httpx2.BaseTransport):
    """The SDK's own HTTP transport, keeping a copy of every body byte received (as sent, before
    any decoding)."""

    def __init__(self) -> None:
        self._inner = httpx2.HTTPTransport()
        self.exchanges: list[Exchange] = []

    def handle_request(self, request: httpx2.Request) -> httpx2.Response:
        response = self._inner.handle_request(request)
        exchange = Exchange(request, response.status_code)
        self.exchanges.append(exchange)
        assert isinstance(response.stream, httpx2.SyncByteStream)
        return httpx2.Response(
            response.status_code,
            headers=response.headers,
            stream=_Tee(response.stream, exchange.body),
            extensions=response.extensions,
            request=request,
        )

    def close(self) -> None:
        self._inner.close()


@dataclass
class Client:
    sdk: openai.OpenAI
    transport: RecordingTransport

    @property
    def last(self) -> Exchange:
        return self.transport.exchanges[-1]


def client_for(proxy: ProxyServer, key: str) -> Iterator[Client]:
    transport = RecordingTransport()
    http = httpx2.Client(transport=transport, timeout=10.0)
    with openai.OpenAI(
        base_url=proxy.base_url, api_key=key, max_retries=0, http_client=http
    ) as sdk:
        yield Client(sdk, transport)


@pytest.fixture
def team(usage_proxy: ProxyServer, fake: FakeUpstreamClient) -> Iterator[Client]:
    """The SDK with the named key."""
    yield from client_for(usage_proxy, PROXY_KEY)


@pytest.fixture
def unnamed(usage_proxy: ProxyServer, fake: FakeUpstreamClient) -> Iterator[Client]:
    """The SDK with the key given without a table (LLMPROXY_ACCESS_KEYS)."""
    yield from client_for(usage_proxy, UNNAMED_KEY)


@pytest.fixture
def access(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger="llmproxy.access")
    return caplog


def access_line(caplog: pytest.LogCaptureFixture, request_id: str) -> str:
    """The request's access line, once the proxy has written it (after the body's end)."""
    give_up = time.monotonic() + DEADLINE
    while True:
        for record in list(caplog.records):
            if record.name == "llmproxy.access" and record.getMessage().startswith(
                request_id + " "
            ):
                return record.getMessage()
        assert time.monotonic() < give_up, f"no access line for {request_id}: {caplog.text}"
        time.sleep(0.01)  # polling for a line another thread writes, with a deadline


def fields_of(line: str) -> dict[str, str]:
    return dict(re.findall(r"(\w+)=(\S+)", line))


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def metric_samples(proxy: ProxyServer) -> Samples:
    page = httpx.get(f"{proxy.url}/metrics", timeout=10).text
    for trace in KEY_TRACES:
        assert trace not in page
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(page)
        for sample in family.samples
    }


def sample(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def token_deltas(before: Samples, after: Samples, key: str, model: str) -> dict[str, float]:
    return {
        kind: sample(after, "llmproxy_tokens_total", key=key, model=model, kind=kind)
        - sample(before, "llmproxy_tokens_total", key=key, model=model, kind=kind)
        for kind in KINDS
    }


def direct(fake: FakeUpstreamClient, exchange: Exchange, script: dict[str, Any]) -> bytes:
    """The fake's answer to the same request sent to it without the proxy."""
    path = exchange.request.url.path.removeprefix("/v1")
    response = httpx.post(
        f"{fake.base_url}{path}",
        content=exchange.request.content,
        headers={"content-type": "application/json", "x-fake-script": json.dumps(script)},
        timeout=10,
    )
    assert response.status_code == 200
    return response.content


def headers_for(script: dict[str, Any], request_id: str) -> dict[str, str]:
    return {"x-fake-script": json.dumps(script), "x-request-id": request_id}


def assert_no_key_in(*texts: str | bytes) -> None:
    for text in texts:
        data = text if isinstance(text, bytes) else text.encode()
        for trace in KEY_TRACES:
            assert trace.encode() not in data


# --- every answer kind: the usage reported, in the line and the metrics, and no byte changed ----

Call = Callable[[openai.OpenAI, str, dict[str, str]], tuple[int, int]]
PROMPT: list[ChatCompletionMessageParam] = [
    {"role": "user", "content": "Please count the tokens of this prompt, all of them."}
]


def chat(sdk: openai.OpenAI, model: str, headers: dict[str, str]) -> tuple[int, int]:
    completion = sdk.chat.completions.create(model=model, messages=PROMPT, extra_headers=headers)
    assert completion.usage is not None
    return completion.usage.prompt_tokens, completion.usage.completion_tokens


def chat_stream(sdk: openai.OpenAI, model: str, headers: dict[str, str]) -> tuple[int, int]:
    stream = sdk.chat.completions.create(
        model=model,
        messages=PROMPT,
        stream=True,
        stream_options={"include_usage": True},
        extra_headers=headers,
    )
    usages = [chunk.usage for chunk in stream if chunk.usage is not None]
    assert len(usages) == 1
    return usages[0].prompt_tokens, usages[0].completion_tokens


def completions(sdk: openai.OpenAI, model: str, headers: dict[str, str]) -> tuple[int, int]:
    completion = sdk.completions.create(
        model=model, prompt="Once upon a time, in a land far away,", extra_headers=headers
    )
    assert completion.usage is not None
    return completion.usage.prompt_tokens, completion.usage.completion_tokens


def completions_stream(sdk: openai.OpenAI, model: str, headers: dict[str, str]) -> tuple[int, int]:
    stream = sdk.completions.create(
        model=model,
        prompt="Once upon a time, in a land far away,",
        stream=True,
        stream_options={"include_usage": True},
        extra_headers=headers,
    )
    usages = [chunk.usage for chunk in stream if chunk.usage is not None]
    assert len(usages) == 1
    return usages[0].prompt_tokens, usages[0].completion_tokens


def embeddings(sdk: openai.OpenAI, model: str, headers: dict[str, str]) -> tuple[int, int]:
    inputs = ["the first text to embed, long enough", "a second one" * 40]
    answer = sdk.embeddings.create(model=model, input=inputs, extra_headers=headers)
    assert len(answer.data) == 2
    return answer.usage.prompt_tokens, 0


def responses(sdk: openai.OpenAI, model: str, headers: dict[str, str]) -> tuple[int, int]:
    response = sdk.responses.create(
        model=model,
        instructions="You are terse.",
        input="Say hello to everyone in the room",
        extra_headers=headers,
    )
    assert response.usage is not None
    return response.usage.input_tokens, response.usage.output_tokens


def responses_stream(sdk: openai.OpenAI, model: str, headers: dict[str, str]) -> tuple[int, int]:
    stream = sdk.responses.create(
        model=model, input="Say hello to everyone in the room", stream=True, extra_headers=headers
    )
    endings = [
        event
        for event in stream
        if event.type in ("response.completed", "response.incomplete", "response.failed")
    ]
    assert len(endings) == 1
    usage = endings[0].response.usage
    assert usage is not None
    return usage.input_tokens, usage.output_tokens


CHAT_BODY = {  # a scripted body: the fake's own answers never report cached tokens
    "id": "chatcmpl-cached",
    "object": "chat.completion",
    "created": 1_700_000_000,
    "model": "usage-e2e-chat-cached",
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": 'The "usage" is', "refusal": None},
            "logprobs": None,
            "finish_reason": "stop",
        }
    ],
    "usage": {
        "prompt_tokens": 1234,
        "completion_tokens": 56,
        "total_tokens": 1290,
        "prompt_tokens_details": {"cached_tokens": 1024, "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 32, "audio_tokens": 0},
    },
    "service_tier": "default",
    "system_fingerprint": "fp_usage",
}
RESPONSE_BODY = {
    "id": "resp_cached",
    "object": "response",
    "created_at": 1_700_000_000,
    "status": "completed",
    "error": None,
    "incomplete_details": None,
    "instructions": None,
    "model": "usage-e2e-responses-cached",
    "output": [
        {
            "type": "message",
            "id": "msg_cached",
            "status": "completed",
            "role": "assistant",
            "content": [{"type": "output_text", "text": "Hi", "annotations": []}],
        }
    ],
    "parallel_tool_calls": True,
    "tools": [],
    "usage": {
        "input_tokens": 4321,
        "input_tokens_details": {"cached_tokens": 4096},
        "output_tokens": 77,
        "output_tokens_details": {"reasoning_tokens": 64},
        "total_tokens": 4398,
    },
    "user": None,
    "metadata": {},
}


@dataclass(frozen=True)
class AnswerKind:
    call: Call
    script: dict[str, Any]
    streamed: bool


ANSWER_KINDS: dict[str, AnswerKind] = {
    "chat": AnswerKind(chat, {"id": "chatcmpl-u1", "reasoning_tokens": 5}, False),
    "chat-cached": AnswerKind(chat, {"body": CHAT_BODY}, False),
    "chat-stream": AnswerKind(
        chat_stream,
        {"id": "chatcmpl-u2", "chunks": ["Hel", "lo", "!"], "reasoning_tokens": 7},
        True,
    ),
    "completions": AnswerKind(completions, {"id": "cmpl-u3"}, False),
    "completions-stream": AnswerKind(
        completions_stream, {"id": "cmpl-u4", "chunks": ["a", "b", "c", "d"]}, True
    ),
    "embeddings": AnswerKind(embeddings, {}, False),
    "responses": AnswerKind(responses, {"id": "resp_u5", "reasoning_tokens": 9}, False),
    "responses-cached": AnswerKind(responses, {"body": RESPONSE_BODY}, False),
    "responses-stream-completed": AnswerKind(
        responses_stream, {"id": "resp_u6", "reasoning_tokens": 3}, True
    ),
    "responses-stream-incomplete": AnswerKind(
        responses_stream, {"id": "resp_u7", "ending": "incomplete", "after_chunks": 2}, True
    ),
    "responses-stream-failed": AnswerKind(
        responses_stream,
        {"id": "resp_u8", "ending": "failed", "after_chunks": 1, "reasoning_tokens": 4},
        True,
    ),
}


@pytest.mark.parametrize("name", sorted(ANSWER_KINDS))
def test_each_answer_kind_s_usage_reaches_the_line_and_the_metrics_unchanged(
    usage_proxy: ProxyServer,
    team: Client,
    fake: FakeUpstreamClient,
    access: pytest.LogCaptureFixture,
    name: str,
) -> None:
    kind = ANSWER_KINDS[name]
    model = str(kind.script.get("body", {}).get("model", f"usage-e2e-{name}"))
    script = {**PINNED, **kind.script}
    request_id = f"usage-{name}"
    before = metric_samples(usage_proxy)

    seen_by_sdk = kind.call(team.sdk, model, headers_for(script, request_id))

    exchange = team.last
    answer = direct(fake, exchange, script)
    expected = reference_of_stream(answer) if kind.streamed else reference_of_body(answer)
    assert expected is not None
    assert expected[0] == model
    assert seen_by_sdk == expected[1:3]
    assert expected[1] > 0
    assert expected[2] > 0 or name == "embeddings"
    # Usage accounting changes no byte: the client got exactly what the fake sends.
    assert exchange.status == 200
    assert bytes(exchange.body) == answer

    line = access_line(access, request_id)
    fields = fields_of(line)
    assert fields["key"] == TEAM
    assert fields["model"] == model
    assert [int(fields[name]) for name in TOKEN_FIELDS] == list(expected[1:])
    assert "usage=unknown" not in line
    assert_no_key_in(line, access.text)

    after = metric_samples(usage_proxy)
    assert token_deltas(before, after, TEAM, model) == dict(zip(KINDS, expected[1:], strict=True))
    requests = sample(after, "llmproxy_requests_total", key=TEAM, status="200") - sample(
        before, "llmproxy_requests_total", key=TEAM, status="200"
    )
    assert requests == 1


def test_the_model_counted_is_the_one_the_answer_names_not_the_one_asked_for(
    usage_proxy: ProxyServer,
    team: Client,
    fake: FakeUpstreamClient,
    access: pytest.LogCaptureFixture,
) -> None:
    # OpenAI answers `gpt-4o-mini` with the snapshot that served it: that is what is billed.
    asked, served = "usage-e2e-alias", "usage-e2e-alias-2026-12-02"
    script = {**PINNED, "id": "chatcmpl-m1", "model": served}
    before = metric_samples(usage_proxy)
    chat(team.sdk, asked, headers_for(script, "usage-served-model"))
    expected = reference_of_body(direct(fake, team.last, script))
    assert expected is not None
    assert expected[0] == served
    assert fields_of(access_line(access, "usage-served-model"))["model"] == served
    after = metric_samples(usage_proxy)
    assert token_deltas(before, after, TEAM, served)["input"] == expected[1]
    assert token_deltas(before, after, TEAM, asked)["input"] == 0


def test_a_key_without_a_table_is_named_by_its_digest(
    usage_proxy: ProxyServer,
    unnamed: Client,
    fake: FakeUpstreamClient,
    access: pytest.LogCaptureFixture,
) -> None:
    model = "usage-e2e-unnamed"
    script = {**PINNED, "id": "chatcmpl-u9"}
    before = metric_samples(usage_proxy)
    chat(unnamed.sdk, model, headers_for(script, "usage-unnamed"))
    expected = reference_of_body(direct(fake, unnamed.last, script))
    assert expected is not None
    fields = fields_of(access_line(access, "usage-unnamed"))
    assert fields["key"] == UNNAMED_NAME
    assert int(fields["input_tokens"]) == expected[1]
    after = metric_samples(usage_proxy)
    assert token_deltas(before, after, UNNAMED_NAME, model)["input"] == expected[1]
    assert token_deltas(before, after, TEAM, model)["input"] == 0
    assert_no_key_in(access.text)


def test_the_json_access_line_has_the_key_model_and_counts_as_fields(
    self_hosted: Target,
    usage_proxy: ProxyServer,
    fake: FakeUpstreamClient,
    access: pytest.LogCaptureFixture,
) -> None:
    script = {**PINNED, "id": "chatcmpl-json", "reasoning_tokens": 2}
    with (
        start_proxy(
            fake.base_url, named_keys_from_file=usage_named_keys(), log_format="json"
        ) as proxy,
        openai.OpenAI(base_url=proxy.base_url, api_key=PROXY_KEY, max_retries=0) as sdk,
    ):
        raw = sdk.chat.completions.with_raw_response.create(
            model="usage-e2e-json-line",
            messages=PROMPT,
            extra_headers=headers_for(script, "usage-json-line"),
        )
    expected = reference_of_body(raw.content)
    assert expected is not None
    give_up = time.monotonic() + DEADLINE
    while not (
        lines := [
            json.loads(record.getMessage())
            for record in list(access.records)
            if record.name == "llmproxy.access" and '"usage-json-line"' in record.getMessage()
        ]
    ):
        assert time.monotonic() < give_up, access.text
        time.sleep(0.01)  # polling for a line another thread writes, with a deadline
    (line,) = lines
    assert line["request_id"] == "usage-json-line"
    assert line["key"] == TEAM
    assert line["usage"] == "known"
    assert (line["model"], *(line[name] for name in TOKEN_FIELDS)) == expected
    assert_no_key_in(access.text)


# --- usage that never arrived -------------------------------------------------------------------


def unknown_count(samples: Samples, reason: str) -> float:
    return sample(samples, "llmproxy_usage_unknown_total", key=TEAM, reason=reason)


def assert_unknown(
    proxy: ProxyServer,
    caplog: pytest.LogCaptureFixture,
    request_id: str,
    reason: str,
    before: Samples,
    model: str,
) -> str:
    line = access_line(caplog, request_id)
    fields = fields_of(line)
    assert fields["key"] == TEAM
    assert fields["usage"] == "unknown"
    assert fields["usage_unknown_reason"] == reason
    assert "input_tokens" not in fields
    after = metric_samples(proxy)
    assert unknown_count(after, reason) - unknown_count(before, reason) == 1
    others = {"not_reported", "client_disconnect", "upstream_error"} - {reason}
    for other in others:
        assert unknown_count(after, other) == unknown_count(before, other)
    assert set(token_deltas(before, after, TEAM, model).values()) == {0}
    assert_no_key_in(line, caplog.text)
    return line


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_a_stream_without_include_usage_is_unknown_not_reported(
    usage_proxy: ProxyServer,
    team: Client,
    fake: FakeUpstreamClient,
    access: pytest.LogCaptureFixture,
    endpoint: str,
) -> None:
    model = f"usage-e2e-not-reported-{endpoint}"
    script = {**PINNED, "id": f"x-{endpoint}"}
    request_id = f"usage-not-reported-{endpoint}"
    before = metric_samples(usage_proxy)
    headers = headers_for(script, request_id)
    if endpoint == "chat":
        stream: Any = team.sdk.chat.completions.create(
            model=model, messages=PROMPT, stream=True, extra_headers=headers
        )
    else:
        stream = team.sdk.completions.create(
            model=model, prompt="Once", stream=True, extra_headers=headers
        )
    assert all(chunk.usage is None for chunk in stream)
    answer = direct(fake, team.last, script)
    assert reference_of_stream(answer) is None  # the fake really sent no usage
    assert bytes(team.last.body) == answer
    assert_unknown(usage_proxy, access, request_id, "not_reported", before, model)


def left(journal: Journal) -> bool:
    return len(journal) == 1 and journal[0]["disconnected"]


@pytest.mark.parametrize("endpoint", ["chat", "responses"])
def test_a_client_that_leaves_mid_stream_is_unknown_client_disconnect(
    usage_proxy: ProxyServer,
    team: Client,
    fake: FakeUpstreamClient,
    access: pytest.LogCaptureFixture,
    endpoint: str,
) -> None:
    model = f"usage-e2e-left-{endpoint}"
    script = {"chunks": ["tick"] * 30, "delay_per_chunk": 0.2}
    request_id = f"usage-left-{endpoint}"
    before = metric_samples(usage_proxy)
    headers = headers_for(script, request_id)
    if endpoint == "chat":
        stream: Any = team.sdk.chat.completions.create(
            model=model,
            messages=PROMPT,
            stream=True,
            stream_options={"include_usage": True},
            extra_headers=headers,
        )
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                break
    else:
        stream = team.sdk.responses.create(
            model=model, input="count", stream=True, extra_headers=headers
        )
        for event in stream:
            if event.type == "response.output_text.delta":
                break
    stream.close()
    (entry,) = fake.wait_for_journal(left, DEADLINE)
    assert not entry["completed"]
    assert_unknown(usage_proxy, access, request_id, "client_disconnect", before, model)


@pytest.mark.parametrize("endpoint", ["chat", "completions", "responses"])
def test_an_upstream_reset_mid_stream_is_unknown_upstream_error(
    usage_proxy: ProxyServer,
    team: Client,
    fake: FakeUpstreamClient,
    access: pytest.LogCaptureFixture,
    endpoint: str,
) -> None:
    model = f"usage-e2e-reset-{endpoint}"
    script = {"ending": "reset", "after_chunks": 2}
    request_id = f"usage-reset-{endpoint}"
    before = metric_samples(usage_proxy)
    headers = headers_for(script, request_id)
    stream: Any
    if endpoint == "chat":
        stream = team.sdk.chat.completions.create(
            model=model,
            messages=PROMPT,
            stream=True,
            stream_options={"include_usage": True},
            extra_headers=headers,
        )
    elif endpoint == "completions":
        stream = team.sdk.completions.create(
            model=model,
            prompt="Once",
            stream=True,
            stream_options={"include_usage": True},
            extra_headers=headers,
        )
    else:
        stream = team.sdk.responses.create(
            model=model, input="count", stream=True, extra_headers=headers
        )
    with pytest.raises(openai.APIError) as raised:
        list(stream)
    assert raised.value.code == "upstream_stream_interrupted"
    line = assert_unknown(usage_proxy, access, request_id, "upstream_error", before, model)
    assert "ending=upstream_error" in line
    assert_no_key_in(bytes(team.last.body))  # the interruption event the proxy wrote


def test_a_non_streamed_body_cut_short_is_unknown_upstream_error(
    usage_proxy: ProxyServer,
    team: Client,
    fake: FakeUpstreamClient,
    access: pytest.LogCaptureFixture,
) -> None:
    model = "usage-e2e-reset-json"
    before = metric_samples(usage_proxy)
    with pytest.raises(openai.APIConnectionError):
        chat(team.sdk, model, headers_for({"ending": "reset"}, "usage-reset-json"))
    assert_unknown(usage_proxy, access, "usage-reset-json", "upstream_error", before, model)


# --- the key stays out of everything the proxy says ---------------------------------------------


def test_the_key_is_in_no_error_body_no_line_and_never_reaches_the_upstream(
    usage_proxy: ProxyServer,
    team: Client,
    fake: FakeUpstreamClient,
    access: pytest.LogCaptureFixture,
) -> None:
    # A wrong key: refused, and the refusal repeats neither it nor any configured key.
    wrong = PROXY_KEY + "-wrong"
    refused = httpx.post(
        f"{usage_proxy.base_url}/chat/completions",
        json={"model": "m", "messages": PROMPT},
        headers={"authorization": f"Bearer {wrong}", "x-request-id": "usage-wrong-key"},
        timeout=10,
    )
    assert refused.status_code == 401
    assert wrong not in refused.text
    assert_no_key_in(refused.content, str(refused.headers))
    assert fields_of(access_line(access, "usage-wrong-key"))["key"] == "-"
    # An upstream error answered to the right key.
    with pytest.raises(openai.RateLimitError) as limited:
        chat(team.sdk, "m", {"x-fake-scenario": "rate_limited", "x-request-id": "usage-429"})
    assert_no_key_in(bytes(team.last.body), str(limited.value.response.headers))
    assert fields_of(access_line(access, "usage-429"))["key"] == TEAM
    # What the upstream received carries no proxy key (the fake echoes what arrived).
    echoed = team.sdk.chat.completions.with_raw_response.create(
        model="m", messages=PROMPT, extra_headers={"x-fake-scenario": "echo"}
    )
    assert_no_key_in(echoed.content)
    assert json.loads(echoed.content)["path"] == "/v1/chat/completions"
    assert_no_key_in(access.text)
    metric_samples(usage_proxy)  # asserts that the page holds no key either


# --- usage of answers the proxy passes on as the upstream sent them ------------------------------


def test_a_client_that_leaves_before_the_headers_is_unknown_client_disconnect(
    usage_proxy: ProxyServer,
    fake: FakeUpstreamClient,
    access: pytest.LogCaptureFixture,
) -> None:
    # The request reached the upstream, which may bill for it; the line must not look like a
    # request that reports no usage (RequestRecord.usage: None only "when none is due").
    model = "usage-e2e-left-early"
    before = metric_samples(usage_proxy)
    with (
        httpx.Client(timeout=httpx.Timeout(10.0, read=0.3)) as client,
        pytest.raises(httpx.ReadTimeout),
    ):
        client.post(
            f"{usage_proxy.base_url}/chat/completions",
            json={"model": model, "messages": PROMPT},
            headers={
                "authorization": f"Bearer {PROXY_KEY}",
                "x-request-id": "usage-left-early",
                "x-fake-script": json.dumps({"delay_before_headers": 30}),
            },
        )
    fake.wait_for_journal(left, DEADLINE)
    assert_unknown(usage_proxy, access, "usage-left-early", "client_disconnect", before, model)


async def test_the_usage_of_a_gzip_compressed_answer_is_read(
    usage_proxy: ProxyServer, access: pytest.LogCaptureFixture
) -> None:
    # OpenAI compresses non-streamed answers for clients that accept it, and the SDK sends
    # `Accept-Encoding: gzip, deflate` (openai-python#1819, NextChat#3215); the proxy passes
    # the compressed body on unchanged (README, "Bytes unchanged"), and must still count it.
    body = json.dumps(CHAT_BODY, indent=2).encode()
    compressed = gzip.compress(body, mtime=0)

    async def compressing(request: web.Request) -> web.StreamResponse:
        await request.read()
        assert "gzip" in request.headers.get("accept-encoding", "")
        headers = {"content-type": "application/json", "content-encoding": "gzip"}
        return web.Response(body=compressed, headers=headers)

    upstream = ThrowawayUpstream()
    upstream.handler = compressing
    await upstream.start()
    try:
        with start_proxy(f"{upstream.url}/v1", named_keys_from_file=usage_named_keys()) as proxy:
            async with openai.AsyncOpenAI(
                base_url=proxy.base_url, api_key=PROXY_KEY, max_retries=0
            ) as sdk:
                completion = await sdk.chat.completions.create(
                    model="m", messages=PROMPT, extra_headers={"x-request-id": "usage-gzip"}
                )
            async with (
                httpx.AsyncClient(timeout=10) as client,
                client.stream(
                    "POST",
                    f"{proxy.base_url}/chat/completions",
                    json={"model": "m", "messages": PROMPT},
                    headers={"authorization": f"Bearer {PROXY_KEY}", "accept-encoding": "gzip"},
                ) as raw,
            ):
                received = b"".join([chunk async for chunk in raw.aiter_raw()])
            line = await asyncio.to_thread(access_line, access, "usage-gzip")
    finally:
        await upstream.stop()
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == 1234
    assert received == compressed  # passed on compressed, byte for byte
    fields = fields_of(line)
    assert fields["key"] == TEAM
    assert fields.get("usage") != "unknown", line
    assert fields["model"] == CHAT_BODY["model"]
    assert [int(fields[name]) for name in TOKEN_FIELDS] == [1234, 56, 1024, 32]


@pytest.mark.parametrize("coding", ["br", "zstd", "gzip, br"])
async def test_an_answer_in_a_coding_the_proxy_cannot_read_is_usage_unknown(
    usage_proxy: ProxyServer, access: pytest.LogCaptureFixture, coding: str
) -> None:
    # Clients with the `brotli` or `zstandard` package installed ask for br and zstd too, and
    # OpenAI answers br (NextChat#3215). The proxy passes such a body on as it came; it cannot
    # read the usage, and the line must say so rather than look like an answer that owes none.
    opaque = bytes(range(256)) * 8  # the proxy passes it on without looking: any bytes do

    async def encoded(request: web.Request) -> web.StreamResponse:
        await request.read()
        headers = {"content-type": "application/json", "content-encoding": coding}
        return web.Response(body=opaque, headers=headers)

    upstream = ThrowawayUpstream()
    upstream.handler = encoded
    await upstream.start()
    request_id = "usage-coding-" + coding.replace(", ", "-")
    try:
        with start_proxy(f"{upstream.url}/v1", named_keys_from_file=usage_named_keys()) as proxy:
            before = await asyncio.to_thread(metric_samples, proxy)
            async with (
                httpx.AsyncClient(timeout=10) as client,
                client.stream(
                    "POST",
                    f"{proxy.base_url}/chat/completions",
                    json={"model": "m", "messages": PROMPT},
                    headers={
                        "authorization": f"Bearer {PROXY_KEY}",
                        "accept-encoding": "br, zstd, gzip",
                        "x-request-id": request_id,
                    },
                ) as raw,
            ):
                received = b"".join([chunk async for chunk in raw.aiter_raw()])
            line = await asyncio.to_thread(access_line, access, request_id)
            after = await asyncio.to_thread(metric_samples, proxy)
    finally:
        await upstream.stop()
    assert received == opaque
    fields = fields_of(line)
    assert fields["key"] == TEAM
    assert fields.get("usage") == "unknown", line
    unknown = [
        value - before.get(name, 0.0)
        for name, value in after.items()
        if name[0] == "llmproxy_usage_unknown_total" and ("key", TEAM) in name[1]
    ]
    assert sum(unknown) == 1
