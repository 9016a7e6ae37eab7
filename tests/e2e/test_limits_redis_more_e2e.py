"""More of the per-key limits shared through Redis (issue 13 items 4-6, DESIGN §11), with the
real Redis server the tests start (`tests/redis_server.py`) and the real fake upstream:

* a key over `tokens_per_day` is refused with type `tokens` and OpenAI's `-tokens` headers
  describing the day's allowance;
* a check is one round trip: every command Redis executes while a few requests pass is
  accounted for (`INFO commandstats`, all commands, against `MONITOR`'s record of who sent
  each), and the proxy's are exactly one script call per check (and one per release);
* `llmproxy serve --workers 2` with `LLMPROXY_REDIS_URL` starts, and its two workers share one
  limit.

Nothing waits for luck: what is waited for (a release reaching Redis, a command seen by
MONITOR, a worker's connection to Redis) is polled with a deadline.
"""

from __future__ import annotations

import collections
import json
import re
import subprocess
import threading
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import httpx
import pytest
import redis

from llmproxy.limiter import _CHECK_SHA, _RELEASE_SHA
from tests.e2e.conftest import Target, start_proxy
from tests.e2e.fake_client import FakeUpstreamClient
from tests.e2e.test_limits_e2e import (
    DEADLINE,
    answered,
    assert_no_key_in,
    connected_clients,
    named_key,
    post_chat,
    rate_limit_error,
    shared_through,
    statuses,
    wait_for,
    write_keys_file,
)
from tests.redis_server import RedisServer
from tests.support import llmproxy_environment, serve_subprocess

if TYPE_CHECKING:
    from fake_upstream.server import FakeUpstreamServer

pytestmark = pytest.mark.e2e

DAY = 86400
OVER = {"x-fake-script": json.dumps({"reasoning_tokens": 100})}  # one answer spends > 50


def duration_seconds(text: str) -> float:
    """OpenAI's `x-ratelimit-reset-*` (Go durations: `20ms`, `1.5s`, `6m0s`, `52h48m0s`)."""
    match = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+(?:\.\d+)?)s)?|(\d+)ms", text)
    assert text, text
    assert match is not None, text
    hours, minutes, seconds, milliseconds = match.groups()
    if milliseconds is not None:
        return int(milliseconds) / 1000
    return int(hours or 0) * 3600 + int(minutes or 0) * 60 + float(seconds or 0)


# --- (a) tokens per day --------------------------------------------------------------------------


def test_a_key_over_tokens_per_day_through_redis_is_refused_with_the_day_s_token_headers(
    self_hosted: Target,
    fake: FakeUpstreamClient,
    redis_server: RedisServer,
    redis_client: redis.Redis,
) -> None:
    key = named_key("team-a", tokens_per_day=50)
    with start_proxy(fake.base_url, named_keys=(key,), **shared_through(redis_server)) as proxy:
        first = post_chat(proxy.url, "team-a", headers=OVER)
        assert first.status_code == 200, first.text
        usage = first.json()["usage"]
        spent = usage["prompt_tokens"] + usage["completion_tokens"]
        assert spent > 50  # post-paid: the one answer may overshoot the day's allowance
        wait_for(lambda: redis_client.exists("llmproxy:limits:team-a:tpd"), "the tokens paid")
        refused = post_chat(proxy.url, "team-a")
        still = post_chat(proxy.url, "team-a")
        names = sorted(name.decode() for name in redis_client.scan_iter("*"))
        ttl = answered(redis_client.pttl("llmproxy:limits:team-a:tpd"), int)
    error = rate_limit_error(refused)
    assert error["type"] == "tokens"
    assert "tokens_per_day" in error["message"]
    assert "50 tokens per day" in error["message"]
    headers = refused.headers
    assert headers["x-ratelimit-limit-tokens"] == "50"
    assert headers["x-ratelimit-remaining-tokens"] == "0"
    # What was spent frees at 50 tokens a day: all of it in spent/50 days, enough of it for a
    # request in (spent - 50)/50 days (less the moments between the answer and the check).
    whole_again = spent * DAY / 50
    reset = headers["x-ratelimit-reset-tokens"]
    assert re.fullmatch(r"\d+h\d+m\d+s", reset), reset  # hours: a day's window, not a minute's
    assert whole_again - 10 <= duration_seconds(reset) <= whole_again + 1
    frees_in = (spent - 50) * DAY / 50
    assert frees_in - 10 <= int(headers["retry-after"]) <= frees_in + 1
    # No requests limit, so no requests headers (an invented limit would mislead clients).
    assert not [name for name in headers if name.endswith("-requests")]
    assert rate_limit_error(still)["type"] == "tokens"  # nothing frees in a moment
    assert len(fake.journal()) == 1  # the refused requests never reached the upstream
    # The state is the day's TAT only, expiring when the allowance is whole again.
    assert names == ["llmproxy:limits:team-a:tpd"]
    assert whole_again * 1000 - 10_000 <= ttl <= whole_again * 1000 + 2_000


# --- (b) one round trip per check ----------------------------------------------------------------


class Monitor:
    """Redis's MONITOR on a connection of its own, read in a thread: every command the server
    executes, in order, with who sent it (`client_type` "lua" for a script's own commands)."""

    STOP = "monitor-stop"

    def __init__(self, port: int) -> None:
        self._client = redis.Redis(port=port, socket_timeout=DEADLINE * 4)
        self._port = port
        self.commands: list[dict[str, Any]] = []
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._started = threading.Event()

    def _read(self) -> None:
        with self._client.monitor() as monitor:  # type: ignore[no-untyped-call]
            self._started.set()
            for command in monitor.listen():
                self.commands.append(command)
                if command["command"] == f"ECHO {self.STOP}":
                    return

    def __enter__(self) -> Monitor:
        self._thread.start()
        assert self._started.wait(DEADLINE), "MONITOR did not start"
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._thread.is_alive():
            with redis.Redis(port=self._port, socket_timeout=DEADLINE) as stopper:
                stopper.echo(self.STOP)
            self._thread.join(DEADLINE)
        self._client.close()

    def between(self, start: str, end: str) -> list[dict[str, Any]]:
        """The commands after `ECHO start` and before `ECHO end`, once `ECHO end` was seen."""
        wait_for(lambda: any(c["command"] == f"ECHO {end}" for c in self.commands), "the end")
        texts = [command["command"] for command in self.commands]
        return self.commands[texts.index(f"ECHO {start}") + 1 : texts.index(f"ECHO {end}")]


def source(command: dict[str, Any]) -> str:
    if command["client_type"] == "lua":
        return "lua"
    return f"{command['client_address']}:{command['client_port']}"


def name_of(command: dict[str, Any]) -> str:
    return str(command["command"]).split(" ", 1)[0].lower()


def command_counts(client: redis.Redis) -> collections.Counter[str]:
    """Every command Redis has executed or rejected, by name (INFO commandstats)."""
    stats = answered(client.info("commandstats"), dict)
    return collections.Counter(
        {
            name.removeprefix("cmdstat_"): int(value["calls"]) + int(value.get("rejected_calls", 0))
            for name, value in stats.items()
        }
    )


@pytest.mark.parametrize(
    ("limits", "scripts"),
    [
        ({"requests_per_minute": 1000}, [_CHECK_SHA]),
        (
            {"requests_per_minute": 1000, "tokens_per_minute": 100_000, "max_concurrent": 10},
            [_CHECK_SHA, _RELEASE_SHA],
        ),
    ],
    ids=["check", "check-and-release"],
)
def test_every_command_redis_runs_for_a_request_is_one_script_call_per_check(
    self_hosted: Target,
    fake: FakeUpstreamClient,
    tmp_path: Path,
    limits: dict[str, int],
    scripts: list[str],
) -> None:
    """N requests, and Redis runs exactly N check scripts (and N release scripts for a key
    whose answers pay tokens or give back a slot): no PING, no SCRIPT EXISTS, no GET before
    the script, nothing per request beside it. The first connection's greeting (the SELECT of
    the URL's database) and the loading of the scripts happen before the counted window."""
    requests = 5
    key = named_key("team-a", **limits)
    with (
        RedisServer(tmp_path) as server,
        redis.Redis(port=server.port, socket_timeout=DEADLINE) as mine,
        redis.Redis(port=server.port, db=5, socket_timeout=DEADLINE) as in_db_5,
        Monitor(server.port) as monitor,
        start_proxy(
            fake.base_url,
            named_keys=(key,),
            redis_url=f"redis://127.0.0.1:{server.port}/5",  # a database: SELECTed on connecting
            redis_timeout=2.0,
            redis_failure="closed",
        ) as proxy,
    ):
        me = answered(mine.client_info(), dict)["addr"]
        also_me = answered(in_db_5.client_info(), dict)["addr"]  # redis-py SELECTs 5 too
        assert post_chat(proxy.url, "team-a").status_code == 200  # connects, loads the scripts
        if len(scripts) == 2:
            wait_for(lambda: in_db_5.exists("llmproxy:limits:team-a:tpm"), "the first release")
        mine.echo("window-start")
        before = command_counts(mine)
        answers = [post_chat(proxy.url, "team-a") for _ in range(requests)]
        assert statuses(answers) == [200] * requests

        def proxy_calls() -> list[dict[str, Any]]:
            started = [c["command"] for c in monitor.commands].index("ECHO window-start")
            return [
                command
                for command in monitor.commands[started:]
                if source(command) not in ("lua", me)
            ]

        # The releases are sent after the answers: wait until Redis has run them all.
        wait_for(lambda: len(proxy_calls()) >= requests * len(scripts), "the releases")
        after = command_counts(mine)
        mine.echo("window-end")
        window = monitor.between("window-start", "window-end")

    by_proxy = [command for command in window if source(command) not in ("lua", me)]
    calls = collections.Counter(
        tuple(str(command["command"]).split(" ")[:2]) for command in by_proxy
    )
    assert calls == {("EVALSHA", sha): requests for sha in scripts}, calls
    # INFO commandstats counts every command Redis ran, a script's own commands included: less
    # those (MONITOR saw them) and the test's INFO, what remains is the proxy's script calls.
    ran = after - before
    by_scripts = collections.Counter(name_of(c) for c in window if source(c) == "lua")
    by_me = collections.Counter(name_of(c) for c in window if source(c) == me)
    assert by_me == {"info": 2}  # before and after; the later one counts only in later stats
    assert ran == by_scripts + collections.Counter({"info": 1, "evalsha": requests * len(scripts)})
    # The greeting and the scripts' loading went before the window, on the same connection.
    greeted = [c for c in monitor.commands if name_of(c) == "select" and source(c) != also_me]
    assert len(greeted) == 1
    assert source(greeted[0]) == source(by_proxy[0])


# --- (c) llmproxy serve --workers 2 --------------------------------------------------------------


def test_two_workers_of_one_llmproxy_serve_share_one_limit_through_redis(
    fake_upstream: FakeUpstreamServer,
    redis_server: RedisServer,
    redis_client: redis.Redis,
    tmp_path: Path,
) -> None:
    """`--workers 2` with a limited key starts when LLMPROXY_REDIS_URL is set (without it, it
    must not: each worker would allow the whole limit), and the limit of 3 requests a minute
    holds across both workers: each request on a fresh connection, whichever worker takes it.
    Both workers are seen to take requests (each opens its own connection to Redis when it
    first checks a limit), so a limit kept per worker could not pass."""
    keys_file = write_keys_file(tmp_path, {"team-a": {"requests_per_minute": 3}})
    env = llmproxy_environment(
        LLMPROXY_UPSTREAM_URL=fake_upstream.base_url,
        LLMPROXY_KEYS_FILE=str(keys_file),
        LLMPROXY_REDIS_URL=redis_server.url,
        LLMPROXY_REDIS_TIMEOUT="2",
        LLMPROXY_REDIS_FAILURE="closed",
    )
    workers_in_redis = 0
    with serve_subprocess(env, "--workers", "2", output=subprocess.PIPE) as (process, url):
        answers = [post_chat(url, "team-a") for _ in range(4)]
        assert statuses(answers) == [200, 200, 200, 429]
        # Until the second worker has taken a request too (the kernel hands each new
        # connection to one of them): every one of these is over the limit.
        for _ in range(200):
            workers_in_redis = connected_clients(redis_client) - 1  # not this test's own
            if workers_in_redis >= 2:
                break
            answers.append(post_chat(url, "team-a"))
        page = httpx.get(f"{url}/metrics", timeout=DEADLINE).text
        process.terminate()
        output = process.communicate(timeout=20)[0].decode()
    assert workers_in_redis == 2, "only one worker ever took a request"
    assert statuses(answers) == [200] * 3 + [429] * (len(answers) - 3)
    assert rate_limit_error(answers[3])["type"] == "requests"
    assert len(fake_upstream.journal()) == 3  # the refused ones never reached the upstream
    assert redis_client.exists("llmproxy:limits:team-a:rpm")
    # Both workers' lines and metrics agree: 3 answered, the rest refused, under the name.
    lines = [line for line in output.splitlines() if " POST /v1/chat/completions " in line]
    assert len(lines) == len(answers)
    assert sum(" 200 " in line for line in lines) == 3
    assert all("key=team-a" in line for line in lines)
    refused = re.search(r'llmproxy_requests_total\{key="team-a",status="429"\} (\S+)', page)
    assert refused is not None
    assert float(refused.group(1)) == len(answers) - 3
    assert_no_key_in(output + page, "llmproxy serve's output and /metrics")
