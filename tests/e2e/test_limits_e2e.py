"""Per-key limits end to end (issue 13 items 4-6, DESIGN §11): real proxies on loopback in front
of the real fake upstream, the official SDK where a client is needed, and a real Redis server
started by the tests (`tests/redis_server.py`) for the limits shared by workers and replicas:
killed, frozen and started again on the same port, never faked.

Time never passes for a window to free: every limit here is reached by spending it, and what
the tests wait for (a proxy ready, Redis answering PING, a release reaching Redis) is polled
with a deadline.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import json
import logging
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import httpx
import openai
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from llmproxy.access import AccessKey, key_digest
from llmproxy.limiter import RedisLimiter
from llmproxy.limits import KeyLimits
from tests.e2e.conftest import Target, start_proxy
from tests.e2e.fake_client import FakeUpstreamClient
from tests.redis_server import RedisServer
from tests.support import free_port, llmproxy_environment, serve_subprocess

if TYPE_CHECKING:
    from fake_upstream.server import FakeUpstreamServer

T = TypeVar("T")
MODEL = "gpt-4o-mini"
MESSAGES: list[Any] = [{"role": "user", "content": "hi"}]
CHAT = {"model": MODEL, "messages": MESSAGES}
SECRETS = {
    "team-a": "sk-proxy-e2e-team-a-SECRET-4f1c9a",
    "team-b": "sk-proxy-e2e-team-b-SECRET-77d02e",
}
# Generous: a proxy whose Redis is down, frozen or back answers each request well within it
# (the failure tests set redis_timeout to 0.25 s); a hang fails the request, not the suite.
ANSWER_BOUND = 5.0
DEADLINE = 5.0
LIMITER_ERRORS = "llmproxy_limiter_errors_total"


def named_key(name: str, **limits: int) -> AccessKey:
    return AccessKey(name, key_digest(SECRETS[name]), KeyLimits(**limits))


def forbidden_texts() -> list[str]:
    """What must never leave the proxy: each key and its SHA-256."""
    found = []
    for secret in SECRETS.values():
        found += [secret, key_digest(secret).hex()]
    return found


def assert_no_key_in(text: str, where: str) -> None:
    for forbidden in forbidden_texts():
        assert forbidden not in text, f"{where} holds a proxy key (or its digest)"


@pytest.fixture(autouse=True)
def proxy_logs(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """Every log record of the in-process proxies, checked for keys after each test."""
    caplog.set_level(logging.INFO, logger="llmproxy")
    yield caplog
    for record in caplog.get_records("setup") + caplog.get_records("call"):
        assert_no_key_in(record.getMessage(), f"log record {record.name}")


def shared_through(server: RedisServer, **settings: Any) -> dict[str, Any]:
    """Settings of a proxy whose limits live in `server`. Where Redis failing is not under test:
    a timeout that a loaded machine cannot reach, and failing closed, so that a slow Redis shows
    as a 503 and never as one request too many let through."""
    return {
        "redis_url": server.url,
        "redis_timeout": 2.0,
        "redis_failure": "closed",
        **settings,
    }


def write_keys_file(directory: Path, tables: dict[str, dict[str, int]]) -> Path:
    """A LLMPROXY_KEYS_FILE of [keys.<name>] tables holding digests, not the keys."""
    lines = []
    for name, limits in tables.items():
        lines += [f"[keys.{name}]", f'key_sha256 = "{key_digest(SECRETS[name]).hex()}"']
        lines += [f"{field} = {value}" for field, value in limits.items()]
    path = directory / "keys.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def post_chat(url: str, name: str, **options: Any) -> httpx.Response:
    """One chat completion as key `name`, answered within ANSWER_BOUND or failed."""
    headers = {"Authorization": f"Bearer {SECRETS[name]}", **options.pop("headers", {})}
    response = httpx.post(
        f"{url}/v1/chat/completions",
        json=options.pop("json", CHAT),
        headers=headers,
        timeout=ANSWER_BOUND,
        **options,
    )
    assert_no_key_in(response.text, f"answer {response.status_code}")
    assert_no_key_in(json.dumps(dict(response.headers)), "answer headers")
    return response


def statuses(responses: list[httpx.Response]) -> list[int]:
    return [response.status_code for response in responses]


def metric(url: str, name: str) -> float:
    page = httpx.get(f"{url}/metrics", timeout=DEADLINE).text
    assert_no_key_in(page, "/metrics")
    total = 0.0
    for family in text_string_to_metric_families(page):
        for sample in family.samples:
            if sample.name == name:
                total += sample.value
    return total


def wait_for(condition: Callable[[], object], what: str, deadline: float = DEADLINE) -> None:
    give_up = time.monotonic() + deadline
    while not condition():
        assert time.monotonic() < give_up, f"{what} did not happen within {deadline} s"
        time.sleep(0.01)  # polling observable state with a deadline


def answered(value: object, kind: type[T]) -> T:
    """A synchronous Redis client's answer (redis-py types them as maybe awaitable)."""
    assert isinstance(value, kind), value
    return value


def in_flight(client: redis.Redis, name: str) -> int:
    return answered(client.zcard(f"llmproxy:limits:{name}:inflight"), int)


def rate_limit_error(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 429, response.text
    error: dict[str, Any] = response.json()["error"]
    assert error["code"] == "rate_limit_exceeded"
    assert int(response.headers["retry-after"]) >= 1
    return error


# -- in the process -------------------------------------------------------------------------------


def test_over_requests_per_minute_the_sdk_gets_a_rate_limit_error_with_openais_headers(
    self_hosted: Target, fake: FakeUpstreamClient
) -> None:
    key = named_key("team-a", requests_per_minute=2, tokens_per_minute=1000)
    with (
        start_proxy(fake.base_url, named_keys=(key,)) as proxy,
        openai.OpenAI(base_url=proxy.base_url, api_key=SECRETS["team-a"], max_retries=0) as sdk,
    ):
        answers = [sdk.chat.completions.create(model=MODEL, messages=MESSAGES) for _ in range(2)]
        with pytest.raises(openai.RateLimitError) as caught:
            sdk.chat.completions.create(model=MODEL, messages=MESSAGES)
    error = caught.value
    assert error.status_code == 429
    assert (error.code, error.type) == ("rate_limit_exceeded", "requests")
    assert "requests_per_minute" in error.message
    assert "2 requests per minute" in error.message
    headers = error.response.headers
    assert 1 <= int(headers["retry-after"]) <= 30  # one request frees every 60/2 s
    assert headers["x-ratelimit-limit-requests"] == "2"
    assert headers["x-ratelimit-remaining-requests"] == "0"
    assert re.fullmatch(r"(\d+m)?\d+(\.\d+)?s", headers["x-ratelimit-reset-requests"])
    assert headers["x-ratelimit-limit-tokens"] == "1000"
    # The two answers' usage was paid; at 1000 per minute a token frees every 60 ms.
    spent = sum(answer.usage.total_tokens for answer in answers if answer.usage)
    assert spent > 0
    assert 1000 - spent <= int(headers["x-ratelimit-remaining-tokens"]) < 1000
    assert headers["x-ratelimit-reset-tokens"]
    assert headers["x-llmproxy-request-id"]
    assert_no_key_in(error.response.text, "the 429")
    assert len(fake.journal()) == 2  # the refused request never reached the upstream


UPSTREAM_RATE_HEADERS = {
    "x-ratelimit-limit-requests": "10000",
    "x-ratelimit-remaining-requests": "9999",
    "x-ratelimit-reset-requests": "6ms",
    "x-ratelimit-limit-tokens": "30000000",
    "x-ratelimit-remaining-tokens": "29999990",
    "x-ratelimit-reset-tokens": "0s",
}


def test_the_upstreams_own_ratelimit_headers_on_its_answers_pass_unchanged(
    self_hosted: Target, fake: FakeUpstreamClient
) -> None:
    key = named_key("team-a", requests_per_minute=50, tokens_per_minute=1000, max_concurrent=5)
    script = json.dumps({"headers": UPSTREAM_RATE_HEADERS})
    with (
        start_proxy(fake.base_url, named_keys=(key,)) as proxy,
        openai.OpenAI(base_url=proxy.base_url, api_key=SECRETS["team-a"], max_retries=0) as sdk,
    ):
        raw = sdk.chat.completions.with_raw_response.create(
            model=MODEL, messages=MESSAGES, extra_headers={"x-fake-script": script}
        )
    assert raw.status_code == 200
    for name, value in UPSTREAM_RATE_HEADERS.items():
        assert raw.headers.get_list(name) == [value], name  # the upstream's, once, unchanged
    assert "retry-after" not in raw.headers


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
def test_a_key_over_tokens_per_minute_after_one_answer_is_refused_next_time(
    self_hosted: Target, fake: FakeUpstreamClient, stream: bool
) -> None:
    key = named_key("team-a", tokens_per_minute=50)
    script = {"x-fake-script": json.dumps({"reasoning_tokens": 100})}  # usage over 50 at once
    with (
        start_proxy(fake.base_url, named_keys=(key,)) as proxy,
        openai.OpenAI(base_url=proxy.base_url, api_key=SECRETS["team-a"], max_retries=0) as sdk,
    ):
        if stream:
            chunks = list(
                sdk.chat.completions.create(
                    model=MODEL,
                    messages=MESSAGES,
                    stream=True,
                    stream_options={"include_usage": True},
                    extra_headers=script,
                )
            )
            usage = chunks[-1].usage
        else:
            usage = sdk.chat.completions.create(
                model=MODEL, messages=MESSAGES, extra_headers=script
            ).usage
        assert usage is not None
        assert usage.total_tokens > 50  # the first answer may overshoot: tokens are post-paid
        with pytest.raises(openai.RateLimitError) as caught:
            sdk.chat.completions.create(model=MODEL, messages=MESSAGES)
    error = caught.value
    assert (error.code, error.type) == ("rate_limit_exceeded", "tokens")
    assert "tokens_per_minute" in error.message
    assert "50 tokens per minute" in error.message
    headers = error.response.headers
    assert headers["x-ratelimit-limit-tokens"] == "50"
    assert headers["x-ratelimit-remaining-tokens"] == "0"
    # The overshoot frees at 50 per minute: (total - 50) tokens take that long.
    frees_in = (usage.total_tokens - 50) * 60 / 50
    assert frees_in - 2 <= int(headers["retry-after"]) <= frees_in + 1
    assert len(fake.journal()) == 1


def test_several_workers_with_a_limited_key_and_no_redis_stop_start_up_with_one_line(
    fake_upstream: FakeUpstreamServer, tmp_path: Path
) -> None:
    keys_file = write_keys_file(tmp_path, {"team-a": {"requests_per_minute": 10}})
    env = llmproxy_environment(
        LLMPROXY_UPSTREAM_URL=fake_upstream.base_url, LLMPROXY_KEYS_FILE=str(keys_file)
    )
    command = [sys.executable, "-m", "llmproxy", "serve", "--workers", "2"]
    finished = subprocess.run(
        [*command, "--port", str(free_port())],
        env=env,
        capture_output=True,
        timeout=30,  # if it started instead, it would serve until killed here
        check=False,
    )
    assert finished.returncode != 0
    lines = finished.stderr.decode().strip().splitlines()
    assert len(lines) == 1, lines
    assert "workers" in lines[0].lower()
    assert "LLMPROXY_REDIS_URL" in lines[0]
    assert_no_key_in(lines[0] + finished.stdout.decode(), "the start-up error")


# -- shared through Redis -------------------------------------------------------------------------


def test_a_limit_is_shared_by_two_llmproxy_serve_processes_through_redis(
    fake_upstream: FakeUpstreamServer, redis_server: RedisServer, tmp_path: Path
) -> None:
    keys_file = write_keys_file(
        tmp_path, {"team-a": {"requests_per_minute": 4}, "team-b": {"requests_per_minute": 4}}
    )
    env = llmproxy_environment(
        LLMPROXY_UPSTREAM_URL=fake_upstream.base_url,
        LLMPROXY_KEYS_FILE=str(keys_file),
        LLMPROXY_REDIS_URL=redis_server.url,
        LLMPROXY_REDIS_TIMEOUT="2",
        LLMPROXY_REDIS_FAILURE="closed",
    )
    with (
        serve_subprocess(env, output=subprocess.PIPE) as (first, first_url),
        serve_subprocess(env, output=subprocess.PIPE) as (second, second_url),
    ):
        urls = [first_url, second_url]
        team_a = [post_chat(urls[i % 2], "team-a") for i in range(8)]
        team_b = [post_chat(urls[i % 2], "team-b") for i in range(5)]
        for url in urls:
            metric(url, "llmproxy_requests_total")  # /metrics of each, checked for keys
        for process in (first, second):
            process.terminate()
        outputs = [process.communicate(timeout=20)[0].decode() for process in (first, second)]
    # Alternating between the proxies, team-a gets its 4 requests in all, not 4 from each.
    assert statuses(team_a) == [200] * 4 + [429] * 4
    assert rate_limit_error(team_a[4])["type"] == "requests"
    assert team_a[5].headers["x-ratelimit-remaining-requests"] == "0"
    # ...and team-b, whose limit is its own, still has its 4.
    assert statuses(team_b) == [200] * 4 + [429]
    assert len(fake_upstream.journal()) == 8
    for output in outputs:
        assert_no_key_in(output, "llmproxy serve's output")
        assert "team-a" in output  # the access lines name the key: they were there to check


def test_concurrent_requests_through_two_proxies_spend_exactly_the_limit(
    self_hosted: Target, fake: FakeUpstreamClient, redis_server: RedisServer
) -> None:
    """One atomic script per check: 16 requests at once, through two proxies, 5 pass."""
    key = named_key("team-a", requests_per_minute=5)
    with (
        start_proxy(fake.base_url, named_keys=(key,), **shared_through(redis_server)) as one,
        start_proxy(fake.base_url, named_keys=(key,), **shared_through(redis_server)) as other,
        concurrent.futures.ThreadPoolExecutor(16) as pool,
    ):
        urls = [one.url, other.url]
        answers = list(pool.map(lambda i: post_chat(urls[i % 2], "team-a"), range(16)))
    assert sorted(statuses(answers)) == [200] * 5 + [429] * 11
    assert len(fake.journal()) == 5


def connected_clients(client: redis.Redis) -> int:
    """Connections Redis has open, the inspecting client's own included."""
    return int(answered(client.info("clients"), dict)["connected_clients"])


def test_the_redis_limiter_keeps_one_connection_however_its_first_checks_interleave(
    redis_server: RedisServer, redis_client: redis.Redis
) -> None:
    """One pipelined connection per process (llmproxy/redis_client.py): checks arriving one
    by one while it connects, as a burst of requests does, must all share it."""
    key = named_key("team-a", requests_per_minute=1000)

    async def first_checks() -> tuple[list[object], int]:
        limiter = RedisLimiter(redis_server.url, timeout=2.0, fail_closed=True)
        try:
            checks = []
            for number in range(40):
                checks.append(asyncio.create_task(limiter.check(key, f"check-{number}")))
                await asyncio.sleep(0)  # the next request arrives a turn of the loop later
            verdicts: list[object] = list(await asyncio.gather(*checks))
            return verdicts, connected_clients(redis_client) - 1  # not this test's own
        finally:
            await limiter.close()

    try:
        verdicts, opened = asyncio.run(first_checks())
    finally:
        gc.collect()  # a connection left open is reported in this test, not a later one
    assert verdicts == [None] * 40
    assert opened == 1
    wait_for(lambda: connected_clients(redis_client) == 1, "every connection closed")


def test_two_keys_do_not_affect_each_other_through_redis(
    self_hosted: Target,
    fake: FakeUpstreamClient,
    redis_server: RedisServer,
    redis_client: redis.Redis,
) -> None:
    keys = (
        named_key("team-a", requests_per_minute=2, tokens_per_minute=50),
        named_key("team-b", requests_per_minute=2, tokens_per_minute=50),
    )
    over = {"x-fake-script": json.dumps({"reasoning_tokens": 100})}
    with start_proxy(fake.base_url, named_keys=keys, **shared_through(redis_server)) as proxy:
        assert post_chat(proxy.url, "team-a", headers=over).status_code == 200
        wait_for(lambda: redis_client.exists("llmproxy:limits:team-a:tpm"), "team-a's tokens paid")
        assert rate_limit_error(post_chat(proxy.url, "team-a"))["type"] == "tokens"
        assert statuses([post_chat(proxy.url, "team-b") for _ in range(3)]) == [200, 200, 429]
        refused_b = post_chat(proxy.url, "team-b")
        assert rate_limit_error(refused_b)["type"] == "requests"
        assert refused_b.headers["x-ratelimit-limit-tokens"] == "50"
        assert int(refused_b.headers["x-ratelimit-remaining-tokens"]) > 0  # a's tokens are a's
        assert rate_limit_error(post_chat(proxy.url, "team-a"))["type"] == "tokens"


def test_limit_state_in_redis_is_namespaced_expires_and_takes_one_script_per_check_and_release(
    self_hosted: Target,
    fake: FakeUpstreamClient,
    redis_server: RedisServer,
    redis_client: redis.Redis,
) -> None:
    key = named_key(
        "team-a",
        requests_per_minute=100,
        tokens_per_minute=100_000,
        tokens_per_day=1_000_000,
        max_concurrent=10,
    )
    with start_proxy(fake.base_url, named_keys=(key,), **shared_through(redis_server)) as proxy:
        assert post_chat(proxy.url, "team-a").status_code == 200  # loads the scripts
        wait_for(lambda: redis_client.exists("llmproxy:limits:team-a:tpm"), "the first release")
        redis_client.config_resetstat()
        assert statuses([post_chat(proxy.url, "team-a") for _ in range(3)]) == [200] * 3

        def script_calls() -> int:
            stats = answered(redis_client.info("commandstats"), dict)
            return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))

        wait_for(lambda: script_calls() == 6, "three checks and three releases")
    assert script_calls() == 6  # one script call per check and one per release
    names = sorted(name.decode() for name in redis_client.scan_iter("*"))
    assert names == [f"llmproxy:limits:team-a:{part}" for part in ("rpm", "tpd", "tpm")]
    for name, window in zip(names, (60, 86400, 60), strict=True):
        ttl = answered(redis_client.pttl(name), int)
        assert 0 < ttl <= (window + 2) * 1000, (name, ttl)  # they expire once freed
        value = answered(redis_client.get(name), bytes)
        assert_no_key_in(name + value.decode(), "the limit state in Redis")


def hold_stream(
    client: httpx.Client, url: str, name: str, request_id: str | None = None
) -> AbstractContextManager[httpx.Response]:
    headers = {
        "Authorization": f"Bearer {SECRETS[name]}",
        "x-fake-scenario": "stall_mid_stream",  # two chunks, then silence until we leave
    }
    if request_id is not None:
        headers["x-request-id"] = request_id
    body = {**CHAT, "stream": True}
    return client.stream("POST", f"{url}/v1/chat/completions", json=body, headers=headers)


@pytest.mark.parametrize(
    "shared_request_id", [None, "client-chosen-id"], ids=["own-ids", "same-id"]
)
def test_max_concurrent_through_redis_refuses_beyond_it_until_a_slot_is_released(
    self_hosted: Target,
    fake: FakeUpstreamClient,
    redis_server: RedisServer,
    redis_client: redis.Redis,
    shared_request_id: str | None,
) -> None:
    """Clients choose their own x-request-id: sending one id on each request (a retrying
    client does) must not let them past max_concurrent."""
    key = named_key("team-a", max_concurrent=2)
    with (
        start_proxy(
            fake.base_url, named_keys=(key,), **shared_through(redis_server, read_timeout=30.0)
        ) as proxy,
        httpx.Client(timeout=ANSWER_BOUND) as client,
    ):
        ids = [shared_request_id or f"held-{i}" for i in range(2)]
        with (
            hold_stream(client, proxy.url, "team-a", ids[0]) as first,
            hold_stream(client, proxy.url, "team-a", ids[1]) as second,
        ):
            assert (first.status_code, second.status_code) == (200, 200)
            # Both in flight (the line iterators are kept: dropping one closes its stream).
            lines = [first.iter_lines(), second.iter_lines()]
            assert all(next(held).startswith("data: ") for held in lines)
            third = post_chat(
                proxy.url, "team-a", headers={"x-request-id": shared_request_id or "third"}
            )
            assert rate_limit_error(third)["type"] == "requests"
            assert "max_concurrent" in rate_limit_error(third)["message"]
        # Both held streams are closed: the proxy gives their slots back.
        wait_for(lambda: in_flight(redis_client, "team-a") == 0, "the slots given back")
        assert post_chat(proxy.url, "team-a").status_code == 200


@pytest.mark.parametrize("failure", ["killed", "frozen"])
def test_redis_failing_with_redis_failure_open_lets_requests_pass_and_counts_errors(
    self_hosted: Target,
    fake: FakeUpstreamClient,
    redis_server: RedisServer,
    proxy_logs: pytest.LogCaptureFixture,
    failure: str,
) -> None:
    key = named_key("team-a", requests_per_minute=3)
    with start_proxy(
        fake.base_url,
        named_keys=(key,),
        **shared_through(redis_server, redis_timeout=0.25, redis_failure="open"),
    ) as proxy:
        assert statuses([post_chat(proxy.url, "team-a") for _ in range(2)]) == [200, 200]
        errors_before = metric(proxy.url, LIMITER_ERRORS)
        if failure == "killed":
            redis_server.kill()
            during = [timed(lambda: post_chat(proxy.url, "team-a")) for _ in range(4)]
        else:
            with redis_server.frozen():
                during = [timed(lambda: post_chat(proxy.url, "team-a")) for _ in range(4)]
        # Beyond the limit of 3, and yet: the limiter is down and fails open.
        assert statuses([answer for answer, _ in during]) == [200] * 4
        assert max(elapsed for _, elapsed in during) < 2.0  # redis_timeout is 0.25 s
        assert metric(proxy.url, LIMITER_ERRORS) - errors_before >= 4
        warnings = [
            r for r in proxy_logs.records if "rate limiter's Redis failed" in r.getMessage()
        ]
        assert len(warnings) == 1  # one warning a minute, not one per request
        assert len(fake.journal()) == 6
        if failure == "killed":
            redis_server.start()  # back on the same port, empty
            # Counting resumes: the limit of 3 holds again.
            after = [post_chat(proxy.url, "team-a") for _ in range(4)]
            assert statuses(after) == [200, 200, 200, 429]
        else:
            # Thawed, Redis also runs the checks that timed out: whatever they spent, a fourth
            # request after it is back cannot pass a limit of 3.
            after = [post_chat(proxy.url, "team-a") for _ in range(4)]
            assert statuses(after)[-1] == 429
        rate_limit_error(after[-1])


@pytest.mark.parametrize("failure", ["killed", "frozen"])
def test_redis_failing_with_redis_failure_closed_answers_503_limiter_unavailable(
    self_hosted: Target, fake: FakeUpstreamClient, redis_server: RedisServer, failure: str
) -> None:
    key = named_key("team-a", requests_per_minute=3)
    with start_proxy(
        fake.base_url, named_keys=(key,), **shared_through(redis_server, redis_timeout=0.25)
    ) as proxy:
        assert post_chat(proxy.url, "team-a").status_code == 200
        if failure == "killed":
            redis_server.kill()
            during = [timed(lambda: post_chat(proxy.url, "team-a")) for _ in range(3)]
        else:
            with redis_server.frozen():
                during = [timed(lambda: post_chat(proxy.url, "team-a")) for _ in range(3)]
        for answer, elapsed in during:
            assert answer.status_code == 503, answer.text
            assert answer.json()["error"]["code"] == "limiter_unavailable"
            assert answer.json()["error"]["type"] == "proxy_error"
            assert elapsed < 2.0
        assert len(fake.journal()) == 1  # refused, not forwarded
        if failure == "killed":
            redis_server.start()
            after = [post_chat(proxy.url, "team-a") for _ in range(4)]
            assert statuses(after) == [200, 200, 200, 429]  # empty again: the whole limit
        else:
            # Thawed, Redis also runs the checks that timed out (they were sent): whatever
            # they spent, the fourth request after it is back cannot pass a limit of 3.
            after = [post_chat(proxy.url, "team-a") for _ in range(4)]
            assert set(statuses(after)) <= {200, 429}
            assert statuses(after)[-1] == 429


def timed(call: Callable[[], httpx.Response]) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    answer = call()
    return answer, time.monotonic() - started
